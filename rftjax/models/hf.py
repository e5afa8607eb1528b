"""Hugging Face checkpoints: load Llama / Qwen2 safetensors into the model, and export back.

`Transformer`'s parameter paths joined with "." are the safetensors names, with the same
layout ([out, in] projections), so loading is a lookup by name: no transposes, no renaming
table beyond two rules. Tensors Hugging Face stores that this model does not hold are skipped:
rotary ``inv_freq`` buffers (recomputed from the config), and ``lm_head.weight`` when the
embeddings are tied.

Loading streams one tensor at a time: each is read from its (memory-mapped) file, converted
to the target dtype and placed onto its sharding, device slice by device slice, so host memory
never holds more than one tensor. Nothing is downloaded: a folder is the only source.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from rftjax.models.config import ModelConfig, check_hf_architecture, read_hf_config, to_hf_config
from rftjax.models.transformer import Transformer

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
TIED_HEAD = "lm_head.weight"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # fast, sentencepiece, BPE
DEFAULT_SHARD_BYTES = 4 << 30

Sharding = jax.sharding.Sharding


def param_name(path: tuple) -> str:
    """``(DictKey('model'), DictKey('layers'), DictKey(0), ...)`` -> ``"model.layers.0..."``.

    The `nnx.Variable` attribute that holds the value (``.value``) is not part of the name.
    """
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
    return ".".join(parts)


def named_leaves(tree: Any) -> dict[str, Any]:
    """Leaves of a params-shaped pytree (an `nnx.State`) by Hugging Face name."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {param_name(path): leaf for path, leaf in leaves}


def weight_files(folder: str | os.PathLike) -> dict[str, str]:
    """Maps every tensor name in the checkpoint to the safetensors file that holds it.

    Reads ``model.safetensors.index.json`` (sharded checkpoints) or the headers of
    ``model.safetensors``; no tensor data is read.

    Raises:
      FileNotFoundError: naming the folder when it holds neither file, or a shard the index
        names that is absent.
      ValueError: naming a malformed index or safetensors file.
    """
    folder = os.fspath(folder)
    index_path = os.path.join(folder, INDEX_NAME)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: malformed index (needs a 'weight_map')") from e
        files = {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
        for path in sorted(set(files.values())):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{index_path} names shard {path}, which is absent")
        return files
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.exists(path):
        present = sorted(os.listdir(folder))
        hint = " (PyTorch .bin weights are not read: convert to safetensors)" * any(
            n.endswith(".bin") for n in present
        )
        raise FileNotFoundError(
            f"no {WEIGHTS_NAME} or {INDEX_NAME} in {folder}{hint}; files present: {present}"
        )
    with _open(path) as f:
        return dict.fromkeys(f.keys(), path)


def _open(path: str):
    """`safe_open` with numpy outputs; a corrupt file raises ValueError naming it."""
    try:
        return safe_open(path, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def _check_names(expected: set[str], present: set[str], tied: bool, folder: str) -> None:
    """Raises ValueError naming missing tensors, or tensors the model would silently drop."""
    missing = sorted(expected - present)
    if missing:
        shown = ", ".join(missing[:8]) + (f" (and {len(missing) - 8} more)" * (len(missing) > 8))
        raise ValueError(f"checkpoint {folder} is missing tensor(s): {shown}")
    ignored = {n for n in present if n.endswith(IGNORED_SUFFIXES)}
    if tied:
        ignored.add(TIED_HEAD)
    unused = sorted(present - expected - ignored)
    if unused:
        raise ValueError(
            f"checkpoint {folder} holds tensor(s) this model has no place for: "
            f"{', '.join(unused[:8])}; does config.json describe these weights?"
        )


def _reader(tensor_slice, name: str, path: str, dtype) -> Callable:
    """The callback of `jax.make_array_from_callback`: one device's slice, cast to dtype."""
    kind = tensor_slice.get_dtype()
    if kind not in FLOAT_DTYPES:
        raise ValueError(
            f"tensor {name} in {path} has dtype {kind}; accepted: {FLOAT_DTYPES} "
            "(quantized checkpoints are not supported)"
        )

    def read(index: tuple) -> np.ndarray:
        return np.asarray(tensor_slice[index]).astype(dtype)

    return read


def _by_file(files: dict[str, str], names: Iterable[str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for name in names:
        grouped.setdefault(files[name], []).append(name)
    return grouped


def load_params(
    folder: str | os.PathLike,
    config: ModelConfig,
    template: nnx.State,
    *,
    dtype: Any = None,
    shardings: Sharding | Any | None = None,
) -> nnx.State:
    """Reads a Hugging Face checkpoint's weights into a params pytree shaped like ``template``.

    Args:
      folder: checkpoint folder: config.json and model.safetensors, or shards with
        model.safetensors.index.json.
      config: the model the weights are for (``from_hf_config(folder)``, possibly with dtype
        overrides); ``config.tie_word_embeddings`` decides whether ``lm_head.weight`` is used.
      template: params of that model, concrete or abstract (`jax.ShapeDtypeStruct` leaves, e.g.
        from `abstract_params`); only names and shapes are read.
      dtype: dtype of the loaded parameters; default ``config.param_dtype``.
      shardings: where to place each parameter: None (the default device), one
        `jax.sharding.Sharding` for all, or a pytree of shardings shaped like ``template``.
        Each device reads only its own slice of each tensor.

    Returns:
      an `nnx.State` of ``template``'s structure holding the checkpoint's weights.

    Raises:
      ValueError: naming an unsupported architecture, a missing tensor, an unused tensor, a
        tensor whose shape differs from the model's (both shapes given), a non-float tensor,
        or an unreadable file.
      FileNotFoundError: for a folder without config.json or weights.
    """
    folder = os.fspath(folder)
    check_hf_architecture(read_hf_config(folder))
    dtype = jnp.dtype(dtype or config.param_dtype)
    targets = named_leaves(template)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placement = (
        dict.fromkeys(targets, shardings)
        if isinstance(shardings, Sharding)
        else named_leaves(shardings)
    )
    files = weight_files(folder)
    _check_names(set(targets), set(files), config.tie_word_embeddings, folder)
    loaded: dict[str, jax.Array] = {}
    for path, names in _by_file(files, targets).items():
        with _open(path) as f:
            for name in names:
                try:
                    tensor = f.get_slice(name)
                except SafetensorError as e:  # an index that names the wrong shard
                    raise ValueError(f"tensor {name} is not in {path} ({e})") from e
                shape = tuple(targets[name].shape)
                if tuple(tensor.get_shape()) != shape:
                    raise ValueError(
                        f"tensor {name} in {path} has shape {tuple(tensor.get_shape())}, "
                        f"but the model expects {shape}"
                    )
                read = _reader(tensor, name, path, dtype)
                loaded[name] = jax.make_array_from_callback(shape, placement[name], read)
    logging.info("loaded %d tensors (%s) from %s", len(loaded), dtype.name, folder)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(treedef, [loaded[param_name(p)] for p, _ in leaves])


def abstract_params(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The graph definition and shape-only params of ``config``'s model (nothing allocated)."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))


def load(
    folder: str | os.PathLike,
    config: ModelConfig,
    *,
    dtype: Any = None,
    shardings: Sharding | Any | None = None,
) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` of a checkpoint folder, like `rftjax.models.create` for a preset.

    No random initialization happens: the params template is abstract. See `load_params`.
    """
    graphdef, template = abstract_params(config)
    return graphdef, load_params(folder, config, template, dtype=dtype, shardings=shardings)


def load_tokenizer(folder: str | os.PathLike):
    """The tokenizer of a checkpoint folder, from local files only.

    The folder is checked first (config.json present, a supported architecture), so that a
    wrong ``--model`` folder is named as such before any data is tokenized.

    A folder with tokenizer.json (Llama 3, Qwen2 and every tokenizer that transformers saves
    "fast") is read by `transformers.PreTrainedTokenizerFast`, so the tokenizer is exactly the
    saved pipeline plus tokenizer_config.json's special tokens and chat template; other folders
    (sentencepiece only) go through `transformers.AutoTokenizer`. (AutoTokenizer alone would
    pick the tokenizer class from config.json's model type: transformers 5 rebuilds any
    tokenizer in a qwen2 folder as Qwen2's, which changes, e.g., the character tokenizer.)

    A tokenizer without a pad token (Llama 3) gets its unk token, else its EOS token, as pad:
    the sampler pads after EOS and masks by length, so pad may equal EOS; the supervised
    warm-up then does not learn to emit EOS (it is off by default for checkpoints).

    Raises:
      FileNotFoundError: for a folder without config.json.
      ValueError: for an unsupported architecture; naming the folder when it has no loadable
        tokenizer, or one without EOS.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = os.fspath(folder)
    check_hf_architecture(read_hf_config(folder))
    # transformers 5 would build an empty tokenizer for a qwen2 folder without any of these.
    if not any(os.path.exists(os.path.join(folder, n)) for n in TOKENIZER_FILES):
        raise ValueError(
            f"{folder}: no loadable tokenizer files (none of {', '.join(TOKENIZER_FILES)})"
        )
    fast = os.path.exists(os.path.join(folder, "tokenizer.json"))
    loader = PreTrainedTokenizerFast if fast else AutoTokenizer
    try:
        tokenizer = loader.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{folder}: no loadable tokenizer files ({e})") from e
    if tokenizer.eos_token is None:
        raise ValueError(f"{folder}: the tokenizer has no EOS token; generation could not stop")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        logging.info("tokenizer of %s has no pad token; using %r", folder, tokenizer.pad_token)
    return tokenizer


def _shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Names grouped, in order, into shards of at most ``max_bytes`` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    total = 0
    for name, size in sizes.items():
        if shards[-1] and total + size > max_bytes:
            shards.append([])
            total = 0
        shards[-1].append(name)
        total += size
    return shards


def export(
    folder: str | os.PathLike,
    config: ModelConfig,
    params: nnx.State,
    tokenizer=None,
    *,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[str]:
    """Writes ``params`` as a Hugging Face checkpoint folder that transformers can load.

    Writes config.json (`to_hf_config`, with the tokenizer's special token ids), the weights
    as model.safetensors (or shards of at most ``max_shard_bytes`` plus
    model.safetensors.index.json), and the tokenizer's files when one is given. Host memory
    holds one shard at a time.

    Args:
      folder: output folder (created if needed; files of the same names are replaced).
      config: the model's config.
      params: its params (`nnx.State`), e.g. ``state.params["policy"]`` of a trained run.
      tokenizer: a transformers tokenizer, or None to write no tokenizer files.
      dtype: dtype of the written tensors; default: each parameter's own.
      max_shard_bytes: largest shard file.

    Returns:
      the paths of the files written (weights, index, config).
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors = named_leaves(params)
    dtype = None if dtype is None else jnp.dtype(dtype)
    sizes = {n: x.size * (dtype or x.dtype).itemsize for n, x in sorted(tensors.items())}
    groups = _shards(sizes, max_shard_bytes)
    written = []
    weight_map = {}
    for i, names in enumerate(groups):
        fname = WEIGHTS_NAME
        if len(groups) > 1:
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        host = {n: np.asarray(jax.device_get(tensors[n])) for n in names}
        if dtype is not None:
            host = {n: x.astype(dtype) for n, x in host.items()}
        save_file(host, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
        written.append(os.path.join(folder, fname))
    index_path = os.path.join(folder, INDEX_NAME)
    if len(groups) == 1 and os.path.exists(index_path):
        os.remove(index_path)  # a stale index would take precedence over model.safetensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        written.append(_write_json(index_path, index))
    extra = {}
    if tokenizer is not None:
        extra = {
            f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")
        }
        tokenizer.save_pretrained(folder)
    written.append(_write_json(os.path.join(folder, "config.json"), to_hf_config(config, **extra)))
    return written


def _write_json(path: str, obj: Any) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    return path

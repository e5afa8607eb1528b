"""Hugging Face checkpoints: parity with transformers, export round trip, bad inputs, end to end.

transformers (with torch, CPU build) is the independent reference: tiny random Llama and Qwen2
models are built and saved by transformers here, loaded by `rftjax.models.hf`, and compared on
logits and greedy generations. Tests that need torch skip, saying why, only when it is absent;
CI installs it (`pip install torch==2.13.0`, the `parity` extra).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rftjax import models
from rftjax.models import hf
from rftjax.sampling import generate, sampling_params
from rftjax.tokenizer import char_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="parity with transformers needs torch: pip install torch==2.13.0 (CPU build; the "
    "'parity' extra). CI installs it.",
)
VOCAB = 128
# A chat template written in the character vocabulary, so prompts render into known tokens.
CHAT_TEMPLATE = (
    "{% for m in messages %}q: {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} a: {% endif %}"
)
SHAPES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
HF_CONFIGS = {
    # Untied head, Llama 3 rope scaling with a short original context so that it matters here.
    "llama": dict(
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    # Tied embeddings and QKV biases.
    "qwen2": dict(tie_word_embeddings=True, rope_parameters={"rope_theta": 1e6}),
}


def hf_model(model_type: str, seed: int = 0, **overrides):
    """A random transformers CausalLM of ``model_type``, every weight perturbed (norm weights
    and biases too, which init to ones / zeros), in eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = {"llama": "Llama", "qwen2": "Qwen2"}[model_type]
    settings = {**SHAPES, **HF_CONFIGS[model_type], **overrides}
    config = getattr(transformers, f"{cls}Config")(**settings)
    model = getattr(transformers, f"{cls}ForCausalLM")(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def make_hf_folder(path, model_type: str = "llama", *, chat_template: str | None = None, **shapes):
    """Saves a tiny random transformers model with the character tokenizer into ``path``."""
    model = hf_model(model_type, **shapes)
    model.save_pretrained(path)
    tokenizer = char_tokenizer()
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return model


def hf_logits(model, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """transformers' fp32 logits, with the padding-skipping positions our model uses."""
    import torch

    positions = np.maximum(np.cumsum(valid, -1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(valid.astype(np.int64)),
            position_ids=torch.tensor(positions),
        )
    return out.logits.float().numpy()


def random_batch(rng, batch=3, length=12, left_pad=(0, 0, 0)):
    tokens = rng.integers(0, VOCAB, (batch, length))
    valid = np.ones((batch, length), bool)
    for row, pad in enumerate(left_pad):
        valid[row, :pad] = False
        tokens[row, :pad] = 0
    return tokens, valid


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def checkpoint(request, tmp_path_factory):
    """(model_type, folder, transformers model, our ModelConfig, graphdef, params)."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip(needs_torch.kwargs["reason"])
    folder = tmp_path_factory.mktemp(request.param)
    model = make_hf_folder(folder, request.param)
    config = models.from_hf_config(folder)
    graphdef, params = hf.load(folder, config)
    return request.param, folder, model, config, graphdef, params


# --- parity with transformers ------------------------------------------------------------


def test_config_is_read_as_transformers_wrote_it(checkpoint):
    model_type, _, model, config, _, _ = checkpoint
    assert config.model_type == model_type
    assert config.tie_word_embeddings == (model_type == "qwen2")
    assert config.qkv_bias == (model_type == "qwen2")
    assert (config.vocab_size, config.num_layers, config.num_kv_heads) == (VOCAB, 2, 2)
    assert config.rope_scaling is None or dict(config.rope_scaling)["factor"] == 8.0


def test_logits_match_transformers(checkpoint):
    _, _, model, _, graphdef, params = checkpoint
    rng = np.random.default_rng(0)
    for left_pad in [(0, 0, 0), (0, 3, 7)]:
        tokens, valid = random_batch(rng, left_pad=left_pad)
        want = hf_logits(model, tokens, valid)
        got, _, _ = models.full_forward(graphdef, params, jnp.asarray(tokens), jnp.asarray(valid))
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=1e-4, rtol=0)
        assert np.abs(want).max() > 0.5  # logits of a size where 1e-4 is a real check


def test_greedy_generation_matches_transformers(checkpoint):
    import torch

    _, _, model, _, graphdef, params = checkpoint
    eos, pad, steps = 5, 0, 32
    rng = np.random.default_rng(1)
    tokens, valid = random_batch(rng, batch=3, length=6, left_pad=(0, 2, 4))
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(valid.astype(np.int64)),
            max_new_tokens=steps,
            min_new_tokens=0,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        ).numpy()[:, tokens.shape[1] :]
    want = np.full((3, steps), pad)
    want[:, : out.shape[1]] = out
    run = jax.jit(
        functools.partial(generate, graphdef, max_new_tokens=steps, eos_id=eos, pad_id=pad)
    )
    ro = run(params, tokens, valid, jax.random.PRNGKey(0), sampling_params(temperature=0.0))
    np.testing.assert_array_equal(np.asarray(ro.response), want)
    assert len(np.unique(want)) > 3  # a real sequence, not one repeated token


def test_export_round_trip_loads_in_transformers(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_type, _, model, config, _, params = checkpoint
    tokenizer = char_tokenizer()
    hf.export(tmp_path, config, params, tokenizer)
    assert models.from_hf_config(tmp_path) == config
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.model_type == model_type
    tokens, valid = random_batch(np.random.default_rng(2), left_pad=(0, 1, 5))
    np.testing.assert_allclose(
        hf_logits(again, tokens, valid)[valid], hf_logits(model, tokens, valid)[valid], atol=1e-5
    )
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("12+3")["input_ids"] == tokenizer("12+3")["input_ids"]
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (0, 2)


def test_sharded_export_reads_back_and_loads_in_transformers(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    _, _, model, config, graphdef, params = checkpoint
    hf.export(tmp_path, config, params, max_shard_bytes=64 << 10)
    with open(tmp_path / hf.INDEX_NAME, encoding="utf-8") as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / hf.WEIGHTS_NAME).exists()
    _, back = hf.load(tmp_path, config)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)
    tokens, valid = random_batch(np.random.default_rng(3))
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(
        hf_logits(again, tokens, valid), hf_logits(model, tokens, valid), atol=1e-5
    )


def test_bf16_params_and_compute_keep_fp32_logits(checkpoint):
    _, folder, model, config, _, _ = checkpoint
    bf16 = config.replace(dtype="bfloat16", param_dtype="bfloat16")
    graphdef, params = hf.load(folder, bf16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    tokens, valid = random_batch(np.random.default_rng(4))
    got, hidden, _ = models.full_forward(graphdef, params, jnp.asarray(tokens), jnp.asarray(valid))
    assert got.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
    want = hf_logits(model, tokens, valid)
    # bf16 keeps 8 bits of mantissa: close to the fp32 reference, far from 1e-4.
    assert np.abs(np.asarray(got) - want).max() < 0.1 * np.abs(want).max()


def test_placement_onto_given_shardings(checkpoint):
    _, folder, _, config, _, _ = checkpoint
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    _, template = hf.abstract_params(config)
    shardings = jax.tree.map(
        lambda x: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")), template
    )
    params = hf.load_params(folder, config, template, shardings=shardings)
    for leaf, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == sharding


# --- bad inputs (no torch needed: folders come from our own export) ----------------------

SMALL = models.ModelConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    model_type="qwen2",
    qkv_bias=True,
)


@pytest.fixture()
def exported(tmp_path):
    _, params = models.create(SMALL, 0)
    folder = tmp_path / "ckpt"
    hf.export(folder, SMALL, params, char_tokenizer())
    return folder


def _rewrite_weights(folder, change):
    path = folder / hf.WEIGHTS_NAME
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_export_then_load_is_the_identity(exported):
    _, params = models.create(SMALL, 0)
    _, back = hf.load(exported, models.from_hf_config(exported))
    assert models.param_names(back) == models.param_names(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)


def test_missing_tensor_is_named(exported):
    _rewrite_weights(exported, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        hf.load(exported, SMALL)


def test_wrong_shape_names_the_tensor_and_both_shapes(exported):
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite_weights(exported, lambda t: t.update({name: np.zeros((8, 32), np.float32)}))
    with pytest.raises(ValueError, match=rf"{name}.*shape \(8, 32\).*expects \(16, 32\)"):
        hf.load(exported, SMALL)


def test_unused_tensors_are_refused_but_known_extras_ignored(exported):
    extras = {
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32),
        "lm_head.weight": np.ones((VOCAB, 32), np.float32),  # tied: the embedding is the head
    }
    _rewrite_weights(exported, lambda t: t.update(extras))
    hf.load(exported, SMALL)
    _rewrite_weights(exported, lambda t: t.update({"model.extra.weight": np.ones(2, np.float32)}))
    with pytest.raises(ValueError, match="no place for: model.extra.weight"):
        hf.load(exported, SMALL)


def test_non_float_tensor_is_refused(exported):
    name = "model.norm.weight"
    _rewrite_weights(exported, lambda t: t.update({name: np.ones(32, np.int8)}))
    with pytest.raises(ValueError, match=f"{name}.*dtype I8"):
        hf.load(exported, SMALL)


def test_bad_folders_fail_clearly(exported, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.from_hf_config(empty)
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_params(empty, SMALL, hf.abstract_params(SMALL)[1])
    config = json.loads((exported / "config.json").read_text())
    (exported / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture model_type='gpt2'"):
        hf.load(exported, SMALL)
    (exported / "config.json").write_text(json.dumps(config))
    (exported / hf.WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        hf.load(exported, SMALL)
    (exported / hf.WEIGHTS_NAME).unlink()
    (exported / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors.*\.bin weights"):
        hf.load(exported, SMALL)
    (exported / hf.INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="shard-1.safetensors"):
        hf.load(exported, SMALL)
    (exported / hf.INDEX_NAME).write_text("{}")
    with pytest.raises(ValueError, match="malformed index"):
        hf.load(exported, SMALL)


def test_unsupported_features_are_named():
    base = models.to_hf_config(SMALL)
    for key, value, message in [
        ("hidden_act", "gelu", "hidden_act='gelu'"),
        ("use_sliding_window", True, "use_sliding_window"),
        ("mlp_bias", True, "mlp_bias"),
    ]:
        with pytest.raises(ValueError, match=message):
            models.from_hf_config({**base, key: value})
    with pytest.raises(ValueError, match="always has QKV biases"):
        models.to_hf_config(SMALL.replace(qkv_bias=False))


def test_hf_config_round_trip_with_llama3_scaling():
    config = SMALL.replace(
        model_type="llama",
        qkv_bias=False,
        tie_word_embeddings=False,
        dtype="bfloat16",
        rope_theta=5e5,
        rope_scaling=(
            ("factor", 8.0),
            ("low_freq_factor", 1.0),
            ("high_freq_factor", 4.0),
            ("original_max_position_embeddings", 16.0),
        ),
    )
    assert models.from_hf_config(models.to_hf_config(config)) == config


def test_tokenizer_without_pad_gets_one(exported):
    tokenizer_config = exported / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings.pop("pad_token", None)
    tokenizer_config.write_text(json.dumps(settings))
    tok = hf.load_tokenizer(exported)
    assert tok.pad_token == "<unk>" and tok.eos_token == "<eos>"
    # The saved pipeline, even in a qwen2 folder (AutoTokenizer would rebuild it as Qwen2's).
    assert tok("ab 1")["input_ids"] == char_tokenizer()("ab 1")["input_ids"] == [30, 31, 26, 9]
    (exported / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="no loadable tokenizer"):
        hf.load_tokenizer(exported)


def test_train_names_a_bad_model_folder(exported, tmp_path):
    from rftjax.config import TrainConfig
    from rftjax.tasks import make_task
    from rftjax.train.loop import run

    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i}+1", "answer": i + 1}) + "\n" for i in range(4))
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = dict(workdir=str(tmp_path / "w"), task=f"jsonl:{data}", steps=1)
    with pytest.raises(FileNotFoundError, match=f"{empty}/config.json"):
        run(TrainConfig(model=str(empty), **cfg))
    config = json.loads((exported / "config.json").read_text())
    (exported / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(ValueError, match="unsupported architecture model_type='mistral'"):
        run(TrainConfig(model=str(exported), **cfg))
    # A checkpoint in the character vocabulary (an exported preset) may train a built-in task.
    (exported / "config.json").write_text(json.dumps(config))
    assert make_task("arith", seed=0, tokenizer=hf.load_tokenizer(exported)).name == "arith"


# --- end to end --------------------------------------------------------------------------


@needs_torch
def test_launch_train_runs_grpo_on_a_hugging_face_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    make_hf_folder(folder, "llama", chat_template=CHAT_TEMPLATE, num_hidden_layers=1)
    rows = [{"question": f"what is {i} plus 1", "answer": f"#### {i + 1}"} for i in range(40)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.train",
            f"--workdir={workdir}",
            f"--model={folder}",
            f"--task=jsonl:{data}",
            "--prompt_field=question",
            "--steps=3",
            "--prompts_per_step=2",
            "--group_size=4",
            "--max_new_tokens=6",
            "--eval_size=4",
            "--eval_every=3",
            "--checkpoint_every=3",
            "--log_every=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps_completed"] == 3 and summary["model"] == str(folder)
    assert summary["warmup_seconds"] == 0.0 and "warm-up: " not in proc.stderr
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["kl_ref"]) and np.isfinite(r["grad_norm"]) for r in records)
    assert records[0]["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # step 1: policy = checkpoint
    assert (workdir / "checkpoints" / "3").exists()


def test_training_keeps_float32_master_weights(exported, tmp_path):
    from rftjax.config import TrainConfig
    from rftjax.tasks import make_task
    from rftjax.train.setup import build_model_config

    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i}+1", "answer": i + 1}) + "\n" for i in range(4))
    )
    task = make_task(f"jsonl:{data}", seed=0, tokenizer=hf.load_tokenizer(exported))
    common = dict(workdir=str(tmp_path / "w"), model=str(exported), task=task.name)
    compute = TrainConfig(**common, model_overrides="dtype=bfloat16")
    assert build_model_config(compute, task) == SMALL.replace(dtype="bfloat16")
    with pytest.raises(ValueError, match="param_dtype='bfloat16'.*float32 master weights"):
        build_model_config(TrainConfig(**common, model_overrides="param_dtype=bfloat16"), task)

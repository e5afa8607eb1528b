"""Model configuration: a frozen dataclass, presets, and Hugging Face config.json import."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_HF_TYPES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Decoder-only transformer hyperparameters (Llama / Qwen2 family).

    Attributes mirror Hugging Face's config.json so that `from_hf_config` is a renaming.
    `qkv_bias` is Qwen2's attention bias; `tie_word_embeddings` reuses `embed_tokens` as the
    output projection. `rope_scaling` holds Llama 3's frequency-scaling parameters or None.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, float], ...] | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    # The projections' matmul operands; "" = `dtype`. "bfloat16" with dtype "float32" is mixed
    # precision: bf16 operands, products accumulated and returned in float32 (`models.mixed`).
    matmul_dtype: str = ""
    model_type: str = "llama"

    def __post_init__(self):
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
        )
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads}) when head_dim is not given"
            )
        if self.resolved_head_dim % 2:
            raise ValueError(
                f"head_dim must be even for rotary embeddings, got {self.resolved_head_dim}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; accepted: {DTYPES}")
        if self.matmul_dtype not in ("", self.dtype, "bfloat16"):
            raise ValueError(
                f"ModelConfig.matmul_dtype={self.matmul_dtype!r} with dtype={self.dtype!r}; "
                f"accepted: '' or {self.dtype!r} (the compute dtype), or 'bfloat16' (bf16 "
                "operands, float32 accumulation)"
            )

    @property
    def mixed_matmuls(self) -> bool:
        """Whether the projections multiply bf16 operands into float32 (`models.mixed`)."""
        return self.matmul_dtype == "bfloat16" and self.dtype == "float32"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def replace(self, **overrides: Any) -> ModelConfig:
        return dataclasses.replace(self, **overrides)


PRESETS: dict[str, ModelConfig] = {
    # The CPU default: ~0.4 M parameters, learns 2-digit addition in seconds.
    "tiny": ModelConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=512,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    # Same trunk with Qwen2's QKV bias and grouped-query attention, for tests.
    "tiny-qwen2": ModelConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=512,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        qkv_bias=True,
        model_type="qwen2",
        rope_theta=1000000.0,
    ),
    "small": ModelConfig(
        vocab_size=64,
        hidden_size=256,
        intermediate_size=1024,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        max_position_embeddings=512,
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(
            f"unknown model preset {name!r}; accepted: {sorted(PRESETS)} or a local "
            "Hugging Face checkpoint folder containing config.json"
        )
    return PRESETS[name]


def parse_overrides(spec: str) -> dict[str, Any]:
    """Parses 'num_layers=2,hidden_size=128' into typed ModelConfig overrides."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" not in item:
            raise ValueError(f"model override {item!r} is not of the form name=value")
        name, value = (s.strip() for s in item.split("=", 1))
        if name not in fields or name == "rope_scaling":
            raise ValueError(
                f"unknown model override {name!r}; accepted: "
                f"{sorted(n for n in fields if n != 'rope_scaling')}"
            )
        default = getattr(PRESETS["tiny"], name)
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[name] = value.lower() in ("true", "1")
            elif isinstance(default, int) or name == "head_dim":
                out[name] = int(value)
            elif isinstance(default, float):
                out[name] = float(value)
            else:
                out[name] = value
        except ValueError:
            raise ValueError(
                f"model override {name}={value!r} is not a valid {type(default).__name__}"
            ) from None
    return out


HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
HF_CONFIG = "config.json"


def read_hf_config(source: str | os.PathLike | dict) -> dict[str, Any]:
    """The parsed config.json of a checkpoint folder (or a path to the file, or a dict).

    Raises:
      FileNotFoundError: naming the folder when it holds no config.json.
      ValueError: naming the file when it is not a JSON object.
    """
    if isinstance(source, dict):
        return source
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, HF_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no Hugging Face config at {path}: a checkpoint folder needs config.json "
            "(with model.safetensors or model.safetensors.index.json and tokenizer files)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return hf


def check_hf_architecture(hf: dict[str, Any]) -> str:
    """Returns ``model_type`` after checking that this model implements the checkpoint.

    Raises:
      ValueError: naming the unsupported architecture or feature (a model type other than
        llama / qwen2, an activation other than SiLU, MLP biases, sliding-window attention).
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_HF_TYPES:
        archs = hf.get("architectures")
        raise ValueError(
            f"unsupported architecture model_type={model_type!r} (architectures={archs}); "
            f"accepted: {SUPPORTED_HF_TYPES}"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act={act!r} for {model_type}; accepted: 'silu'")
    if hf.get("mlp_bias"):
        raise ValueError(f"unsupported mlp_bias=True for {model_type}: the MLP has no biases")
    if hf.get("use_sliding_window"):
        raise ValueError(
            f"unsupported use_sliding_window=True for {model_type}: attention is full-length"
        )
    return model_type


def from_hf_config(source: str | os.PathLike | dict) -> ModelConfig:
    """Builds a ModelConfig from a Hugging Face config.json (path, folder or dict).

    ``dtype`` (compute) follows the checkpoint's ``torch_dtype`` (``dtype`` in transformers>=5):
    bfloat16 checkpoints compute in bfloat16; ``param_dtype`` stays float32 (master weights),
    override it with ``replace(param_dtype="bfloat16")`` to halve parameter memory.

    Raises:
      FileNotFoundError: for a folder without config.json.
      ValueError: for an unsupported architecture, activation or rope type.
    """
    hf = read_hf_config(source)
    model_type = check_hf_architecture(hf)
    # transformers>=5 nests rope settings under rope_parameters; older files use top-level keys.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; accepted: {SUPPORTED_ROPE_TYPES}")
    scaling = None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = tuple((k, float(rope[k])) for k in keys)
    num_heads = int(hf["num_attention_heads"])
    torch_dtype = str(hf.get("torch_dtype", hf.get("dtype", "float32")))
    head_dim = hf.get("head_dim")
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=None if head_dim is None else int(head_dim),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=(model_type == "qwen2") or bool(hf.get("attention_bias", False)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        dtype="bfloat16" if torch_dtype == "bfloat16" else "float32",
        model_type=model_type,
    )


def to_hf_config(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """The Hugging Face config.json of ``config``: the inverse of `from_hf_config`.

    ``from_hf_config(to_hf_config(c)) == c`` for any ``c`` with ``param_dtype="float32"`` and
    ``matmul_dtype=""`` (neither is a checkpoint's property).
    ``extra`` entries (e.g. ``bos_token_id``, ``eos_token_id``) are added as they are. Rope
    settings are written with the top-level keys (``rope_theta``, ``rope_scaling``) that every
    transformers version from 4.46 reads.

    Raises:
      ValueError: for a qwen2 config without QKV biases (Qwen2 always has them).
    """
    if config.model_type == "qwen2" and not config.qkv_bias:
        raise ValueError(
            "model_type='qwen2' always has QKV biases; export a bias-free model as "
            "model_type='llama'"
        )
    hf: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "torch_dtype": config.dtype,
        "use_cache": True,
    }
    if config.head_dim is not None:
        hf["head_dim"] = config.head_dim
    if config.rope_scaling is not None:
        scaling: dict[str, Any] = {"rope_type": "llama3", **dict(config.rope_scaling)}
        scaling["original_max_position_embeddings"] = int(
            scaling["original_max_position_embeddings"]
        )
        hf["rope_scaling"] = scaling
    if config.model_type == "llama":
        hf.update(attention_bias=config.qkv_bias, mlp_bias=False)
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
    hf.update(extra)
    return hf

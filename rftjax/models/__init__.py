"""Llama / Qwen2-style decoder models and their functional interface for compiled code.

Presets are created with random weights (`create`); Hugging Face checkpoint folders are read
and written by `rftjax.models.hf` (`hf.load`, `hf.export`).
"""

from __future__ import annotations

import jax
from flax import nnx

from rftjax.models.config import (
    PRESETS,
    ModelConfig,
    from_hf_config,
    get_preset,
    parse_overrides,
    read_hf_config,
    to_hf_config,
)
from rftjax.models.transformer import (
    KVCache,
    Transformer,
    bind_prepared,
    causal_mask,
    head_logits,
    init_cache,
    map_in_chunks,
    param_names,
    positions_from_valid,
    prepare_matmuls,
)

__all__ = [
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "Transformer",
    "bind_prepared",
    "causal_mask",
    "create",
    "forward",
    "from_hf_config",
    "get_preset",
    "head_logits",
    "init_cache",
    "map_in_chunks",
    "param_names",
    "parse_overrides",
    "positions_from_valid",
    "prepare_matmuls",
    "read_hf_config",
    "to_hf_config",
]


def create(config: ModelConfig, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    """Initializes a model and splits it into a static graph definition and a params pytree."""
    return nnx.split(Transformer(config, rngs=nnx.Rngs(seed)))


def forward(graphdef: nnx.GraphDef, params: nnx.State, tokens, positions, mask, cache=None):
    """Pure forward pass: (logits fp32 [B,S,V], hidden [B,S,E], new cache or None)."""
    return nnx.merge(graphdef, params)(tokens, positions, mask, cache)


def full_forward(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, valid: jax.Array):
    """Forward over whole sequences [B,T] with padding `valid` [B,T] (no cache)."""
    return forward(graphdef, params, tokens, positions_from_valid(valid), causal_mask(valid))

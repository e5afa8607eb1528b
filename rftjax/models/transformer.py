"""Decoder-only transformer (Llama / Qwen2 family) in Flax NNX, with a functional KV cache.

Parameter paths join with "." into Hugging Face safetensors names, and every weight has the
Hugging Face layout ([out, in] for projections), so loading a checkpoint is a pure renaming:
`model.layers.0.self_attn.q_proj.weight`, `model.norm.weight`, `lm_head.weight`, ...

Shapes: B batch, S query length, L key/cache length, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rftjax.models import mixed
from rftjax.models.config import ModelConfig

_NEG_INF = -1e30  # finite, so fully masked rows give a uniform softmax instead of NaN
# Rematerialization of the trunk: "none" keeps every activation for the backward pass;
# "layer" keeps only each decoder layer's input and recomputes the layer in the backward pass
# (jax.checkpoint with `nothing_saveable`: saving the matmul outputs instead would keep the
# attention scores [B, H, S, L], the largest activations of long sequences).
REMAT_MODES = ("none", "layer")


class KVCache(NamedTuple):
    """Per-layer keys/values [B, K, L, D] (heads before slots: the layout attention's batched
    matmuls read, so a decode step never transposes the cache), which slots hold a real token
    [B, L], next write slot."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array  # bool [B, L]
    index: jax.Array  # int32 scalar: slot where the next tokens are written


def init_cache(config: ModelConfig, batch: int, length: int) -> KVCache:
    shape = (batch, config.num_kv_heads, length, config.resolved_head_dim)
    dtype = jnp.dtype(config.dtype)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(
        keys=zeros,
        values=zeros,
        valid=jnp.zeros((batch, length), bool),
        index=jnp.zeros((), jnp.int32),
    )


def rope_frequencies(config: ModelConfig) -> jax.Array:
    """Inverse frequencies [D/2], with Llama 3's long-context scaling when configured."""
    dim = config.resolved_head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if config.rope_scaling is None:
        return inv_freq
    s = dict(config.rope_scaling)
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"]
    )
    smoothed = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    out = jnp.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    is_medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return jnp.where(is_medium, smoothed, out)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding, Hugging Face's rotate-half convention. x [B, S, N, D], positions [B, S]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, S, D/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


class Linear(nnx.Module):
    """y = x W^T + b with W stored as [out, in], as in PyTorch / safetensors."""

    def __init__(self, in_features, out_features, *, bias, config: ModelConfig, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(config.initializer_range)
        self.weight = nnx.Param(
            init(rngs.params(), (out_features, in_features), jnp.dtype(config.param_dtype))
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), config.param_dtype)) if bias else None
        self.dtype = jnp.dtype(config.dtype)
        self.mixed = config.mixed_matmuls
        self.out_features = out_features

    def __call__(self, x: jax.Array) -> jax.Array:
        # A 2-D matmul: XLA:CPU runs dot products that contract over several batch dims (the
        # weight gradient of a [B, S, in] input) about twice as slowly.
        w = self.weight.get_value()  # `mixed.Prepared` where `prepare_matmuls` made it so
        rows = x.astype(self.dtype).reshape(-1, x.shape[-1])
        y = mixed.matmul(rows, w) if self.mixed else jnp.dot(rows, w.astype(self.dtype).T)
        y = y.reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, config: ModelConfig):
        self.weight = nnx.Param(jnp.ones((dim,), config.param_dtype))
        self.eps = config.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def attention(q, k, v, mask, chunk: int = 0):
    """Grouped-query attention. q [B,S,H,D], k/v [B,K,L,D], mask bool [B,S,L] -> [B,S,H,D].

    `chunk` > 0: the queries run `chunk` at a time (`jax.lax.map`), each chunk under
    `jax.checkpoint`, so the scores and probabilities held at once are [B,K,H/K,chunk,L]
    instead of [B,K,H/K,S,L], in the backward pass too (it recomputes them): the same values.
    """
    if not chunk or q.shape[1] <= chunk:
        return _attend(q, k, v, mask)
    # padded queries see no key: a uniform softmax over finite scores, cut off after
    return map_in_chunks(lambda x: _attend(x[0], k, v, x[1]), (q, mask), chunk, axis=1)


def map_in_chunks(fn, xs, chunk: int, axis: int = 0):
    """`fn(xs)` computed `chunk` entries of `axis` at a time: the arrays of `xs` (a pytree, all
    of one size n along `axis`) are zero-padded to whole chunks and run one chunk after another
    (`jax.lax.map`), each under `jax.checkpoint` (the backward recomputes a chunk's
    intermediates instead of keeping every chunk's); `fn` returns a pytree of arrays chunked
    along the same axis, joined and cut back to n. Closed-over arrays are shared by all chunks.
    """
    n = jax.tree.leaves(xs)[0].shape[axis]
    m = -(-n // chunk)

    def split(x):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, m * chunk - n)
        x = jnp.pad(x, pad)
        return jnp.moveaxis(x.reshape(*x.shape[:axis], m, chunk, *x.shape[axis + 1 :]), axis, 0)

    def join(y):
        y = jnp.moveaxis(y, 0, axis)
        y = y.reshape(*y.shape[:axis], m * chunk, *y.shape[axis + 2 :])
        return jax.lax.slice_in_dim(y, 0, n, axis=axis)

    run = jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    return jax.tree.map(join, jax.lax.map(run, jax.tree.map(split, xs)))


def _attend(q, k, v, mask):
    """`attention` of all queries at once."""
    b, s, h, d = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, s, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("bskgd,bkld->bkgsl", q, k).astype(jnp.float32) / math.sqrt(d)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgsl,bkld->bskgd", probs, v)
    return out.reshape(b, s, h, d)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, h, k = config.resolved_head_dim, config.num_heads, config.num_kv_heads
        hidden, bias = config.hidden_size, config.qkv_bias
        self.q_proj = Linear(hidden, h * d, bias=bias, config=config, rngs=rngs)
        self.k_proj = Linear(hidden, k * d, bias=bias, config=config, rngs=rngs)
        self.v_proj = Linear(hidden, k * d, bias=bias, config=config, rngs=rngs)
        self.o_proj = Linear(h * d, hidden, bias=False, config=config, rngs=rngs)
        self.shape = (h, k, d)
        self.query_chunk = 0  # queries at a time in `attention` (0: all); see `learner_graph`

    def __call__(self, x, positions, inv_freq, mask, cache_kv=None, index=None):
        """x [B,S,hidden]; with cache_kv=(k [B,K,L,D], v), writes this chunk at slot `index`."""
        h, kh, d = self.shape
        b, s, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, s, h, d), positions, inv_freq)
        k = apply_rope(self.k_proj(x).reshape(b, s, kh, d), positions, inv_freq)
        v = self.v_proj(x).reshape(b, s, kh, d)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, D]
        if cache_kv is not None:
            zero = jnp.zeros((), jnp.int32)
            k = jax.lax.dynamic_update_slice(
                cache_kv[0], k.astype(cache_kv[0].dtype), (zero, zero, index, zero)
            )
            v = jax.lax.dynamic_update_slice(
                cache_kv[1], v.astype(cache_kv[1].dtype), (zero, zero, index, zero)
            )
        out = attention(q, k, v, mask, self.query_chunk)
        return self.o_proj(out.reshape(b, s, h * d)), (k, v)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(hidden, inter, bias=False, config=config, rngs=rngs)
        self.up_proj = Linear(hidden, inter, bias=False, config=config, rngs=rngs)
        self.down_proj = Linear(inter, hidden, bias=False, config=config, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config=config)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config=config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, inv_freq, mask, cache_kv=None, index=None):
        attn, new_kv = self.self_attn(
            self.input_layernorm(x), positions, inv_freq, mask, cache_kv, index
        )
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), new_kv


class Embedding(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(config.initializer_range)
        shape = (config.vocab_size, config.hidden_size)
        self.weight = nnx.Param(init(rngs.params(), shape, jnp.dtype(config.param_dtype)))


class Backbone(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(config, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config=config)


class Transformer(nnx.Module):
    """Causal LM. Returns fp32 logits [B,S,V], final hidden states [B,S,hidden], new cache."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = Backbone(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(
                config.hidden_size, config.vocab_size, bias=False, config=config, rngs=rngs
            )
        self.remat = "none"  # one of REMAT_MODES; a learner's graph sets it (`learner_graph`)

    def trunk(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final hidden states [B,S,hidden] (after the last norm) and the new cache.

        tokens, positions [B,S] int; mask bool [B,S,L] (L = S without cache, cache length with).
        With a cache, the S new tokens are written at slots [cache.index, cache.index + S) and
        `cache.valid` must already mark those slots; the returned cache has index advanced by S.
        """
        dtype = jnp.dtype(self.config.dtype)
        inv_freq = rope_frequencies(self.config)
        x = self.model.embed_tokens.weight[...].astype(dtype)[tokens]
        new_keys, new_values = [], []
        index = None if cache is None else cache.index
        for i, layer in enumerate(self.model.layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            call = _remat_layer if self.remat == "layer" else _call_layer
            x, (k, v) = call(layer, x, positions, inv_freq, mask, kv, index)
            new_keys.append(k)
            new_values.append(v)
        hidden = self.model.norm(x)
        if cache is None:
            return hidden, None
        return hidden, KVCache(
            tuple(new_keys), tuple(new_values), cache.valid, cache.index + tokens.shape[1]
        )

    def head_weight(self) -> jax.Array:
        """The output projection [V, hidden] (the embedding when the two are tied)."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight[...]
        return self.lm_head.weight[...]

    def head(self, hidden: jax.Array) -> jax.Array:
        """Logits in fp32 [..., V]: log-probs and the RL loss are sensitive to bf16 rounding."""
        return head_logits(self.head_weight(), hidden)

    def __call__(self, tokens, positions, mask, cache=None):
        """(logits fp32 [B,S,V], hidden [B,S,hidden], new cache or None); see `trunk`."""
        hidden, cache = self.trunk(tokens, positions, mask, cache)
        return self.head(hidden), hidden, cache


def head_logits(weight: jax.Array, hidden: jax.Array) -> jax.Array:
    """fp32 logits [..., V] of hidden [..., E] through an output projection weight [V, E]."""
    flat = hidden.reshape(-1, hidden.shape[-1]).astype(jnp.float32)
    return jnp.dot(flat, weight.astype(jnp.float32).T).reshape(*hidden.shape[:-1], weight.shape[0])


def _call_layer(layer, *args):
    return layer(*args)


def _remat_layer(layer, *args):
    """`layer(*args)` under `jax.checkpoint` (policy `nothing_saveable`): the backward pass keeps
    the layer's inputs only and recomputes the rest. A layer call mutates nothing, so its state
    goes in as a plain argument (no graph updates to propagate out of the checkpoint)."""
    graphdef, state = nnx.split(layer)
    run = lambda st, *a: nnx.merge(graphdef, st)(*a)  # noqa: E731
    return jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)(state, *args)


def _abstract_model(graphdef: nnx.GraphDef, params: nnx.State) -> Transformer:
    """The model merged with abstract leaves: no traced value is touched (this may run inside
    a trace); for reading and changing its static structure."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return nnx.merge(graphdef, abstract)


def learner_graph(
    graphdef: nnx.GraphDef, params: nnx.State, *, remat: str = "none", attention_chunk: int = 0
) -> nnx.GraphDef:
    """The graph of the same model as a learner runs it: with `remat` (one of REMAT_MODES)
    rematerialization, and attention computed `attention_chunk` queries at a time (0: all;
    see `attention`). The sampler keeps its own graph (decoding is not differentiated, and
    decodes one query a row). The parameters are unchanged; only the static graph differs."""
    if remat not in REMAT_MODES:
        raise ValueError(f"remat={remat!r} is not supported; accepted: {', '.join(REMAT_MODES)}")
    if attention_chunk < 0:
        raise ValueError(f"attention_chunk must be >= 0 (0: all at once), got {attention_chunk}")
    if remat == "none" and not attention_chunk:  # every graph is built that way
        return graphdef
    model = _abstract_model(graphdef, params)
    model.remat = remat
    for layer in model.model.layers:
        layer.self_attn.query_chunk = attention_chunk
    return nnx.split(model)[0]


def prepare_matmuls(graphdef: nnx.GraphDef, params: nnx.State, *, backward: bool = False):
    """params with the weight of each layer projection that multiplies in bf16
    (`ModelConfig.matmul_dtype`) made a `mixed.Prepared`: forwards that take the result reuse
    its transposed bf16 operand instead of making it per call (length buckets, decode phases,
    micro-batches). `backward`: also the rounded weight its gradient reads. The same values;
    params itself when no layer multiplies in bf16. Under a gradient, close over the result and
    `bind_prepared` the differentiated params into it."""
    paths = {(*path, "weight") for path, m in nnx.iter_modules(_abstract_model(graphdef, params))
             if isinstance(m, Linear) and m.mixed and path[:1] == ("model",)}  # fmt: skip
    if not paths:  # (the output projection is read as a weight, never called: not prepared)
        return params

    def one(path, v):
        if path not in paths or isinstance(v.get_value(), mixed.Prepared):  # (prepared before)
            return v
        return v.replace(mixed.prepare(v.get_value(), backward=backward))

    return nnx.from_flat_state([(path, one(path, v)) for path, v in nnx.to_flat_state(params)])


def bind_prepared(prepared: nnx.State, params: nnx.State) -> nnx.State:
    """`prepared` (from `prepare_matmuls`) with each weight taken from params (same structure
    before preparing): the operands made once, the gradient flowing to these params."""

    def bind(w, p):
        return dataclasses.replace(p, weight=w) if isinstance(p, mixed.Prepared) else w

    return jax.tree.map(bind, params, prepared)


def causal_mask(valid: jax.Array) -> jax.Array:
    """Self-attention mask for a full sequence: valid bool [B,T] -> [B,T,T] (query, key)."""
    t = valid.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return causal[None] & valid[:, None, :]


def positions_from_valid(valid: jax.Array) -> jax.Array:
    """Rotary positions that skip padding: the i-th real token of a row gets position i."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def param_names(params: nnx.State) -> dict[str, tuple[int, ...]]:
    """Flat `a.b.0.c` names (the Hugging Face names) -> shapes."""
    flat = nnx.to_flat_state(params)
    return {".".join(str(p) for p in path): tuple(v.shape) for path, v in flat}

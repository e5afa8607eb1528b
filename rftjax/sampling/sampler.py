"""Compiled batched generation with a KV cache, and the trainer's log-probs of the same tokens.

Prompts are left-padded to a common length P, so every row writes its n-th new token into
cache slot P + n and one scalar write index serves the whole batch. Responses are [B, N]: the
EOS token is part of the response; everything after it is pad with response mask 0.

Log-prob convention (shared by sampler and trainer, so importance ratios are exactly 1 when
nothing is wrong): log-softmax of logits / T over the full vocabulary, where T is the sampling
temperature (T <= 0 means greedy and log-probs at T = 1). Top-k / top-p restrict which tokens
may be drawn but not the reported log-probs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rftjax.models import (
    KVCache,
    full_forward,
    head_logits,
    init_cache,
    map_in_chunks,
    positions_from_valid,
    prepare_matmuls,
)
from rftjax.parallel import constrain_cache
from rftjax.tools.protocol import LIMIT, TIMEOUT, TOOL_ERROR, ToolResult


class SamplingParams(NamedTuple):
    """Runtime sampler settings (scalars; changing them never recompiles)."""

    temperature: jax.Array  # <= 0: greedy
    top_p: jax.Array  # 1.0: off
    top_k: jax.Array  # int32, <= 0: off
    max_tokens: jax.Array | int = 0  # int32, stop after this many new tokens; <= 0: N


def sampling_params(temperature=1.0, top_p=1.0, top_k=0, max_tokens=0) -> SamplingParams:
    return SamplingParams(
        jnp.asarray(temperature, jnp.float32),
        jnp.asarray(top_p, jnp.float32),
        jnp.asarray(top_k, jnp.int32),
        jnp.asarray(max_tokens, jnp.int32),
    )


class Rollout(NamedTuple):
    """A batch of generations. B rows, P prompt slots, N response slots."""

    tokens: jax.Array  # int32 [B, P+N]: prompt then response
    valid: jax.Array  # bool [B, P+N]: real tokens (prompt mask, then response mask)
    response: jax.Array  # int32 [B, N]
    response_mask: jax.Array  # float32 [B, N]
    logp: jax.Array  # float32 [B, N]: sampler log-probs, 0 where masked
    lengths: jax.Array  # int32 [B]
    truncated: jax.Array  # bool [B]: no EOS within N tokens
    # Tool use (None without tools): per-row counts int32 [B] and aborted bool [B].
    tool_calls: jax.Array | None = None
    tool_errors: jax.Array | None = None
    turns: jax.Array | None = None
    aborted: jax.Array | None = None
    # Calls the environment failed to serve (the tool raised or timed out), int32 [B]: unlike a
    # parse error or the turn limit, not the policy's doing.
    tool_failures: jax.Array | None = None


def log_probs(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """Log-softmax at the sampling temperature (T <= 0 -> T = 1). logits [..., V].

    T is floored at 1e-3 (a knob set lower would overflow logits / T in float32), and the max
    logit is subtracted before dividing, so large logits stay finite at small T.
    """
    t = jnp.where(temperature > 0, jnp.maximum(temperature, 1e-3), 1.0)
    x = logits.astype(jnp.float32)
    x = x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    return jax.nn.log_softmax(x / t, axis=-1)


def _restrict(logits: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Sets logits outside the top-k / nucleus (top-p) set to -inf. logits [B, V].

    Tokens whose logit ties exactly with the cutoff are all kept, so on exact ties top-k may
    keep more than k tokens.
    """
    vocab = logits.shape[-1]
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    rank = jnp.arange(vocab)
    in_k = (top_k <= 0) | (rank < top_k)
    sorted_logits = jnp.where(in_k, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & ((mass_before < top_p) | (rank == 0))
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def sample_token(logits: jax.Array, key: jax.Array, params: SamplingParams, rows=None):
    """Draws one token per row. logits [B, V] -> (tokens int32 [B], log-probs [B]).

    `rows`: None, or (B0, idx int32 [B]) when the B rows are rows `idx` of a batch of B0: each
    row then gets the draw it would get in that batch (the Gumbel noise of the B0 × V draw that
    `jax.random.categorical` makes, at its rows), so compacting a batch changes no token."""
    logp_all = log_probs(logits, params.temperature)
    restricted = jax.lax.cond(
        (params.top_p < 1.0) | (params.top_k > 0),
        lambda lg: _restrict(lg, params.top_p, params.top_k),
        lambda lg: lg,
        logp_all,
    )
    if rows is None:
        drawn = jax.random.categorical(key, restricted, axis=-1)
    else:
        full, idx = rows
        noise = jax.random.gumbel(key, (full, restricted.shape[-1]), restricted.dtype)
        drawn = jnp.argmax(restricted + noise[idx], axis=-1)
    greedy = jnp.argmax(logits, axis=-1)
    tokens = jnp.where(params.temperature > 0, drawn, greedy).astype(jnp.int32)
    return tokens, jnp.take_along_axis(logp_all, tokens[:, None], axis=-1)[:, 0]


class _Tools(NamedTuple):
    """Per-row tool state inside the decode loop."""

    queue: jax.Array  # int32 [B, R]: observation tokens still to feed
    qlen: jax.Array  # int32 [B]
    qpos: jax.Array  # int32 [B]: next queue slot
    opened: jax.Array  # int32 [B]: position of the open <call>, -1 if none
    calls: jax.Array  # int32 [B]
    errors: jax.Array  # int32 [B]
    failures: jax.Array  # int32 [B]: errors of the environment's own (tool raised, timeout)
    aborted: jax.Array  # bool [B]
    obs: jax.Array  # float32 [B, N]: 1 on observation tokens


class _Loop(NamedTuple):
    i: jax.Array
    response: jax.Array
    logp: jax.Array
    mask: jax.Array  # float32 [B, N]: tokens the policy sampled
    done: jax.Array
    cache: object
    tools: _Tools | None = None


def _init_loop(b: int, n: int, pad_id: int, cache, tools) -> _Loop:
    """An empty response buffer of B rows × N slots at position 0."""
    zeros = jnp.zeros((b, n))
    return _Loop(
        i=jnp.zeros((), jnp.int32),
        response=jnp.full((b, n), pad_id, jnp.int32),
        logp=zeros,
        mask=zeros,
        done=jnp.zeros((b,), bool),
        cache=cache,
        tools=None if tools is None else _init_tools(b, n, tools),
    )


def _init_tools(b: int, n: int, spec) -> _Tools:
    zeros = jnp.zeros((b,), jnp.int32)
    return _Tools(
        queue=jnp.zeros((b, spec.max_obs), jnp.int32),
        qlen=zeros,
        qpos=zeros,
        opened=zeros - 1,
        calls=zeros,
        errors=zeros,
        failures=zeros,
        aborted=jnp.zeros((b,), bool),
        obs=jnp.zeros((b, n)),
    )


def _serve(spec, response, opened, rows, i, tool_hook=None) -> ToolResult:
    """One host round-trip for the rows that closed a call at position i, then `tool_hook`
    on its result; both skipped (no host call, no hook work) when there are none."""
    b, r = response.shape[0], spec.max_obs
    shapes = (
        jax.ShapeDtypeStruct((b, r), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
    )

    def call(args):
        out = jax.pure_callback(spec.serve, shapes, *args, vmap_method="sequential")
        result = ToolResult(*out, jnp.zeros((b,), bool))
        return tool_hook(result, rows, i) if tool_hook is not None else result

    def skip(args):
        del args
        return ToolResult(*(jnp.zeros(x.shape, x.dtype) for x in shapes), jnp.zeros((b,), bool))

    return jax.lax.cond(jnp.any(rows), call, skip, (response, opened, rows, i))


def _emit(s: _Loop, i, tok, lp, *, eos_id, pad_id, spec, tool_hook) -> _Loop:
    """Writes position i of every row: the sampled token, or for a row that is being fed an
    observation, the next observation token (attention 1, policy mask 0, log-prob 0); then
    serves the calls that this position closed."""
    active = ~s.done
    t = s.tools
    if t is not None:
        forced = active & (t.qpos < t.qlen)
        queued = jnp.take_along_axis(t.queue, jnp.minimum(t.qpos, spec.max_obs - 1)[:, None], 1)
        tok = jnp.where(forced, queued[:, 0], tok)
    else:
        forced = jnp.zeros_like(active)
    policy = active & ~forced
    tok = jnp.where(active, tok, pad_id)
    put = lambda buf, col: jax.lax.dynamic_update_slice_in_dim(buf, col[:, None], i, axis=1)
    s = s._replace(
        response=put(s.response, tok),
        logp=put(s.logp, jnp.where(policy, lp, 0.0)),
        mask=put(s.mask, policy.astype(jnp.float32)),
        done=s.done | (policy & (tok == eos_id)),
    )
    if t is None:
        return s
    opened = jnp.where(policy & (tok == spec.call_start), i, t.opened)
    closed = policy & (tok == spec.call_end)
    over = closed & (t.calls >= spec.max_turns)
    rows = closed & ~over
    res = _serve(spec, s.response, opened, rows, i, tool_hook)
    status = jnp.where(over, LIMIT, res.status)
    aborted = t.aborted | over | (rows & res.abort)
    t = _Tools(
        queue=jnp.where(rows[:, None], res.tokens, t.queue),
        qlen=jnp.where(rows, res.length, t.qlen),
        qpos=jnp.where(rows, 0, t.qpos + forced),
        opened=jnp.where(closed, -1, opened),
        calls=t.calls + rows,
        errors=t.errors + (closed & (status != 0)),
        failures=t.failures + (rows & ((status == TOOL_ERROR) | (status == TIMEOUT))),
        aborted=aborted,
        obs=put(t.obs, forced.astype(jnp.float32)),
    )
    return s._replace(done=s.done | aborted, tools=t)


DECODE_PHASE = 16  # response positions a decode phase covers, at least
MAX_DECODE_PHASES = 8
COMPACT_MIN_ROWS = 8  # batches smaller than this decode every phase with all their rows


def prefill(model, prompts: jax.Array, prompt_mask: jax.Array, length: int):
    """Runs the left-padded prompts [Bp, P] into a fresh cache of `length` slots.

    Returns the last prompt position's hidden state [Bp, E] (it predicts the first response
    token) and the cache with the prompt written at slots [0, P).
    """
    bp, p = prompts.shape
    prompt_valid = prompt_mask.astype(bool)
    cache = init_cache(model.config, bp, length)
    valid = jnp.zeros((bp, length), bool).at[:, :p].set(prompt_valid)
    cache = cache._replace(valid=valid)
    mask = (jnp.arange(length)[None, :] <= jnp.arange(p)[:, None])[None] & valid[:, None, :]
    hidden, cache = model.trunk(prompts, positions_from_valid(prompt_valid), mask, cache)
    return hidden[:, -1], cache


def repeat_rows(tree, group_size: int):
    """Repeats every row of every array group_size times (a group's rows stay contiguous)."""
    if group_size == 1:
        return tree
    return jax.tree.map(lambda x: jnp.repeat(x, group_size, axis=0) if x.ndim else x, tree)


def generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompts: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    sampling: SamplingParams,
    *,
    group_size: int = 1,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    logits_hook: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    tools=None,
    tool_hook: Callable | None = None,
    mesh=None,
) -> Rollout:
    """Samples group_size completions of each prompt; B = Bp × group_size rows.

    The unique prompts [Bp, P] are prefilled once and their cache is shared by the group; then
    up to N tokens (or `sampling.max_tokens` when smaller and > 0) are decoded in a while loop
    that stops when every row has emitted EOS, in phases (`decode_phases`) whose caches hold
    only the slots they can reach. Each phase after the first runs only the unfinished rows,
    gathered into the smallest of `row_sizes(B)` that holds them and written back after it
    (not with tools or a mesh; each size is its own loop body); every row draws the token it
    would draw in the full batch. `logits_hook(logits [R, V], i)` may change the logits of
    decode position i of the R rows decoded there before sampling (fault injection: a
    mismatched engine).

    With `tools` (a `rftjax.tools.ToolSpec`), a row that samples ``</call>`` is answered by the
    environment (one host round-trip per position for all rows that closed a call there) and
    the observation is fed to the model token by token through the same KV cache: those
    positions are real context (`Rollout.valid`) but not the policy's tokens
    (`response_mask` 0, log-prob 0). `tool_hook(result, rows, i)` may change a round-trip's
    `ToolResult` (fault injection: a failing or corrupted tool).

    With a `mesh` (`rftjax.parallel`), the KV cache is sharded like the batch (rows on the
    data axes, kv heads on tensor).
    """
    hook = logits_hook or (lambda x, i: x)
    model = nnx.merge(graphdef, prepare_matmuls(graphdef, params))  # once for every phase
    p, n = prompts.shape[1], max_new_tokens
    ends = decode_phases(n)
    last_hidden, cache = prefill(model, prompts, prompt_mask, p + ends[0])
    cache = constrain_cache(repeat_rows(cache, group_size), mesh)
    prompts, prompt_mask = repeat_rows((prompts, prompt_mask), group_size)
    b = prompts.shape[0]
    prompt_valid = prompt_mask.astype(bool)
    prompt_lens = prompt_valid.sum(-1).astype(jnp.int32)
    logits = hook(repeat_rows(model.head(last_hidden), group_size), jnp.zeros((), jnp.int32))
    tok, lp = sample_token(logits, jax.random.fold_in(key, 0), sampling)
    limit = jnp.where(sampling.max_tokens > 0, jnp.minimum(sampling.max_tokens, n), n)

    state = _init_loop(b, n, pad_id, cache, tools)._replace(i=jnp.ones((), jnp.int32))
    emit = functools.partial(_emit, eos_id=eos_id, pad_id=pad_id, spec=tools, tool_hook=tool_hook)
    state = emit(state, jnp.zeros((), jnp.int32), tok, lp)

    def phase(end: int, lens: jax.Array, rows):
        """Decode positions up to `end` with a cache of p + end slots: attention reads only
        the slots a phase can have written (the cache is most of a decode step's reads).
        `lens`: the rows' prompt lengths; `rows`: None, or (b, idx) for a compacted batch."""
        slots = jnp.arange(p + end)

        def cond(s: _Loop):
            return (s.i < jnp.minimum(limit, end)) & ~jnp.all(s.done)

        def body(s: _Loop):
            prev = s.i - 1
            slot = p + prev
            prev_tok = jax.lax.dynamic_slice_in_dim(s.response, prev, 1, axis=1)
            real = s.mask if s.tools is None else s.mask + s.tools.obs
            prev_real = jax.lax.dynamic_slice_in_dim(real, prev, 1, axis=1) > 0
            c = s.cache
            c = c._replace(valid=jax.lax.dynamic_update_slice_in_dim(c.valid, prev_real, slot, 1))
            step_mask = ((slots <= slot)[None, :] & c.valid)[:, None, :]
            pos = (lens + prev)[:, None]
            hidden, c = model.trunk(prev_tok, pos, step_mask, c)
            logits = hook(model.head(hidden[:, 0]), s.i)
            tok, lp = sample_token(logits, jax.random.fold_in(key, s.i), sampling, rows)
            return emit(s._replace(cache=c), s.i, tok, lp)._replace(i=s.i + 1)

        return cond, body

    def compacted(end: int, size: int):
        """The phase run on the first `size` unfinished rows only (every unfinished row is
        among them), then written back into the batch."""

        def run(s: _Loop) -> _Loop:
            if size == b:
                return jax.lax.while_loop(*phase(end, prompt_lens, None), s)
            idx = jnp.argsort(s.done, stable=True)[:size]
            out = jax.lax.while_loop(*phase(end, prompt_lens[idx], (b, idx)), _take_rows(s, idx))
            return _put_rows(s, idx, out)

        return run

    sizes = row_sizes(b) if tools is None and mesh is None else (b,)

    def after(j: int, s: _Loop) -> _Loop:
        """Phases j, j + 1, ... (none once every row is done or the limit is reached: their
        cache is never extended nor copied); the final state, without its cache."""
        if j == len(ends):
            return s._replace(cache=None)

        def more(s: _Loop) -> _Loop:
            s = s._replace(cache=constrain_cache(extend_cache(s.cache, p + ends[j]), mesh))
            runs = [compacted(ends[j], size) for size in sizes]
            s = runs[0](s) if len(runs) == 1 else jax.lax.switch(size_index(s.done, sizes), runs, s)
            return after(j + 1, s)

        stop = jnp.all(s.done) | (s.i >= limit)
        return jax.lax.cond(stop, lambda s: s._replace(cache=None), more, s)

    state = compacted(ends[0], b)(state)  # every row, no copy
    return _finish(prompts, prompt_valid, after(1, state))


def row_sizes(b: int) -> tuple[int, ...]:
    """The batch sizes a decode phase after the first may run with: b, ⌈3b/4⌉, ⌈b/2⌉, ⌈b/4⌉
    (each phase runs the smallest that holds its unfinished rows; each size compiles its own
    loop body per phase); (b,) alone below `COMPACT_MIN_ROWS` rows."""
    if b < COMPACT_MIN_ROWS:
        return (b,)
    return tuple(sorted({b, -(-3 * b // 4), -(-b // 2), -(-b // 4)}, reverse=True))


def size_index(done: jax.Array, sizes: tuple[int, ...]) -> jax.Array:
    """Index into `sizes` (descending) of the smallest that holds the unfinished rows of
    `done` bool [b]; 0 (all rows, nothing to copy) once every row is done."""
    left = jnp.sum(~done)
    return jnp.where(left > 0, jnp.sum(left <= jnp.asarray(sizes[1:], jnp.int32)), 0)


def _take_rows(s: _Loop, idx: jax.Array) -> _Loop:
    """Rows `idx` of a loop state, its cache's rows with them (scalars as they are, as in
    `repeat_rows`)."""
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0) if x.ndim else x, s)


def _put_rows(s: _Loop, idx: jax.Array, rows: _Loop) -> _Loop:
    """`s` with rows `idx` (distinct) replaced by `rows`, and the scalars (position, cache
    index) of `rows`."""
    put = lambda x, y: x.at[idx].set(y, unique_indices=True) if x.ndim else y  # noqa: E731
    return jax.tree.map(put, s, rows)


def decode_phases(n: int) -> tuple[int, ...]:
    """Where the decode loop's phases end (response positions, the last = n): phases of
    `DECODE_PHASE` positions, at most `MAX_DECODE_PHASES` of them (each phase compiles its
    own loop body)."""
    size = max(DECODE_PHASE, -(-n // MAX_DECODE_PHASES))
    return tuple(range(size, n, size)) + (n,)


def extend_cache(cache: KVCache, length: int) -> KVCache:
    """The cache with empty slots appended up to `length` (keys, values 0; valid False)."""
    more = length - cache.valid.shape[1]
    return cache._replace(
        keys=tuple(_more_slots(x, more) for x in cache.keys),
        values=tuple(_more_slots(x, more) for x in cache.values),
        valid=jnp.pad(cache.valid, [(0, 0), (0, more)]),
    )


def _more_slots(x: jax.Array, more: int) -> jax.Array:
    """Keys or values [B, K, L, D] with `more` empty slots (zeros) appended; as is for 0."""
    return jnp.pad(x, [(0, 0), (0, 0), (0, more), (0, 0)]) if more else x


def _finish(prompts, prompt_valid, final: _Loop) -> Rollout:
    mask, t = final.mask, final.tools
    real = mask if t is None else mask + t.obs
    ro = Rollout(
        tokens=jnp.concatenate([prompts, final.response], axis=1),
        valid=jnp.concatenate([prompt_valid, real > 0], axis=1),
        response=final.response,
        response_mask=mask,
        logp=final.logp,
        lengths=mask.sum(-1).astype(jnp.int32),
        truncated=~final.done,
    )
    if t is None:
        return ro
    return ro._replace(
        tool_calls=t.calls,
        tool_errors=t.errors,
        turns=t.calls + 1,
        aborted=t.aborted,
        tool_failures=t.failures,
    )


def generate_recompute(
    graphdef,
    params,
    prompts,
    prompt_mask,
    key,
    sampling,
    *,
    group_size=1,
    max_new_tokens,
    eos_id,
    pad_id,
    logits_hook=None,
    tools=None,
    tool_hook=None,
) -> Rollout:
    """Reference decoder without a cache: a full forward over the whole buffer per new token.

    Same interface and same random draws as `generate`; used to check the cache (also across
    tool observations) and to measure what the cache saves.
    """
    prompts, prompt_mask = repeat_rows((prompts, prompt_mask), group_size)
    b, p = prompts.shape
    n = max_new_tokens
    prompt_valid = prompt_mask.astype(bool)
    limit = jnp.where(sampling.max_tokens > 0, jnp.minimum(sampling.max_tokens, n), n)
    emit = functools.partial(_emit, eos_id=eos_id, pad_id=pad_id, spec=tools, tool_hook=tool_hook)
    init = _init_loop(b, n, pad_id, None, tools)

    def body(i, s):
        real = s.mask if s.tools is None else s.mask + s.tools.obs
        tokens = jnp.concatenate([prompts, s.response], axis=1)
        valid = jnp.concatenate([prompt_valid, real > 0], axis=1)
        logits, _, _ = full_forward(graphdef, params, tokens, valid)
        last = jax.lax.dynamic_index_in_dim(logits, p + i - 1, axis=1, keepdims=False)
        if logits_hook is not None:
            last = logits_hook(last, i)
        tok, lp = sample_token(last, jax.random.fold_in(key, i), sampling)
        # Rows that are done stay as they are; past the limit nothing is written.
        return jax.tree.map(lambda new, old: jnp.where(i < limit, new, old), emit(s, i, tok, lp), s)

    return _finish(prompts, prompt_valid, jax.lax.fori_loop(0, n, body, init))


def response_logprobs(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompts: jax.Array,
    prompt_mask: jax.Array,
    response: jax.Array,
    response_mask: jax.Array,
    temperature: jax.Array,
    *,
    buckets: int = 1,
    logits_chunk: int = 0,
):
    """The trainer's view of a rollout, with the prompt computed once per group.

    prompts [Bp, P] (unique, left-padded) and response [B, N] with B = Bp × G (a group's rows
    contiguous). The prompt's keys and values are shared by the G completions (gradients from
    all of them flow back through the one prompt pass), which makes this 2-3× cheaper than a
    forward over B × (P + N) tokens and mathematically the same.

    Returns per-token log-probs [B, N] of the response tokens, entropies [B, N] of the same
    (tempered) distributions, and the hidden states [B, N, E] that predicted them (for a value
    head: V(s_t) is read from the state before token t is emitted).

    With `buckets` > 1, the padding after each row's last real token is not computed: the B
    rows are sorted by length (their last real slot, `response_mask`) into `buckets` chunks of
    B / buckets rows, computed one after another (`jax.lax.scan`); each chunk runs at the
    smallest of `bucket_sizes(N, buckets)` that holds its longest row (`jax.lax.switch`: one
    compiled forward per size). Outputs come back in the rows' own order; slots past a chunk's
    size are 0, every slot up to a row's last real token is the same (up to float rounding).
    The prompts still run once per group, before the chunks (`prompt_pass`); each chunk's rows
    read their own prompt's keys and values. Worth it when responses are long and their
    lengths spread. B must be divisible by `buckets`.

    With `logits_chunk` > 0, the vocabulary logits are computed that many tokens at a time and
    recomputed in the backward pass (`token_logprobs`): the same values, with B·N·V floats of
    logits never held at once.
    """
    if buckets > 1:
        return _bucketed(graphdef, params, prompts, prompt_mask, response, response_mask,
                         temperature, buckets, logits_chunk)  # fmt: skip
    (bp, p), (b, n) = prompts.shape, response.shape
    group_size = b // bp
    first = repeat_rows(prompt_pass(graphdef, params, prompts, prompt_mask, p + n), group_size)
    return after_prompt(graphdef, params, first, repeat_rows(prompt_mask, group_size), response,
                        response_mask, temperature, logits_chunk=logits_chunk)  # fmt: skip


class PromptPass(NamedTuple):
    """Prompts run through the model once, for the completions that follow them: the last
    prompt position's hidden state [B, E] (it predicts the first response token) and each
    layer's keys and values [B, K, L, D], the prompt's at slots [0, P) of L >= P."""

    last_hidden: jax.Array
    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]


def prompt_pass(graphdef, params, prompts, prompt_mask, length: int = 0) -> PromptPass:
    """The `PromptPass` of the left-padded prompts [B, P], in a cache of `length` slots (0: P)."""
    model = nnx.merge(graphdef, params)
    last_hidden, cache = prefill(model, prompts, prompt_mask, length or prompts.shape[1])
    return PromptPass(last_hidden, cache.keys, cache.values)


def after_prompt(graphdef, params, first: PromptPass, prompt_mask, response, response_mask,
                 temperature, *, logits_chunk: int = 0):  # fmt: skip
    """`response_logprobs` of B rows whose prompts already ran (`first`, one row each, with
    their masks prompt_mask [B, P]): each response [B, N] attends to its row's prompt keys and
    values (a cache shorter than P + N slots is extended with empty ones). Differentiable in
    `params` and `first`: a gradient through `first` reaches the prompt's pass wherever it ran
    (once per group, `update.gradients`)."""
    model = nnx.merge(graphdef, params)
    n, p = response.shape[1], prompt_mask.shape[1]
    more = p + n - first.keys[0].shape[2]
    prompt_valid = prompt_mask.astype(bool)
    valid = jnp.concatenate([prompt_valid, response_mask > 0], axis=1)
    keys, values = (tuple(_more_slots(x, more) for x in kv) for kv in (first.keys, first.values))
    cache = KVCache(keys, values, valid, jnp.asarray(p, jnp.int32))
    causal = jnp.arange(p + n)[None, :] <= (p + jnp.arange(n))[:, None]  # [N, P+N]
    positions = prompt_valid.sum(-1, keepdims=True) + jnp.arange(n)[None, :]
    hidden_r, _ = model.trunk(response, positions, causal[None] & valid[:, None, :], cache)
    # Token t is predicted by the state before it: the prompt's last state for t = 0.
    hidden = jnp.concatenate([first.last_hidden[:, None], hidden_r[:, :-1]], 1)
    logp, entropy = token_logprobs(model.head_weight(), hidden, response, temperature,
                                   logits_chunk)  # fmt: skip
    return logp, entropy, hidden


def _token_terms(weight, hidden, tokens, temperature):
    logp_all = log_probs(head_logits(weight, hidden), temperature)
    logp = jnp.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0]
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def token_logprobs(weight, hidden, tokens, temperature, chunk: int = 0):
    """Log-probs of `tokens` [B, N] and the entropies of their (tempered) distributions, from
    the states that predicted them (hidden [B, N, E]) through the output projection weight
    [V, E].

    `chunk` > 0: the B·N tokens run `chunk` at a time (`jax.lax.map`), each chunk's logits
    under `jax.checkpoint`, so neither the forward nor the backward holds more than about
    chunk × V floats of logits and softmax (the backward recomputes them) instead of B·N·V —
    at a 151,936-token vocabulary, 64 × 1,024 response tokens of fp32 logits are 37 GiB.
    """
    b, n = tokens.shape
    if not chunk or chunk >= b * n:
        return _token_terms(weight, hidden, tokens, temperature)
    flat = (hidden.reshape(b * n, -1), tokens.reshape(b * n))
    terms = map_in_chunks(lambda x: _token_terms(weight, *x, temperature), flat, chunk)
    return tuple(x.reshape(b, n) for x in terms)


def bucket_sizes(n: int, buckets: int) -> tuple[int, ...]:
    """The response lengths a bucketed forward compiles: ⌈n·i / buckets⌉ for i = 1..buckets."""
    return tuple(-(-n * i // buckets) for i in range(1, buckets + 1))


def response_ends(real: jax.Array) -> jax.Array:
    """i32[B]: one past each row's last real slot of real bool[B, N] (0 for an empty row)."""
    return jnp.max(jnp.where(real, jnp.arange(1, real.shape[1] + 1), 0), axis=1)


def switch_on_length(branches: dict, longest: jax.Array, *args):
    """`branches[t](*args)` for the smallest size t (the dict's keys, ascending) >= `longest`
    (`jax.lax.switch`: every branch is compiled, one runs)."""
    sizes = sorted(branches)
    index = jnp.searchsorted(jnp.asarray(sizes), longest)
    return jax.lax.switch(index, [branches[t] for t in sizes], *args)


def pad_slots(x: jax.Array, n: int) -> jax.Array:
    """[B, t, ...] -> [B, n, ...]: zeros after the first t slots."""
    return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _bucketed(graphdef, params, prompts, prompt_mask, response, response_mask, temp, buckets,
              logits_chunk):  # fmt: skip
    """`response_logprobs` with `buckets` > 1 (see there)."""
    (bp, _), (b, n) = prompts.shape, response.shape
    if b % buckets:
        raise ValueError(f"{b} rows cannot be split into {buckets} equal length buckets")
    params = prepare_matmuls(graphdef, params)  # once for every bucket
    first = prompt_pass(graphdef, params, prompts, prompt_mask)  # once per prompt
    needed = response_ends(response_mask > 0)
    order = jnp.argsort(needed, stable=True)
    by_row = order // (b // bp)  # each sorted row's prompt

    def chunks(x):
        return x.reshape(buckets, b // buckets, *x.shape[1:])

    def at(t: int):
        def run(rows, resp, rmask):
            mine = jax.tree.map(lambda x: x[rows], first)
            out = after_prompt(graphdef, params, mine, prompt_mask[rows], resp[:, :t],
                               rmask[:, :t], temp, logits_chunk=logits_chunk)  # fmt: skip
            return tuple(pad_slots(x, n) for x in out)

        return run

    def chunk(_, xs):
        *arrays, longest = xs
        branches = {t: at(t) for t in bucket_sizes(n, buckets)}
        return None, switch_on_length(branches, longest, *arrays)

    xs = (by_row, response[order], response_mask[order])
    xs = (*map(chunks, xs), chunks(needed[order]).max(axis=1))
    _, outs = jax.lax.scan(chunk, None, xs)
    inverse = jnp.argsort(order)
    return tuple(x.reshape(b, *x.shape[2:])[inverse] for x in outs)

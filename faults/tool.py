"""Tool-environment faults (TE1-TE2): tools that fail, and observations that arrive wrong.

They act on a round-trip's `ToolResult` (tokens [B, R], length, status, abort) for the rows
the environment served at decode position i, inside the compiled sampler. They need a task
with tools: `Setup.tools` is its `ToolSpec` (error observations per status come from it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from faults.base import Ctx, Fault, Hooks, Setup, is_variant

# Status codes of the tool protocol (rftjax.tools.protocol); faults do not import rftjax.
_OK, _TOOL_ERROR, _TIMEOUT = 0, 2, 3


def _needs_tools(type_id: str, setup: Setup):
    if setup.tools is None:
        raise ValueError(f"fault {type_id} acts on tool calls: it needs a task with tools")
    return setup.tools


def _hits(ctx: Ctx, rows, i):
    """bool[B]: served rows this call hits, each with probability `magnitude`."""
    key = jax.random.fold_in(ctx.key, i)
    return ctx.active & rows & (jax.random.uniform(key, rows.shape) < ctx.magnitude)


def _rows(hit, new, old):
    """`new` in the rows where `hit` [B], else `old`, for leaves [B] and [B, R]."""
    pick = lambda n, o: jnp.where(hit.reshape(hit.shape + (1,) * (o.ndim - 1)), n, o)
    return jax.tree.map(pick, new, old)


def _answer(result, hit, status: int, spec):
    """The result with the rows in `hit` answered by the observation of `status`."""
    tokens = jnp.broadcast_to(jnp.asarray(spec.error_tokens[status]), result.tokens.shape)
    length = jnp.full_like(result.length, int(spec.error_length[status]))
    new = result._replace(tokens=tokens, length=length, status=jnp.full_like(result.status, status))
    return _rows(hit, new, result)


def te1(setup: Setup) -> Fault:
    """Tool errors. Each call fails with probability `magnitude`. Variant "error": the tool
    reports an error (status and observation ``error: tool``, counted as a tool error);
    "empty": the tool answers OK with an empty result (a silent failure: no error counted)."""
    spec = _needs_tools("TE1", setup)

    def tool_results(result, rows, i, ctx: Ctx):
        hit = _hits(ctx, rows, i)
        failed = _answer(result, hit, _TOOL_ERROR, spec)
        empty = _answer(result, hit, _OK, spec)  # the OK row of the table: <result></result>
        return jax.tree.map(lambda a, b: jnp.where(is_variant(ctx, 0), a, b), failed, empty)

    return Fault("TE1", Hooks(tool_results=tool_results))


def te2(setup: Setup) -> Fault:
    """Corrupted or timed-out observations. Each observation is hit with probability
    `magnitude`. Variant "corrupt": its content tokens (between the result markers) are
    replaced by content tokens drawn from this round-trip's observations (for a calculator:
    random digits), status still OK; "timeout": the call times out (observation
    ``error: timeout``) and the environment aborts the row."""
    spec = _needs_tools("TE2", setup)

    def observations(result, rows, i, ctx: Ctx):
        hit = _hits(ctx, rows, i)
        b, r = result.tokens.shape
        slot = jnp.arange(r)[None, :]
        content = (slot >= 1) & (slot < result.length[:, None] - 1) & rows[:, None]
        # Draw replacements uniformly among the content tokens of every served row: the k-th
        # content token in reading order, k uniform (a search in the running count).
        flat = content.reshape(-1)
        count = jnp.cumsum(flat)
        key = jax.random.fold_in(jax.random.fold_in(ctx.key, i), 1)
        k = jax.random.randint(key, (b, r), 0, jnp.maximum(count[-1], 1))
        pick = jnp.searchsorted(count, k + 1)
        drawn = result.tokens.reshape(-1)[jnp.minimum(pick, b * r - 1)]
        corrupt = result._replace(tokens=jnp.where(content, drawn, result.tokens))
        timeout = _answer(result, hit, _TIMEOUT, spec)
        timeout = timeout._replace(abort=timeout.abort | hit)
        changed = jax.tree.map(lambda a, b: jnp.where(is_variant(ctx, 0), a, b), corrupt, timeout)
        return _rows(hit, changed, result)

    return Fault("TE2", Hooks(observations=observations))

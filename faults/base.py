"""What every fault shares: its runtime parameters, the per-step context, and the hook points.

A fault is a factory (one per taxonomy type) returning a `Fault`: a `Hooks` NamedTuple of pure
functions, each the identity except the ones the fault acts on, plus the params pytree of arrays
(`FaultParams`: onset, duration, magnitude, variant, key). The type is static, so each type
compiles once; onset, duration, magnitude and variant are arrays, so changing them never
recompiles. Every hook gates its change with `jnp.where(ctx.active, changed, x)`: an inactive
fault returns its input bit for bit.

Hook signatures (the trainer calls all of them; `ctx` is the step's `Ctx`):

  data(batch, ctx) -> batch                      prompts / answers (fused step; host-side
                                                 rewards read their own answer texts)
  sampler(sampling, ctx) -> sampling             the sampler's SamplingParams
  logits(logits [B, V], i, ctx) -> logits        the sampler's logits at decode position i
  rollout_params(policy, stale, ctx) -> policy   the weights the sampler uses
  rollout_logprobs(logp [B, N], mask, ctx)       the log-probs the sampler reports
  rewards(scores [B], rewards, rollout, ctx)     scalar reward per completion
  advantages(adv [B, N], scores [B], mask, ctx)  token advantages as used in the loss
  loss_mask(mask [B, N], rollout, ctx) -> mask   which tokens count in loss / KL / entropy
  regularizers(knobs, ctx) -> knobs              kl_coef, ent_coef, eps_low, eps_high only
  gradients(grads, ctx) -> grads                 after value_and_grad, before clipping
  learning_rate(lr, ctx) -> lr                   before the lr cap (a guard a user sets)
  params(params, ctx), opt_state(opt_state, ctx) the train state between steps
  ref_params(ref, ctx) -> ref                    the reference weights as the step reads them
  tool_results(result, rows, i, ctx) -> result   a tool round-trip's `rftjax.tools.ToolResult`
                                                 (status, observation) for rows [B] served
                                                 at decode position i
  observations(result, rows, i, ctx) -> result   the observation tokens fed back (after
                                                 tool_results)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SEVERITIES = ("subtle", "moderate", "severe")
_FAULT_SALT = 0xFA17


class FaultParams(NamedTuple):
    """Runtime parameters of an injection (all arrays; changing them never recompiles)."""

    onset: jax.Array  # int32: first RL step (1-based, as in metrics.jsonl) the fault is active
    duration: jax.Array  # int32: steps it lasts; <= 0: persistent to the end of the run
    magnitude: jax.Array  # float32: strength, in the units of the type's variant
    variant: jax.Array  # int32: index into the type's VARIANTS
    key: jax.Array  # uint32[2]: the fault's own randomness, apart from the run's keys


class Ctx(NamedTuple):
    """What a hook knows about the current step."""

    active: jax.Array  # bool: the fault acts in this step
    first: jax.Array  # bool: this is the onset step (one-time events happen here)
    step: jax.Array  # int32: 1-based RL step number
    key: jax.Array  # per-step key of the fault
    run_key: jax.Array  # the fault's key, the same every step
    magnitude: jax.Array
    variant: jax.Array


def _keep(x, *args):
    del args
    return x


class Hooks(NamedTuple):
    data: Callable = _keep
    sampler: Callable = _keep
    logits: Callable = _keep
    rollout_params: Callable = _keep
    rollout_logprobs: Callable = _keep
    rewards: Callable = _keep
    advantages: Callable = _keep
    loss_mask: Callable = _keep
    regularizers: Callable = _keep
    gradients: Callable = _keep
    learning_rate: Callable = _keep
    params: Callable = _keep
    opt_state: Callable = _keep
    ref_params: Callable = _keep
    tool_results: Callable = _keep
    observations: Callable = _keep


HOOK_NAMES = Hooks._fields
NO_HOOKS = Hooks()


class Setup(NamedTuple):
    """Static facts about the trainer a factory may need (they shape arrays)."""

    group_size: int
    max_new_tokens: int
    normalize_std: bool = True
    tools: Any = None  # the task's tool protocol (`rftjax.tools.ToolSpec`), if it has tools


class Fault(NamedTuple):
    """A fault type's injection. `state_init(policy)` / `state_update(fstate, policy, ctx)`
    carry extra train state when the fault needs it (a stale weight copy), else None."""

    type_id: str
    hooks: Hooks
    state_init: Callable[[Any], Any] | None = None
    state_update: Callable[[Any, Any, Ctx], Any] | None = None

    @property
    def acts_on(self) -> tuple[str, ...]:
        return tuple(n for n in HOOK_NAMES if getattr(self.hooks, n) is not _keep)


def check_params(*, onset: int, magnitude: float) -> None:
    """Raises ValueError for settings no run can have (no arrays built: cheap, host only)."""
    if onset < 0:
        raise ValueError(f"fault onset must be a step >= 0, got {onset}")
    if not np.isfinite(magnitude):
        raise ValueError(f"fault magnitude must be finite, got {magnitude}")


def make_params(
    *, onset: int, duration: int = -1, magnitude: float, variant: int = 0, seed: int = 0
) -> FaultParams:
    check_params(onset=onset, magnitude=magnitude)
    return FaultParams(
        onset=jnp.asarray(onset, jnp.int32),
        duration=jnp.asarray(duration, jnp.int32),
        magnitude=jnp.asarray(magnitude, jnp.float32),
        variant=jnp.asarray(variant, jnp.int32),
        # Salted: apart from the run's own per-step keys of the same seed (which are
        # fold_in(PRNGKey(seed), step) for steps far below the salt).
        key=jax.random.fold_in(jax.random.PRNGKey(seed), _FAULT_SALT),
    )


def context(p: FaultParams, steps_done: jax.Array) -> Ctx:
    """The context of the step that follows `steps_done` completed steps (step = done + 1)."""
    step = steps_done.astype(jnp.int32) + 1
    started = step >= p.onset
    within = (p.duration <= 0) | (step < p.onset + p.duration)
    return Ctx(
        active=started & within,
        first=step == jnp.maximum(p.onset, 1),  # onset 0 means from the first step
        step=step,
        key=jax.random.fold_in(p.key, step),
        run_key=p.key,
        magnitude=p.magnitude.astype(jnp.float32),
        variant=p.variant,
    )


def gate(on: jax.Array, new, old):
    """`new` where `on`, else `old`, leaf by leaf (old is returned bit for bit when off)."""
    return jax.tree.map(lambda n, o: jnp.where(on, n.astype(o.dtype), o), new, old)


def when(on: jax.Array, fn, x):
    """`fn(x)` if `on`, else `x`, as a `lax.cond`: for changes of whole weight trees, so that
    inactive steps neither compute the change nor pass the weights through a select (which
    could change how the compiler fuses the rest of the step)."""
    return jax.lax.cond(on, fn, lambda y: y, x)


def row_draw(key: jax.Array, rows: int, prob: jax.Array, group_size: int = 1) -> jax.Array:
    """bool[rows]: each row (or each group of `group_size` contiguous rows) with prob `prob`."""
    hit = jax.random.uniform(key, (rows // group_size,)) < prob
    return jnp.repeat(hit, group_size)


def is_variant(ctx: Ctx, index: int) -> jax.Array:
    return ctx.variant == index

"""The train state and the optimizer update: what every stage of the step shares.

The state carries everything a step needs; per-step randomness is
`fold_in(state.key, state.step)`, so a restored state replays the same draws.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from faults import Fault
from faults.base import gate
from fm import monitor as fmm
from rftjax.config import RLConfig
from rftjax.knobs import Knobs


class TrainState(NamedTuple):
    step: jax.Array  # int32: RL steps completed
    params: dict  # {"policy": nnx.State} (+ "value_head": {"weight", "bias"} for PPO)
    ref_params: nnx.State  # frozen reference policy π_ref
    opt_state: optax.OptState
    key: jax.Array  # uint32[2] base key
    fm: fmm.MonitorState | None = None  # fm's detector history, thresholds and seals (fm on)
    fault: Any = None  # state an injected fault carries (PG2: the sampler's stale weights)


class PromptBatch(NamedTuple):
    """Unique prompts of one step; each is sampled group_size times."""

    prompts: jax.Array  # int32 [Bp, P], left-padded
    prompt_mask: jax.Array  # int32 [Bp, P]
    answers: jax.Array  # int32 [Bp, A]


def make_optimizer(cfg: RLConfig) -> optax.GradientTransformation:
    """Adam direction only; the learning rate is a knob applied in `apply_update`."""
    return optax.scale_by_adam(b1=cfg.adam_b1, b2=cfg.adam_b2, eps=1e-8)


def init_state(
    policy: nnx.State,
    cfg: RLConfig,
    seed: int,
    monitor: fmm.Monitor | None = None,
    fault: Fault | None = None,
) -> TrainState:
    # Own copies: the train state is donated to the compiled step, the caller's arrays are not.
    params = {"policy": jax.tree.map(jnp.copy, policy)}
    if cfg.algo == "ppo":
        hidden = policy["model"]["norm"]["weight"].shape[0]
        params["value_head"] = {"weight": jnp.zeros((hidden,)), "bias": jnp.zeros(())}
    ref_params = jax.tree.map(jnp.copy, policy)
    opt_state = make_optimizer(cfg).init(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ref_params=ref_params,
        opt_state=opt_state,
        key=jax.random.PRNGKey(seed),
        fm=None if monitor is None else monitor.init(params, opt_state, ref_params),
        fault=fault.state_init(policy) if fault is not None and fault.state_init else None,
    )


@jax.jit
def seal_weights(state: TrainState) -> TrainState:
    """The state with fm's seal of its weights (and optimizer state) renewed, after a deliberate
    change between steps (resetting the optimizer moments), so that the next step does not read
    it as corruption. The identity without failure management."""
    if state.fm is None:
        return state
    return state._replace(fm=fmm.seal(state.fm, state.params, state.opt_state))


def learning_rate(
    knobs: Knobs, step: jax.Array, warmup_steps: int, schedule_hook=lambda lr: lr
) -> jax.Array:
    """lr × scale × linear warm-up, through `schedule_hook` (fault injection), then capped."""
    warm = jnp.minimum(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return jnp.minimum(schedule_hook(knobs.lr * knobs.lr_scale * warm), knobs.lr_cap)


def apply_update(params, opt_state, grads, knobs: Knobs, lr, optimizer):
    """Clip (knob), Adam direction, scale by -lr. Returns (params, opt_state, updates); the
    step's norms are fm's optimization statistics of these."""
    grad_norm = optax.tree.norm(grads)
    scale = jnp.where(
        knobs.grad_clip > 0, jnp.minimum(1.0, knobs.grad_clip / (grad_norm + 1e-6)), 1.0
    )
    grads = jax.tree.map(lambda g: g * scale, grads)
    direction, new_opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda d: -lr * d, direction)
    # skip_nonfinite (remedy switch): a step whose gradients are not finite changes nothing,
    # as the skip-step guards of large-scale trainers do.
    skip = (knobs.skip_nonfinite > 0) & ~jnp.isfinite(grad_norm)
    new_params = remedied(skip, params, optax.apply_updates(params, updates))
    return new_params, remedied(skip, opt_state, new_opt_state), updates


def remedied(on: jax.Array, configured, piped):
    """A remedy switch (a runtime knob, > 0: on): `configured` where on, else what the
    pipeline made of it, leaf by leaf (`faults.gate`, whose off branch is bit-exact)."""
    return gate(on > 0, configured, piped)

"""fm inside Tunix's compiled train step: the optimizer wrapper (`monitor_optimizer`) and the
policy-loss wrapper that adds fm's statistics to the loss's aux."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tunix.rl import common as _tunix_common

from fm import monitor as fm_monitor

log = logging.getLogger(__name__)
PREFIX = "fm/"  # fm's keys in Tunix's loss aux and metrics


# -- in the compiled step: the optimizer --------------------------------------------------------


class OptimizerState(NamedTuple):
    """State of `monitor_optimizer`: the wrapped optimizer's, the last update's statistics,
    the knobs."""

    inner: Any
    count: jax.Array  # i32[] updates so far
    stats: dict[str, jax.Array]  # fm.monitor.optimization_statistics of the last update
    lr: jax.Array  # f32[] the scheduled learning rate of the next update
    lr_scale: jax.Array  # f32[] multiplies every update
    lr_cap: jax.Array  # f32[] the effective learning rate never exceeds it (inf: no cap)


def monitor_optimizer(
    optimizer: optax.GradientTransformation, *, learning_rate: float | Callable[[Any], Any]
) -> optax.GradientTransformation:
    """Wraps Tunix's actor optimizer: `fm.monitor.optimization_statistics` of every update in the
    compiled step, and the knobs ``lr_scale`` and ``lr_cap`` (arrays: changing them never
    recompiles).

    Args:
      optimizer: the optax optimizer Tunix would get, learning rate included.
      learning_rate: the same learning rate (float or schedule of the step count) that
        `optimizer` applies: fm reports it and caps it (the update is scaled by
        ``lr_scale * min(1, lr_cap / lr)``).

    Returns:
      An optax `GradientTransformation` to pass as ``RLTrainingConfig.actor_optimizer``.
    """
    schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

    def stats_of(grads, updates, params, lr):
        inputs = fm_monitor.StepInputs(grads=grads, updates=updates, params=params, lr=lr)
        return fm_monitor.optimization_statistics(inputs)

    def init(params):
        inner = optimizer.init(params)
        try:
            shapes = jax.eval_shape(stats_of, params, params, params, 1.0)
            stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        except Exception:  # noqa: BLE001 - fm must not stop training: no statistics then
            log.exception("fm: optimizer statistics unavailable")
            stats = {}
        one = jnp.ones((), jnp.float32)
        lr = jnp.asarray(schedule(0), jnp.float32)
        return OptimizerState(inner, jnp.zeros((), jnp.int32), stats, lr, one, jnp.inf * one)

    def update(grads, state, params=None):
        updates, inner = optimizer.update(grads, state.inner, params)
        lr = jnp.asarray(schedule(state.count), jnp.float32)
        cap = jnp.where(lr > state.lr_cap, state.lr_cap / jnp.where(lr > 0, lr, 1.0), 1.0)
        scale = state.lr_scale * cap
        updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
        stats = state.stats
        if stats:  # the same keys as at init: the state's structure never changes
            stats = stats_of(grads, updates, params, lr * scale)
        count = state.count + 1
        next_lr = jnp.asarray(schedule(count), jnp.float32)
        return updates, OptimizerState(inner, count, stats, next_lr, state.lr_scale, state.lr_cap)

    return optax.GradientTransformation(init, update)


def _monitor_state(optimizer: Any) -> OptimizerState | None:
    """The `OptimizerState` inside an `nnx.Optimizer`'s state, or None."""
    mine = lambda x: isinstance(x, OptimizerState)  # noqa: E731
    found = [s for s in jax.tree.leaves(optimizer.opt_state, is_leaf=mine) if mine(s)]
    return found[0] if found else None


def _has_moments(x: Any) -> bool:
    return hasattr(x, "mu") and hasattr(x, "nu")


_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def _value(x: Any) -> Any:
    return x.get_value() if isinstance(x, nnx.Variable) else x


# -- in the compiled step: the policy loss ------------------------------------------------------


def _entropy(logits: jax.Array) -> jax.Array:
    """Next-token entropy in nats, f32[B, T] from logits f32[B, T, V]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def step_stats(
    example: Any, logits: jax.Array, *, group_size: int, pad_id: int, eos_id: int, max_len: int
) -> dict[str, jax.Array]:
    """fm statistics of one Tunix `TrainExample` (completion_ids [B, T], completion_mask
    [B, T], ref_per_token_logps [B, T] or None) and the policy's logits f32[B, T, V] at the
    completion's positions, through `fm.monitor`'s stage functions: KL to the reference,
    entropy, lengths (a response's non-pad tokens; truncated = no EOS among the T tokens),
    repetition, and the loss-mask audit (Tunix's mask against those lengths)."""
    logits = jax.lax.stop_gradient(logits)
    ids, mask = example.completion_ids, example.completion_mask
    logp = _tunix_common.selective_log_softmax(logits, ids)
    inputs = fm_monitor.StepInputs(
        lengths=jnp.sum(ids != pad_id, axis=1),
        truncated=~jnp.any(ids == eos_id, axis=1),
        response=ids,
        response_mask=mask,
        loss_mask=mask,
        logp=logp,
        ref_logp=example.ref_per_token_logps,
        entropy=_entropy(logits),
    )
    return {
        **fm_monitor.token_statistics(inputs, group_size=group_size),
        **fm_monitor.rollout_statistics(inputs, group_size=group_size, max_len=max_len),
    }


class _Example(NamedTuple):  # the fields of a Tunix TrainExample that `step_stats` reads
    completion_ids: Any
    completion_mask: Any
    ref_per_token_logps: Any


def _wrap_loss(
    inner: Callable,
    errors: Callable[[str], None],
    keys: Sequence[str],
    **kwargs: Any,
) -> Callable:
    """Tunix's loss with `step_stats` added to its aux under `PREFIX` (traced once). The
    logits come from a second, stop-gradient forward pass on the loss's inputs: Tunix's loss
    returns none, and its model call is a jitted function that cannot hand them out. Every
    one of `keys` is in the aux (NaN if fm failed to compute it): Tunix reads each key it was
    told to log and would stop on a missing one."""

    def loss_fn(model, train_example, algo_config):
        loss, aux = inner(model, train_example, algo_config)
        try:
            _, logits = _tunix_common.compute_per_token_logps(
                model,
                prompt_tokens=train_example.prompt_ids,
                completion_tokens=train_example.completion_ids,
                pad_id=kwargs["pad_id"],
                eos_id=kwargs["eos_id"],
                return_logits=True,
            )
            extra = step_stats(train_example, logits, **kwargs)
        except Exception:  # noqa: BLE001 - at trace time: Tunix's loss goes on alone
            errors("in-step statistics")
            extra = {}
        nan = jnp.full((), jnp.nan, jnp.float32)
        return loss, {**aux, **{PREFIX + k: extra.get(k, nan) for k in keys}}

    return loss_fn

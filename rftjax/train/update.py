"""The optimizer-update stage of the step: micro-batches (gradient accumulation over whole
groups) and one optimizer update per minibatch, over epochs × minibatches."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fm import monitor as fmm
from rftjax import algorithms as alg
from rftjax.knobs import Knobs
from rftjax.models import bind_prepared, prepare_matmuls
from rftjax.sampling import bucket_sizes, pad_slots, response_ends, switch_on_length
from rftjax.train.stages import StepSpec, first_pass, forward, loss_fn, loss_terms, targets
from rftjax.train.state import apply_update

# -- 4b. micro-batches (gradient accumulation) ------------------------------------------------


def split_micro(tree, k: int, group_size: int | None = None):
    """Every array [B, ...] -> [k, B / k, ...]: k micro-batches.

    With `group_size`, micro-batch i holds the groups i, i + k, i + 2k, ... (rows of a group
    contiguous): spread like the batch, so a batch split over devices in contiguous blocks of
    whole groups (`parallel.batch_spec`) gives every device the same share of every
    micro-batch, and no device waits while another computes. Without, contiguous rows (the
    length buckets' rows, already in the order wanted)."""
    if group_size is None:
        return jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), tree)

    def one(x):
        per = x.shape[0] // (group_size * k)  # groups of a micro-batch
        y = x.reshape(per, k, group_size, *x.shape[1:]).swapaxes(0, 1)
        return y.reshape(k, per * group_size, *x.shape[1:])

    return jax.tree.map(one, tree)


def join_micro(tree, group_size: int | None = None):
    """The inverse of `split_micro`: [k, b, ...] -> [k·b, ...] in the rows' own order."""
    if group_size is None:
        return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree)

    def one(x):
        k, per = x.shape[0], x.shape[1] // group_size
        y = x.reshape(k, per, group_size, *x.shape[2:]).swapaxes(0, 1)
        return y.reshape(k * x.shape[1], *x.shape[2:])

    return jax.tree.map(one, tree)


def micro_map(s: StepSpec, fn, data):
    """fn(data) computed over `cfg.num_microbatches` micro-batches of `data`'s rows, one after
    the other (`jax.lax.map`), the outputs joined along the rows: the same values with one
    micro-batch's activations alive at a time. `fn` must be row-wise over whole groups."""
    k, g = s.cfg.num_microbatches, s.cfg.group_size
    if k == 1:
        return fn(data)
    return join_micro(jax.lax.map(fn, split_micro(data, k, g)), g)


def micro_weights(loss_mask, k: int, agg_mode: str, group_size: int | None = None) -> jax.Array:
    """f32[k]: each micro-batch's share of the minibatch's aggregate, so that Σ_i w_i·agg_i over
    the micro-batches' own aggregates equals the aggregate of the whole minibatch: token_mean by
    loss-mask weight (valid tokens), seq_mean_token_mean by rows with a valid token,
    seq_mean_token_sum_norm by rows (all micro-batches alike). loss_mask f32[B, T]. Where the
    whole minibatch counts nothing (every aggregate 0), 1/k each: the weights always sum to 1,
    so the coefficient probe still reads the applied coefficients. The micro-batches are
    `split_micro`'s (`group_size` as there)."""
    m = split_micro(loss_mask.astype(jnp.float32), k, group_size)
    if agg_mode == "token_mean":
        counts = m.sum(axis=(1, 2))
    elif agg_mode == "seq_mean_token_mean":
        counts = (m.sum(axis=2) > 0).astype(jnp.float32).sum(axis=1)
    elif agg_mode == "seq_mean_token_sum_norm":
        counts = jnp.ones((k,), jnp.float32)
    else:
        raise ValueError(f"loss_agg={agg_mode!r} is not supported; accepted: {alg.AGG_MODES}")
    total = counts.sum()
    return jnp.where(total > 0, counts / jnp.where(total > 0, total, 1.0), 1.0 / k)


def _behaviour(s: StepSpec, data, logp, values):
    """With one update a step the behaviour policy is the current one (as in `loss_fn`)."""
    if s.cfg.updates_per_step > 1:
        return data
    sg = jax.lax.stop_gradient
    return {**data, "old_logp": sg(logp), "old_values": sg(values)}


def minibatch_targets(s: StepSpec, params, mb, knobs: Knobs, ctx) -> dict:
    """The targets of a whole minibatch before its micro-batches (one update a step): group
    statistics, PPO's batch whitening and the advantage hook see the minibatch, as in the plain
    step. PPO's estimator reads the current values (and log-probs): one more forward, without
    gradient, in micro-batches; GRPO's reads neither."""
    if s.cfg.algo == "ppo":
        old_logp, _, old_values = micro_map(s, lambda d: forward(s, params, d, knobs), mb)
        old_logp, old_values = jax.lax.stop_gradient((old_logp, old_values))
    else:
        old_logp = old_values = jnp.zeros_like(mb["loss_mask"])
    return targets(s, old_logp, old_values, mb, knobs, ctx)


def gradients(s: StepSpec, params, mb, knobs: Knobs, ctx):
    """((∂loss/∂params, ∂loss/∂probe), metrics) of one minibatch.

    With `cfg.num_microbatches` = k > 1: the minibatch runs as k micro-batches of whole groups
    in a `jax.lax.scan`, each one's gradient weighted by `micro_weights` and summed in f32 (the
    whole minibatch's gradient: every loss term, KL, entropy and value loss, aggregates with the
    same mask and mode); the metrics are `loss_terms` of the whole minibatch from the
    micro-batches' joined log-probs, entropies and values (the plain step's values).

    With `cfg.buckets` = k > 1: the same, over k micro-batches of rows sorted by length,
    each computed only up to its longest row (`length_buckets`). The prompts run once per
    group before the buckets (`first_pass`); each bucket's gradient reaches them through its
    rows' prompt keys and values, and their pass's own gradient is taken once, after.

    Layer weights that multiply in bf16 are rounded and transposed once for all the parts
    (`models.prepare_matmuls`), not once per part."""
    probe = fmm.coefficient_probe()
    k, buckets = s.cfg.num_microbatches, s.cfg.buckets
    if k == 1 and buckets == 1:
        grad_fn = jax.grad(lambda p, q: loss_fn(s, p, q, mb, knobs, ctx), (0, 1), has_aux=True)
        return grad_fn(params, probe)
    prepared = prepare_matmuls(s.graphdef, params["policy"], backward=True)  # once, not per part
    if s.cfg.updates_per_step == 1:  # (PPO's forward there reads the same prepared weights)
        mb = {**mb, **minibatch_targets(s, {**params, "policy": prepared}, mb, knobs, ctx)}
    per_row = buckets > 1  # rows sorted by length, in contiguous buckets (not groups)
    first, first_vjp = None, None
    if per_row:
        k, order = buckets, length_order(mb)
        pass_of = lambda pol: first_pass(s, bind_prepared(prepared, pol), mb)  # noqa: E731
        first, first_vjp = jax.vjp(pass_of, params["policy"])
        mb_in = {**jax.tree.map(lambda x: x[order], mb), "group": order // s.cfg.group_size}
    else:
        mb_in = mb
    group = None if per_row else s.cfg.group_size
    weights = micro_weights(mb_in["loss_mask"], k, s.cfg.loss_agg, group)

    def weighted_loss(p, q, f, part, w):
        prompt = None if f is None else jax.tree.map(lambda x: x[part["group"]], f)
        p = {**p, "policy": bind_prepared(prepared, p["policy"])}
        logp, entropy, values = forward(s, p, part, knobs, prompt=prompt)
        behaviour = _behaviour(s, part, logp, values)
        loss, _ = loss_terms(s, logp, entropy, values, q, behaviour, knobs, stats=False)
        return w * loss, (logp, entropy, values)

    grad_fn = jax.grad(weighted_loss, (0, 1, 2), has_aux=True)

    def micro(acc, xs):
        part, w = xs
        if per_row:
            grads, outs = _at_length(lambda d: grad_fn(params, probe, first, d, w), part, buckets)
        else:
            grads, outs = grad_fn(params, probe, first, part, w)
        acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
        return acc, jax.lax.stop_gradient(outs)

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), (params, probe, first))
    summed, outs = jax.lax.scan(micro, zeros, (split_micro(mb_in, k, group), weights))
    grads = jax.tree.map(lambda g, x: g.astype(x.dtype), summed[:2], (params, probe))
    if per_row:  # the prompts' pass, once: its gradient from every bucket's
        (through,) = first_vjp(jax.tree.map(lambda g, x: g.astype(x.dtype), summed[2], first))
        policy = jax.tree.map(jnp.add, grads[0]["policy"], through)
        grads = ({**grads[0], "policy": policy}, grads[1])
    outs = join_micro(outs, group)
    if per_row:  # back to the minibatch's own row order
        inverse = jnp.argsort(order)
        outs = jax.tree.map(lambda x: x[inverse], outs)
    logp, entropy, values = outs
    _, metrics = loss_terms(s, logp, entropy, values, probe, _behaviour(s, mb, logp, values), knobs)
    return grads, metrics


# -- 4c. length buckets -----------------------------------------------------------------------

_CONTEXT = ("tokens", "valid")  # [B, P + N]; every other per-token array is [B, N]


def length_order(data) -> jax.Array:
    """i32[B]: the rows sorted by their last real response slot (stable)."""
    return jnp.argsort(response_ends(data["valid"][:, -data["mask"].shape[1] :]), stable=True)


def _at_length(fn, part, buckets: int):
    """fn(part cut to the smallest of `bucket_sizes(N, buckets)` that holds its longest row):
    (grads, outputs [b, t, ...] padded back to N with zeros). One `jax.lax.switch` branch per
    size: the gradient is taken inside each branch, never through the switch."""
    n = part["mask"].shape[1]
    longest = jnp.max(response_ends(part["valid"][:, -n:]))

    def at(t: int):
        def run(d):
            cut = {
                k: x[:, : x.shape[1] - n + t] if k in _CONTEXT else (x[:, :t] if x.ndim > 1 else x)
                for k, x in d.items()
            }
            grads, outs = fn(cut)
            return grads, jax.tree.map(lambda x: pad_slots(x, n), outs)

        return run

    return switch_on_length({t: at(t) for t in bucket_sizes(n, buckets)}, longest, part)


# -- 5. update --------------------------------------------------------------------------------


def update(s: StepSpec, carry, mb, knobs: Knobs, lr, ctx):
    """One optimizer update on a minibatch: gradients (accumulated over micro-batches with
    `cfg.num_microbatches` > 1; through the gradient hook), clip, Adam, and the optimization
    statistics. carry = (params, opt_state)."""
    params, opt_state = carry
    (grads, probed), metrics = gradients(s, params, mb, knobs, ctx)
    if s.monitor is not None:  # the coefficients the loss applied, as measured
        metrics.update(loss_kl_coef=probed["kl_coef"], loss_ent_coef=-probed["ent_coef"])
    grads = s.hooks.gradients(grads, ctx)
    new_params, opt_state, updates = apply_update(params, opt_state, grads, knobs, lr, s.optimizer)
    inputs = fmm.StepInputs(grads=grads, updates=updates, params=params, lr=lr)
    stats = fmm.optimization_statistics(inputs)
    stats.pop("lr")  # the step reports its learning rate once
    metrics.update(s.stats(stats))
    return (new_params, opt_state), metrics


def minibatches(data, key, epochs: int, num_mb: int, num_groups: int, group_size: int):
    """Stacks epochs × minibatches along a new leading axis, shuffling whole groups (a group's
    completions stay together and contiguous, as the shared-prompt forward needs)."""
    if epochs * num_mb == 1:
        return jax.tree.map(lambda x: x[None], data)
    perms = jnp.stack(
        [jax.random.permutation(jax.random.fold_in(key, e), num_groups) for e in range(epochs)]
    ).reshape(epochs * num_mb, num_groups // num_mb)
    rows = (perms[..., None] * group_size + jnp.arange(group_size)).reshape(epochs * num_mb, -1)
    return jax.tree.map(lambda x: x[rows], data)

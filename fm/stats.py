"""Per-step statistics for failure detection: pure, jit-compatible ``jnp`` functions.

Every public ``*_stats`` function returns a flat ``dict[str, jax.Array]`` of float32 scalars.
Keys and shapes depend only on static arguments (and, for ``optimization_stats``, on the pytree
structure), never on values, so the dicts can be merged and fed to a detector with a fixed
signal list. Divisions are guarded (an empty mask gives 0, never NaN), but non-finite *inputs*
propagate: a NaN reward makes ``reward_mean`` NaN and ``nonfinite_rewards`` ≥ 1.

Shapes: B completions, T response positions. ``mask`` is f32 or bool [B, T]; an entry counts as
a policy action token when ``mask > 0``. The completions of one prompt are contiguous: sample
``i`` belongs to group ``i // group_size``. Log-probs are those of the chosen token, f32[B, T].
Keys prefixed ``check_`` are hard cross-checks (0 when healthy).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Stats = dict[str, Array]

# A group whose reward std is below this has all rewards equal: no GRPO learning signal.
ZERO_STD_THRESHOLD = 1e-6
# exp(±20) is far outside any trust region; clamping keeps exp() finite on garbage log-probs.
LOG_RATIO_CLAMP = 20.0


def _f32(x: Any) -> Array:
    return jnp.asarray(x, jnp.float32)


def _safe_div(num: Array, den: Array) -> Array:
    """``num / den``, 0 where ``den == 0``. A NaN/inf ``den`` is not hidden: it propagates."""
    zero = den == 0
    return jnp.where(zero, 0.0, num / jnp.where(zero, 1.0, den))


def _valid(mask: Array) -> Array:
    return jnp.asarray(mask) > 0


def _count(valid: Array, axis: int | None = None) -> Array:
    return jnp.sum(valid, axis=axis, dtype=jnp.int32).astype(jnp.float32)  # exact to 2**24


def _masked_mean(x: Array, valid: Array, axis: int | None = None) -> Array:
    """Mean of ``x`` over ``valid`` entries (0 when none); ``where`` keeps padding NaNs out."""
    return _safe_div(jnp.sum(jnp.where(valid, x, 0.0), axis=axis), _count(valid, axis))


def _masked_max(x: Array, valid: Array) -> Array:
    """Max of ``x`` over ``valid`` entries, 0 when none; NaN at a valid entry gives NaN."""
    return jnp.where(jnp.any(valid), jnp.max(jnp.where(valid, x, -jnp.inf)), 0.0)


def _std(x: Array) -> Array:
    """Population std (ddof=0) of a 1-D array, via centred squares so it is never negative."""
    return jnp.sqrt(jnp.mean(jnp.square(x - jnp.mean(x))))


def _grouped(x: Array, group_size: int) -> Array:
    """[B] → [B // group_size, group_size]; B must be a multiple of group_size (static)."""
    if group_size < 1 or x.shape[0] % group_size:
        raise ValueError(f"batch {x.shape[0]} is not a positive multiple of {group_size=}.")
    return x.reshape(-1, group_size)


def _pearson(x: Array, y: Array) -> Array:
    """Pearson correlation of two [N] arrays; 0 when either has zero variance."""
    xc, yc = x - jnp.mean(x), y - jnp.mean(y)
    den = jnp.sqrt(jnp.mean(jnp.square(xc)) * jnp.mean(jnp.square(yc)))
    return _safe_div(jnp.mean(xc * yc), den)


def reward_stats(rewards: Array, *, group_size: int) -> Stats:
    """Batch and per-group statistics of rewards f32[B] (B a multiple of static group_size).

    Returns ``reward_{mean,std,min,max,p10,p50,p90}`` (std ddof=0, percentiles linear),
    ``frac_zero_std_groups`` (group reward std < 1e-6), ``group_reward_std_mean``,
    ``nonfinite_rewards`` (count).
    """
    r = _f32(rewards)
    group_std = jnp.std(_grouped(r, group_size), axis=1)
    p10, p50, p90 = jnp.percentile(r, jnp.array([10.0, 50.0, 90.0]))
    return {
        "reward_mean": jnp.mean(r),
        "reward_std": _std(r),
        "reward_min": jnp.min(r),
        "reward_max": jnp.max(r),
        "reward_p10": p10,
        "reward_p50": p50,
        "reward_p90": p90,
        "frac_zero_std_groups": jnp.mean(group_std < ZERO_STD_THRESHOLD, dtype=jnp.float32),
        "group_reward_std_mean": jnp.mean(group_std),
        "nonfinite_rewards": _count(~jnp.isfinite(r)),
    }


def reward_shadow_stats(rewards: Array, shadow: Array) -> Stats:
    """Cross-check of the rewards the learner saw f32[B] against a shadow (redundant)
    verifier's scores of the same completions f32[B].

    Returns ``reward_shadow_gap``: mean |rewards - shadow|. It is 0 while the reward pipeline
    passes the verifier's scores through, and a constant while it transforms them the same way
    (a clip); labels that a pipeline flips, replaces, drops or pays a bonus on move it.
    """
    return {"reward_shadow_gap": jnp.mean(jnp.abs(_f32(rewards) - _f32(shadow)))}


def length_stats(lengths: Array, truncated: Array, *, max_len: int) -> Stats:
    """Statistics of response lengths i32/f32[B]; truncated bool[B] (stopped at the cap).

    Returns ``length_{mean,std,max,min}`` (std ddof=0), ``clip_ratio`` (fraction truncated),
    ``length_at_cap`` (fraction with length ≥ max_len; a length past the cap counts too).
    """
    n = _f32(lengths)
    return {
        "length_mean": jnp.mean(n),
        "length_std": _std(n),
        "length_max": jnp.max(n),
        "length_min": jnp.min(n),
        "clip_ratio": jnp.mean(_f32(truncated)),
        "length_at_cap": jnp.mean(n >= max_len, dtype=jnp.float32),
    }


def _compact(tokens: Array, valid: Array) -> tuple[Array, Array]:
    """Moves each row's valid tokens to the front, in order: (tokens, valid) [B, T]."""
    order = jnp.argsort(~valid, axis=1, stable=True)
    n = jnp.sum(valid, axis=1, keepdims=True)
    return jnp.take_along_axis(tokens, order, axis=1), jnp.arange(valid.shape[1]) < n


def _distinct(keys: tuple[Array, ...], valid: Array) -> Array:
    """Distinct key tuples among each row's valid entries: f32[B]. Sorts, then counts changes."""
    invalid = (~valid).astype(jnp.int32)  # first sort key: valid entries form a prefix
    out = jax.lax.sort((invalid, *keys), dimension=1, num_keys=1 + len(keys))
    ok = out[0] == 0
    change = jnp.zeros_like(ok[:, 1:])
    for k in out[1:]:
        change = change | (k[:, 1:] != k[:, :-1])
    return _count(change & ok[:, 1:], axis=1) + jnp.any(ok, axis=1)


def token_stats(tokens: Array, mask: Array) -> Stats:
    """Degeneration signals of the sampled tokens (reward hacking, sampling collapse).

    Masked-out positions (padding, tool observations) are skipped: "previous" means the previous
    valid token of the row. Bigram and uniqueness counts sort each row (O(B·T log T) work,
    O(B·T) memory) instead of comparing all pairs.

    Args: tokens i32[B, T] response token ids; mask f32/bool[B, T].

    Returns ``repetition_ratio``: fraction of valid tokens after a row's first that equal the
    previous valid token (pooled over the batch). ``ngram_repeat_ratio``: fraction of valid
    bigrams that already occurred earlier in the same row (pooled). ``unique_token_ratio``:
    mean over non-empty rows of distinct tokens / valid length (0 if all rows are empty).
    """
    valid = _valid(mask)
    c, cv = _compact(jnp.asarray(tokens), valid)
    pair = cv[:, 1:]  # a bigram (c[j-1], c[j]) is valid iff token j is
    n_pairs = _count(pair, axis=1)
    repeats = _count(pair & (c[:, 1:] == c[:, :-1]))
    new_bigrams = _distinct((c[:, :-1], c[:, 1:]), pair)
    n_tok = _count(valid, axis=1)
    row_unique = _safe_div(_distinct((c,), cv), n_tok)
    return {
        "repetition_ratio": _safe_div(repeats, jnp.sum(n_pairs)),
        "ngram_repeat_ratio": _safe_div(jnp.sum(n_pairs - new_bigrams), jnp.sum(n_pairs)),
        "unique_token_ratio": _masked_mean(row_unique, n_tok > 0),
    }


def shadow_advantages(rewards: Array, *, group_size: int, eps: float = 1e-6) -> Array:
    """Reference GRPO estimator f32[B]: ``A_i = (r_i - mean_g r) / (std_g r + eps)``, ddof=0.

    rewards f32[B]; group_size static. The trainer's estimator is audited against this one.
    """
    g = _grouped(_f32(rewards), group_size)
    adv = (g - jnp.mean(g, axis=1, keepdims=True)) / (jnp.std(g, axis=1, keepdims=True) + eps)
    return adv.reshape(-1)


def advantage_stats(
    advantages: Array, mask: Array, rewards: Array, *, group_size: int, eps: float = 1e-6
) -> Stats:
    """Advantage statistics and a cross-check against ``shadow_advantages``.

    A row's sequence advantage is its masked mean over tokens (0 for an empty row). Shadow
    advantages of groups whose rewards are all equal (std < 1e-6) are taken as exactly 0, so
    rounding noise in them cannot fake a correlation or a sign disagreement.

    The ``check_*`` keys assume a group-normalized estimator (GRPO, RLOO, Dr. GRPO): with GAE /
    a learned critic, sequence advantages need not track the group-relative reward, so such
    callers should drop the ``check_*`` keys they do not want.

    Args: advantages f32[B, T] as used in the loss; mask f32/bool[B, T]; rewards f32[B] the
    advantages came from; group_size static; eps the shadow estimator's std floor.

    Returns ``adv_{mean,std,max_abs}`` over valid tokens; ``adv_group_mean_max_abs`` (max over
    groups of |mean sequence advantage|); ``adv_shadow_corr`` (Pearson over rows, 0 if either
    side has zero variance); ``adv_shadow_sign_agree`` (fraction of rows with non-zero shadow
    advantage whose sign matches, 1 if none); ``adv_scale_ratio`` (std sequence / std shadow;
    1 if both are 0, std / eps if only the shadow's is); ``check_adv_sign`` (corr < -0.5) and
    ``check_adv_group_mean`` (group-mean max abs > 0.5), each 1.0 or 0.0; ``check_adv_flip``:
    rows whose sequence advantage has the opposite sign (or is 0) where the shadow's is not, a
    count (any group-normalized estimator, clipped or not, keeps the shadow's signs). A row
    with no valid token has no advantage to compare: it counts in neither sign check.
    """
    a, valid, r = _f32(advantages), _valid(mask), _f32(rewards)
    seq = _masked_mean(a, valid, axis=1)
    live = ~(jnp.std(_grouped(r, group_size), axis=1) < ZERO_STD_THRESHOLD)  # NaN stays live
    shadow = shadow_advantages(r, group_size=group_size, eps=eps)
    shadow = jnp.where(jnp.repeat(live, group_size), shadow, 0.0)
    group_mean_max = jnp.max(jnp.abs(jnp.mean(_grouped(seq, group_size), axis=1)))
    corr = _pearson(seq, shadow)
    nonzero = (shadow != 0) & jnp.any(valid, axis=1)
    agree = jnp.sign(seq) == jnp.sign(shadow)
    n_nonzero = _count(nonzero)
    sign_agree = jnp.where(n_nonzero > 0, _safe_div(_count(nonzero & agree), n_nonzero), 1.0)
    sd_seq, sd_shadow = _std(seq), _std(shadow)
    no_signal = jnp.where(sd_seq == 0, 1.0, sd_seq / eps)
    scale = jnp.where(sd_shadow == 0, no_signal, _safe_div(sd_seq, sd_shadow))
    return {
        "adv_mean": _masked_mean(a, valid),
        "adv_std": jnp.sqrt(_masked_mean(jnp.square(a - _masked_mean(a, valid)), valid)),
        "adv_max_abs": _masked_max(jnp.abs(a), valid),
        "adv_group_mean_max_abs": group_mean_max,
        "adv_shadow_corr": corr,
        "adv_shadow_sign_agree": sign_agree,
        "adv_scale_ratio": scale,
        "check_adv_sign": (corr < -0.5).astype(jnp.float32),
        "check_adv_group_mean": (group_mean_max > 0.5).astype(jnp.float32),
        "check_adv_flip": n_nonzero - _count(nonzero & agree),
    }


def _k3(log_r: Array) -> Array:
    """Per-token k3 = r - log r - 1 ≥ 0 with log r clamped; expm1 keeps it exact near 0."""
    log_r = jnp.clip(log_r, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.maximum(jnp.expm1(log_r) - log_r, 0.0)


def mismatch_stats(sampler_logp: Array, trainer_logp: Array, mask: Array) -> Stats:
    """Train–inference mismatch between the rollout engine and the learner on the same tokens.

    With the token importance ratio ``r = exp(trainer - sampler)`` (tokens drawn by the
    sampler), ``r - log r - 1`` is the k3 estimate of KL(sampler ‖ trainer).

    Args: sampler_logp f32[B, T] from the rollout engine; trainer_logp f32[B, T] the
    learner's recomputation on the same tokens; mask f32/bool[B, T].

    Returns ``mismatch_k3`` (masked mean k3, log r clamped to ±20), ``mismatch_max_abs`` (max
    |Δ log p|), ``is_ratio_mean``, ``is_ratio_max`` (token r, clamped), ``is_ess``: normalized
    effective sample size (Σw)² / (B Σw²) of the sequence weights w_i = exp(Σ_t log r_it),
    in log space; 1 when all weights are equal, 1/B when one dominates.
    """
    valid = _valid(mask)
    log_r = _f32(trainer_logp) - _f32(sampler_logp)
    ratio = jnp.exp(jnp.clip(log_r, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    log_w = jnp.sum(jnp.where(valid, log_r, 0.0), axis=1)  # [B]
    lse = jax.nn.logsumexp
    log_ess = 2.0 * lse(log_w) - lse(2.0 * log_w) - jnp.log(float(log_w.shape[0]))
    return {
        "mismatch_k3": _masked_mean(_k3(log_r), valid),
        "mismatch_max_abs": _masked_max(jnp.abs(log_r), valid),
        "is_ratio_mean": _masked_mean(ratio, valid),
        "is_ratio_max": _masked_max(ratio, valid),
        "is_ess": jnp.minimum(jnp.exp(log_ess), 1.0),
    }


def kl_stats(logp: Array, ref_logp: Array, mask: Array) -> Stats:
    """KL to the reference model: logp, ref_logp f32[B, T] on the sampled tokens; mask [B, T].

    Returns ``kl_ref_k1`` (masked mean of logp - ref_logp), ``kl_ref_k3`` (masked mean of
    r - log r - 1, log r = ref_logp - logp clamped to ±20), ``kl_ref_max`` (max token k3).
    """
    valid = _valid(mask)
    diff = _f32(logp) - _f32(ref_logp)
    k3 = _k3(-diff)
    return {
        "kl_ref_k1": _masked_mean(diff, valid),
        "kl_ref_k3": _masked_mean(k3, valid),
        "kl_ref_max": _masked_max(k3, valid),
    }


def entropy_stats(entropy: Array, mask: Array) -> Stats:
    """Policy entropy: ``entropy_mean`` over valid tokens and ``entropy_min_seq``, the minimum
    over non-empty rows of the row's mean entropy (0 when all rows are empty).

    entropy f32[B, T] next-token entropy in nats; mask f32/bool[B, T].
    """
    valid = _valid(mask)
    e = _f32(entropy)
    row = _masked_mean(e, valid, axis=1)
    nonempty = jnp.any(valid, axis=1)
    min_seq = jnp.min(jnp.where(nonempty, row, jnp.inf))
    return {
        "entropy_mean": _masked_mean(e, valid),
        "entropy_min_seq": jnp.where(jnp.any(nonempty), min_seq, 0.0),
    }


def _name(key: Any) -> Any:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def default_groups(path: Sequence[Any]) -> str:
    """Group of a parameter from its key path (``jax.tree_util.tree_flatten_with_path``).

    ``layer_<i>`` when an element named ``layers`` is followed by an integer index (int or
    digit string); otherwise ``embed`` (a name containing "embed"), ``head`` (a name ending in
    "head", e.g. ``lm_head``, ``value_head``), ``norm`` (a name containing "norm"), ``other``.
    """
    names = [_name(k) for k in path]
    for prev, cur in zip(names, names[1:], strict=False):
        if prev == "layers" and (isinstance(cur, int) or str(cur).isdigit()):
            return f"layer_{int(cur)}"
    strs = [str(n).lower() for n in names]
    if any("embed" in s for s in strs):
        return "embed"
    if any(s.endswith("head") for s in strs):
        return "head"
    if any("norm" in s for s in strs):
        return "norm"
    return "other"


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def group_names_of(tree: Any, groups: Callable[[tuple], str] = default_groups) -> tuple[str, ...]:
    """Sorted distinct group names of a template pytree's leaves (layer_2 before layer_10)."""
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return tuple(sorted({groups(p) for p in paths}, key=_natural))


def _sq_norm(leaves: Sequence[Array]) -> Array:
    return sum((jnp.sum(jnp.square(_f32(x))) for x in leaves), jnp.zeros((), jnp.float32))


def _float_leaves(tree: Any) -> list[tuple[tuple, Array]]:
    """(path, leaf) pairs of inexact leaves (integer and float0 leaves carry no gradient)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(p, x) for p, x in flat if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]


def _nonfinite_leaves(leaves: Sequence[Array], norm: Array) -> Array:
    """Count of non-finite elements. A finite norm proves there are none, so the counting pass
    over every element runs only when the norm is not finite (`lax.cond` runs one branch)."""
    return jax.lax.cond(
        jnp.isfinite(norm),
        lambda: _f32(0.0),
        lambda: sum((_count(~jnp.isfinite(x)) for x in leaves), _f32(0.0)),
    )


def optimization_stats(
    grads: Any,
    updates: Any,
    params: Any,
    *,
    lr: float | Array,
    groups: Callable[[tuple], str] | None = None,
    group_names: Sequence[str] | None = None,
) -> Stats:
    """Norms, non-finite counts and per-group gradient norms of arbitrary pytrees.

    grads, updates, params: pytrees (structures may differ; only inexact leaves count); lr: the
    step's learning rate (float or traced). ``groups`` maps a key path to a group name (static;
    ``default_groups`` when only ``group_names`` is given); ``group_names`` lists the groups
    statically, e.g. ``group_names_of(params)`` (default: those found in ``grads``); a listed
    group with no leaf gets 0, a leaf in an unlisted group raises ValueError at trace time.
    No per-group keys when both are None.

    Returns ``grad_norm``, ``update_norm``, ``param_norm``, ``update_param_ratio``, ``lr``,
    ``nonfinite_{grads,updates,params}`` (counts) and ``grad_norm/<group>``. Norms are plain
    f32 L2 norms, so a NaN (inf) gradient element makes ``grad_norm`` NaN (inf) and
    ``nonfinite_grads`` positive.
    """
    g, u, p = (_float_leaves(t) for t in (grads, updates, params))
    update_norm = jnp.sqrt(_sq_norm([x for _, x in u]))
    param_norm = jnp.sqrt(_sq_norm([x for _, x in p]))
    out = {
        "grad_norm": jnp.sqrt(_sq_norm([x for _, x in g])),
        "update_norm": update_norm,
        "param_norm": param_norm,
        "update_param_ratio": _safe_div(update_norm, param_norm),
        "lr": _f32(lr),
    }
    for key, leaves, norm in (
        ("grads", g, out["grad_norm"]),
        ("updates", u, update_norm),
        ("params", p, param_norm),
    ):
        out[f"nonfinite_{key}"] = _nonfinite_leaves([x for _, x in leaves], norm)
    if groups is None and group_names is None:
        return out
    groups = groups or default_groups
    names = tuple(group_names) if group_names is not None else group_names_of(grads, groups)
    by_group: dict[str, list[Array]] = {n: [] for n in names}
    for path, x in g:
        name = groups(path)
        if name not in by_group:
            leaf = jax.tree_util.keystr(path)
            raise ValueError(f"leaf {leaf} is in group {name!r}, not in group_names {names}.")
        by_group[name].append(x)
    for name, leaves in by_group.items():
        out[f"grad_norm/{name}"] = jnp.sqrt(_sq_norm(leaves))
    return out


def tool_stats(calls: Array, errors: Array, turns: Array, aborted: Array) -> Stats:
    """Tool-use statistics: calls, errors, turns f32[B] per-trajectory counts; aborted bool[B].

    Returns ``tool_calls_mean``, ``tool_error_rate`` (Σ errors / max(Σ calls, 1)),
    ``tool_turns_mean``, ``tool_aborted_frac``.
    """
    calls, errors = _f32(calls), _f32(errors)
    return {
        "tool_calls_mean": jnp.mean(calls),
        "tool_error_rate": jnp.sum(errors) / jnp.maximum(jnp.sum(calls), 1.0),
        "tool_turns_mean": jnp.mean(_f32(turns)),
        "tool_aborted_frac": jnp.mean(_f32(aborted)),
    }


def consistency_stats(mask: Array, lengths: Array) -> Stats:
    """Loss-mask audit: the mask should cover exactly the response's policy tokens.

    mask f32/bool[B, T] loss mask; lengths i32/f32[B] policy tokens per response as reported
    by the sampler (in multi-turn rollouts, without tool-observation tokens).

    Returns ``check_mask_length``: number of rows whose mask sum differs from the length by more
    than 0.5; ``masked_tokens_mean``: mean mask sum per row.
    """
    per_row = jnp.sum(_f32(mask), axis=1)
    return {
        "check_mask_length": _count(jnp.abs(per_row - _f32(lengths)) > 0.5),
        "masked_tokens_mean": jnp.mean(per_row),
    }


def integrity_stats(
    weights: Array, sealed_weights: Array, reference: Array, loaded_reference: Array
) -> Stats:
    """Weight integrity: fingerprints (`fm.integrity.tree_checksum`, uint32) of what a step reads
    against what it should be. ``weights`` (policy and optimizer state as the step reads them)
    against ``sealed_weights`` (as the previous step wrote them): anything that changed them in
    between (a bad restore, a bit flip, a stray write) shows; ``reference`` (the frozen
    reference weights as read) against ``loaded_reference`` (as loaded).

    Returns ``check_weights`` and ``check_reference``: 1.0 on a mismatch, else 0.0.
    """
    return {
        "check_weights": (weights != sealed_weights).astype(jnp.float32),
        "check_reference": (reference != loaded_reference).astype(jnp.float32),
    }


def coefficient_stats(
    effective: Mapping[str, Array], configured: Mapping[str, Array], *, rtol: float = 1e-3
) -> Stats:
    """Regularizer audit: the loss's effective coefficients against the configured ones.

    ``effective``: each coefficient as the loss applies it, measured (e.g. the derivative of
    the loss with respect to its KL or entropy term); ``configured``: the same names as set.
    Returns ``check_coefficients``: how many differ by more than ``rtol`` relative (absolute
    below a magnitude of 1e-6), so a sign flip or a stray override between config and loss
    shows the step it starts.
    """
    if set(effective) != set(configured):
        raise ValueError(f"coefficients {sorted(effective)} against {sorted(configured)}")
    off = [
        jnp.abs(_f32(effective[k]) - _f32(configured[k]))
        > rtol * jnp.maximum(jnp.abs(_f32(configured[k])), 1e-6)
        for k in sorted(effective)
    ]
    return {"check_coefficients": _count(jnp.stack(off))}


def nonfinite_count(stats: Mapping[str, Array]) -> Array:
    """Number of non-finite elements over all values of a stats dict: f32[]."""
    return sum((_count(~jnp.isfinite(_f32(v))) for v in stats.values()), _f32(0.0))


def merge(*dicts: Mapping[str, Array]) -> Stats:
    """Union of stats dicts; raises ValueError when a key appears twice."""
    out: Stats = {}
    for d in dicts:
        dup = out.keys() & d.keys()
        if dup:
            raise ValueError(f"duplicate stat keys: {sorted(dup)}")
        out.update(d)
    return out

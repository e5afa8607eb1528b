"""fm's in-step API: what a policy-gradient train step hands fm, and what it gets back.

A `Monitor` is built once, on the Python side, from what the trainer can provide (`inputs`,
names of `StepInputs` fields) and the signals it wants watched; a signal whose inputs the
trainer lacks is left out and listed in `Monitor.unavailable` with the reason, never dropped
silently. Inside the compiled step::

    read = monitor.read(params, opt_state, ref_params)        # at the start (audits on)
    stats, out, fm_state = monitor.update(inputs, fm_state, read=read,
                                          sealed=(new_params, new_opt_state))

`update` is pure: it computes every statistic its inputs allow (`statistics`), adds the
integrity audits (weights and optimizer state against the previous step's seal, the reference
against its load) and the regularizer audit (`coefficient_probe`), runs the detector, and
returns the statistics, the typed `fm.detect.DetectOutput` and the new `MonitorState` (carry it
in the train state; read the outputs one step late on the host). A trainer that computes some
statistics at another stage (per minibatch inside a scan, say) passes them as `stats=`; the
stage functions (`token_statistics`, `optimization_statistics`, ...) are the same ones.

Shapes: B completions, groups of `group_size` contiguous rows; T response slots.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fm import detect, integrity
from fm import stats as fs

Array = jax.Array


class StepInputs(NamedTuple):
    """The arrays of one policy-gradient step; every field optional (None: not provided).

    Attributes:
      rewards: f32[B] the scores the learner trains on (after the reward pipeline).
      verifier_rewards: f32[B] a shadow verifier's rewards for the same completions.
      lengths: i32[B] policy tokens per response; truncated: bool[B] stopped at the cap.
      response: i32[B, T] sampled tokens; response_mask: [B, T] tokens the sampler produced.
      loss_mask: [B, T] tokens the loss counts (defaults to `response_mask` where needed).
      advantages: f32[B, T] per-token advantages (already masked).
      sampler_logp: f32[B, T] log-probs the sampler reported for its tokens.
      old_logp: f32[B, T] the trainer's log-probs of the behaviour policy (for the mismatch).
      logp: f32[B, T] the trainer's current log-probs; ref_logp: f32[B, T] the reference's.
      entropy: f32[B, T] per-token policy entropy.
      grads, updates, params: pytrees of one optimizer update; lr: f32[] its learning rate.
      tool_calls, tool_errors, tool_turns: f32[B] counts per trajectory; tool_aborted: bool[B].
      coefficients: (effective, configured), dicts {"kl_coef", "ent_coef"} of f32[]: the
        coefficients the loss applied (measured with `coefficient_probe`) and as configured.
    """

    rewards: Any = None
    verifier_rewards: Any = None
    lengths: Any = None
    truncated: Any = None
    response: Any = None
    response_mask: Any = None
    loss_mask: Any = None
    advantages: Any = None
    sampler_logp: Any = None
    old_logp: Any = None
    logp: Any = None
    ref_logp: Any = None
    entropy: Any = None
    grads: Any = None
    updates: Any = None
    params: Any = None
    lr: Any = None
    tool_calls: Any = None
    tool_errors: Any = None
    tool_turns: Any = None
    tool_aborted: Any = None
    coefficients: Any = None


INPUTS = StepInputs._fields

# Each statistic group of `statistics`: the inputs it needs (all of them) and the stat keys it
# yields. The signals a monitor can watch follow from this table.
_GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "mismatch": (
        ("sampler_logp", "old_logp", "response_mask"),
        ("mismatch_k3", "mismatch_max_abs", "is_ratio_mean", "is_ratio_max", "is_ess"),
    ),
    "kl": (("logp", "ref_logp", "loss_mask"), ("kl_ref_k1", "kl_ref_k3", "kl_ref_max")),
    "entropy": (("entropy", "loss_mask"), ("entropy_mean", "entropy_min_seq")),
    "advantage": (
        ("advantages", "loss_mask", "rewards"),
        (
            "adv_mean",
            "adv_std",
            "adv_max_abs",
            "adv_group_mean_max_abs",
            "adv_shadow_corr",
            "adv_shadow_sign_agree",
            "adv_scale_ratio",
            "check_adv_sign",
            "check_adv_group_mean",
            "check_adv_flip",
        ),
    ),
    "optimization": (
        ("grads", "updates", "params", "lr"),
        (
            "grad_norm",
            "update_norm",
            "param_norm",
            "update_param_ratio",
            "lr",
            "nonfinite_grads",
            "nonfinite_updates",
            "nonfinite_params",
        ),
    ),
    "reward": (
        ("rewards",),
        (
            "reward_mean",
            "reward_std",
            "reward_min",
            "reward_max",
            "reward_p10",
            "reward_p50",
            "reward_p90",
            "frac_zero_std_groups",
            "group_reward_std_mean",
            "nonfinite_rewards",
        ),
    ),
    "shadow": (("rewards", "verifier_rewards"), ("reward_shadow_gap",)),
    "length": (
        ("lengths", "truncated"),
        ("length_mean", "length_std", "length_max", "length_min", "clip_ratio", "length_at_cap"),
    ),
    "token": (
        ("response", "response_mask"),
        ("repetition_ratio", "ngram_repeat_ratio", "unique_token_ratio"),
    ),
    "consistency": (("loss_mask", "lengths"), ("check_mask_length", "masked_tokens_mean")),
    "tools": (
        ("tool_calls", "tool_errors", "tool_turns", "tool_aborted"),
        ("tool_calls_mean", "tool_error_rate", "tool_turns_mean", "tool_aborted_frac"),
    ),
    "coefficients": (("coefficients",), ("check_coefficients",)),
}
_AUDIT_KEYS = ("check_weights", "check_reference")


def needs(stat: str) -> tuple[str, ...]:
    """The `StepInputs` fields a statistic needs (the integrity audits need none: they need
    `Monitor(audits=True)`). Raises KeyError for a statistic fm does not compute."""
    for inputs, keys in _GROUPS.values():
        if stat in keys:
            return inputs
    if stat in _AUDIT_KEYS:
        return ()
    raise KeyError(f"fm computes no statistic {stat!r}")


def _has(inputs: StepInputs, *names: str) -> bool:
    return all(getattr(inputs, n) is not None for n in names)


def token_statistics(inputs: StepInputs, *, group_size: int) -> dict[str, Array]:
    """Token-level statistics of one update from the inputs present: sampler/trainer mismatch
    (over `response_mask`), KL to the reference and entropy (over `loss_mask`), advantages
    against a shadow group-normalized estimator (needs `rewards`). Log-probs and entropies are
    read as constants (`stop_gradient`), so this may run inside a differentiated loss."""
    sg = jax.lax.stop_gradient
    out: list[dict[str, Array]] = []
    if _has(inputs, *_GROUPS["mismatch"][0]):
        out.append(
            fs.mismatch_stats(inputs.sampler_logp, sg(inputs.old_logp), inputs.response_mask)
        )
    if _has(inputs, *_GROUPS["kl"][0]):
        out.append(fs.kl_stats(sg(inputs.logp), inputs.ref_logp, inputs.loss_mask))
    if _has(inputs, *_GROUPS["entropy"][0]):
        out.append(fs.entropy_stats(sg(inputs.entropy), inputs.loss_mask))
    if _has(inputs, *_GROUPS["advantage"][0]):
        out.append(
            fs.advantage_stats(
                inputs.advantages, inputs.loss_mask, inputs.rewards, group_size=group_size
            )
        )
    return fs.merge(*out)


def optimization_statistics(inputs: StepInputs) -> dict[str, Array]:
    """Norms, update/param ratio, lr, non-finite counts and per-layer gradient norms of one
    optimizer update (`grads`, `updates`, `params` pytrees; `lr` f32[]); {} without them."""
    if not _has(inputs, *_GROUPS["optimization"][0]):
        return {}
    return fs.optimization_stats(
        inputs.grads, inputs.updates, inputs.params, lr=inputs.lr, groups=fs.default_groups
    )


def rollout_statistics(inputs: StepInputs, *, group_size: int, max_len: int) -> dict[str, Array]:
    """Trajectory-level aggregates from the inputs present: rewards (batch and per group), the
    shadow-verifier gap, lengths (against the cap `max_len`), degeneration of the sampled
    tokens, and the loss-mask audit (mask sum against the reported lengths)."""
    out: list[dict[str, Array]] = []
    if _has(inputs, "rewards"):
        out.append(fs.reward_stats(inputs.rewards, group_size=group_size))
    if _has(inputs, *_GROUPS["shadow"][0]):
        out.append(fs.reward_shadow_stats(inputs.rewards, inputs.verifier_rewards))
    if _has(inputs, *_GROUPS["length"][0]):
        out.append(fs.length_stats(inputs.lengths, inputs.truncated, max_len=max_len))
    if _has(inputs, *_GROUPS["token"][0]):
        out.append(fs.token_stats(inputs.response, inputs.response_mask))
    if _has(inputs, *_GROUPS["consistency"][0]):
        out.append(fs.consistency_stats(inputs.loss_mask, inputs.lengths))
    return fs.merge(*out)


def tool_statistics(inputs: StepInputs) -> dict[str, Array]:
    """Tool-use statistics (`tool_calls`, `tool_errors`, `tool_turns` f32[B], `tool_aborted`
    bool[B]); {} without them."""
    if not _has(inputs, *_GROUPS["tools"][0]):
        return {}
    return fs.tool_stats(
        inputs.tool_calls, inputs.tool_errors, inputs.tool_turns, inputs.tool_aborted
    )


def coefficient_probe() -> dict[str, Array]:
    """Zeros to add to the loss's aggregated KL and entropy terms: `loss = pg - c_ent·(H + p_ent)
    + β·(KL + p_kl)`. The loss's gradient with respect to the probe is the coefficient it
    applies to each term (the entropy one with a minus sign), measured by autodiff, whatever
    stage between config and loss changed it: pass them to `StepInputs.coefficients`."""
    return {"kl_coef": jnp.zeros(()), "ent_coef": jnp.zeros(())}


class Fingerprints(NamedTuple):
    """uint32[] fingerprints (`fm.integrity.tree_checksum`) of what the optimizer owns
    (parameters and optimizer state) and of the frozen reference."""

    weights: Array
    reference: Array


class MonitorState(NamedTuple):
    """Carried in the train state: the detector's history and runtime thresholds and, with
    audits on, the seal of the weights as the last step left them and the reference as loaded
    (None with audits off)."""

    detect: detect.DetectState
    thresholds: detect.Thresholds
    sealed_weights: Array | None
    loaded_reference: Array | None


class Monitor(NamedTuple):
    """fm inside a train step. Build with `monitor(...)`; all methods are pure and jit-safe."""

    detector: detect.Detector
    group_size: int
    max_len: int
    inputs: frozenset[str]
    audits: bool
    unavailable: tuple[tuple[str, str], ...]  # (signal, why) left out at construction
    sharded: bool = False  # arrays on a device mesh: each leaf fingerprinted in its own layout

    def _fingerprint(self, tree) -> Array:
        return integrity.tree_checksum(tree, by_shape=not self.sharded)

    def init(self, params=None, opt_state=None, ref_params=None) -> MonitorState:
        """Fresh state; with audits on, seals (params, opt_state) and fingerprints the
        reference. Every leaf is its own buffer (the state may be donated)."""
        sealed = loaded = None
        if self.audits:
            sealed = self._fingerprint((params, opt_state))
            loaded = self._fingerprint(ref_params)
        state = MonitorState(self.detector.init(), self.detector.thresholds(), sealed, loaded)
        return jax.tree.map(jnp.copy, state)

    def read(self, params, opt_state, ref_params) -> Fingerprints:
        """Fingerprints of the weights and the reference as the step reads them (call before
        using them; audits on)."""
        return Fingerprints(self._fingerprint((params, opt_state)), self._fingerprint(ref_params))

    def seal(self, state: MonitorState, params, opt_state) -> MonitorState:
        """`seal`: the state with the seal renewed to (params, opt_state)."""
        return seal(state, params, opt_state, by_shape=not self.sharded)

    def statistics(self, inputs: StepInputs) -> dict[str, Array]:
        """Every statistic the present inputs allow (see the stage functions)."""
        return fs.merge(
            _coefficients(inputs),
            token_statistics(inputs, group_size=self.group_size),
            optimization_statistics(inputs),
            rollout_statistics(inputs, group_size=self.group_size, max_len=self.max_len),
            tool_statistics(inputs),
        )

    def update(
        self,
        inputs: StepInputs,
        state: MonitorState,
        *,
        stats: Mapping[str, Array] | None = None,
        read: Fingerprints | None = None,
        sealed: tuple[Any, Any] | None = None,
    ) -> tuple[dict[str, Array], detect.DetectOutput, MonitorState]:
        """One step: the integrity audits of `read` against `state` (audits on), the statistics
        of `inputs`, and the detector over those and the trainer's precomputed `stats` (where a
        key is in both, fm's value is used).

        Args:
          inputs: this step's arrays (fields the monitor was not built with are ignored).
          state: the monitor state the previous step returned.
          stats: statistics the trainer computed at other stages (e.g. averaged over the
            minibatches of a scan); also logged, and watched where a signal names them.
          read: `Fingerprints` the step took before using its weights (audits on).
          sealed: (params, opt_state) the step returns, to seal for the next step's audit.

        Returns:
          (fm's statistics: dict of f32[], the audits first; the `DetectOutput`; the new
          `MonitorState`). The trainer's `stats` are not repeated in the returned dict.
        """
        inputs = inputs._replace(**{f: None for f in INPUTS if f not in self.inputs})
        own: dict[str, Array] = {}
        if self.audits:
            if read is None:
                raise ValueError("a monitor with audits needs read= (Monitor.read at step start)")
            own = fs.integrity_stats(
                read.weights, state.sealed_weights, read.reference, state.loaded_reference
            )
        own = fs.merge(own, self.statistics(inputs))
        output, det_state = self.detector.update(
            {**(stats or {}), **own}, state.detect, state.thresholds
        )
        state = state._replace(detect=det_state)
        if sealed is not None:
            state = self.seal(state, *sealed)
        return own, output, state


def seal(state: MonitorState, params, opt_state, *, by_shape: bool = False) -> MonitorState:
    """The state with the seal renewed to (params, opt_state): after the step's update, or after
    a deliberate change between steps (a moment reset), so the next audit does not read it as
    corruption. The identity for a state without audits. `by_shape`: as in
    `fm.integrity.tree_checksum` (the same value; off by default, safe for leaves laid out
    differently on a mesh; `Monitor.seal` passes its monitor's choice)."""
    if state.sealed_weights is None:
        return state
    sealed = integrity.tree_checksum((params, opt_state), by_shape=by_shape)
    return state._replace(sealed_weights=sealed)


def _coefficients(inputs: StepInputs) -> dict[str, Array]:
    if inputs.coefficients is None:
        return {}
    effective, configured = inputs.coefficients
    return fs.coefficient_stats(effective, configured)


def monitor(
    *,
    group_size: int,
    max_len: int,
    inputs: Collection[str] = INPUTS,
    signals: Sequence[detect.Signal] | None = None,
    audits: bool = True,
    config: detect.DetectConfig | None = None,
    sharded: bool = False,
) -> Monitor:
    """Builds a `Monitor` for a trainer that provides `inputs` (`StepInputs` field names).

    Args:
      group_size: completions per prompt (contiguous rows); 1 for non-grouped estimators.
      max_len: response slots T (the length cap).
      inputs: the fields this trainer fills; the others are ignored when given.
      signals: signals to watch (default `fm.detect.default_signals()`); those whose
        statistics need an input not provided, or an audit that is off, are left out and
        listed in `Monitor.unavailable`. A signal naming a statistic fm does not compute is
        kept: the trainer must pass it in `update(..., stats=)`.
      audits: fingerprint weights, optimizer state and reference (bit-exact integrity).
      config: the detector's window, warm-up and default thresholds.
      sharded: the audited arrays are sharded over a device mesh, where two leaves of one
        shape may be laid out differently: each leaf is then fingerprinted on its own (else
        the leaves of one shape are folded together, in fewer and larger operations; the
        fingerprints are the same either way).
    """
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise ValueError(f"unknown inputs {unknown}; accepted: {', '.join(INPUTS)}")
    provided = frozenset(inputs)
    kept, dropped = [], []
    for s in detect.default_signals() if signals is None else signals:
        try:
            missing = [n for n in needs(s.name) if n not in provided]
        except KeyError:  # the trainer's own statistic
            missing = []
        if s.name in _AUDIT_KEYS and not audits:
            dropped.append((s.name, "integrity audits are off"))
        elif missing:
            dropped.append((s.name, f"needs inputs {missing}"))
        else:
            kept.append(s)
    det = detect.detector(kept, config or detect.DetectConfig())
    return Monitor(det, group_size, max_len, provided, audits, tuple(dropped), sharded)

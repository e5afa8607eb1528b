"""fm inside a real Tunix GRPO learner (google-tunix, the `tunix` extra), on a tiny random
Llama 3 and a character tokenizer: a clean run raises no alarm; a fault injected through
Tunix's own interfaces (a learning-rate schedule that spikes, a reward function that flips
rewards) is detected, diagnosed into its family and rolled back through Tunix's checkpoints;
an exception inside fm never stops training."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

pytest.importorskip("tunix")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.models.llama3 import model as llama  # noqa: E402
from tunix.rl import rl_cluster as rlc  # noqa: E402
from tunix.rl.grpo import grpo_learner  # noqa: E402
from tunix.rl.rollout import base_rollout  # noqa: E402

from fm import detect  # noqa: E402
from fm.integrations import tunix as fm_tunix  # noqa: E402
from fm.integrations.tunix import step as tunix_step  # noqa: E402

LETTERS = "abcdefghijklm"
PROMPTS, GROUP, NEW_TOKENS, LR = 4, 4, 8, 3e-4


class CharTokenizer:
    """Pad, BOS, EOS and 13 letters: 16 ids, one a character."""

    vocab = ("<pad>", "<s>", "</s>", *LETTERS)

    def encode(self, text, **kwargs):
        del kwargs
        return [self.vocab.index(c) for c in str(text)]

    def decode(self, ids, **kwargs):
        del kwargs
        return "".join(self.vocab[i] for i in ids if i > 2)

    def bos_id(self):
        return 1

    def eos_id(self):
        return 2

    def pad_id(self):
        return 0


def share_of_a(prompts, completions, **kwargs):
    """Reward: the share of the completion's slots that hold the letter "a"."""
    del prompts, kwargs
    return [c.count("a") / NEW_TOKENS for c in completions]


def _learner(workdir, manager, *, learning_rate=LR, reward_fns=share_of_a, steps, monitored=True):
    config = llama.ModelConfig(
        num_layers=2, vocab_size=16, embed_dim=32, hidden_dim=64, num_heads=2, head_dim=16,
        num_kv_heads=2, rope_theta=10_000, norm_eps=1e-5,
    )  # fmt: skip
    actor = llama.Llama3(config, rngs=nnx.Rngs(0))
    reference = llama.Llama3(config, rngs=nnx.Rngs(1))  # KL to it starts far from 0
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    optimizer = optax.adam(learning_rate)
    if monitored:
        optimizer = fm_tunix.monitor_optimizer(optimizer, learning_rate=learning_rate)
    training = rlc.RLTrainingConfig(
        actor_optimizer=optimizer,
        eval_every_n_steps=10_000,
        max_steps=steps,
        checkpoint_root_directory=os.path.join(workdir, "checkpoints"),
        checkpointing_options=manager.checkpointing_options(every=4, keep=2),
    )
    cluster = rlc.RLCluster(
        actor=actor,
        reference=reference,
        tokenizer=CharTokenizer(),
        cluster_config=rlc.ClusterConfig(
            role_to_mesh={r: mesh for r in (rlc.Role.ACTOR, rlc.Role.REFERENCE, rlc.Role.ROLLOUT)},
            rollout_engine="vanilla",
            offload_to_cpu=False,
            training_config=training,
            rollout_config=base_rollout.RolloutConfig(
                max_tokens_to_generate=NEW_TOKENS,
                max_prompt_length=8,
                kv_cache_size=32,
                temperature=1.0,
            ),  # fmt: skip
        ),
    )
    config = grpo_learner.GRPOConfig(num_generations=GROUP, beta=0.04)
    return mesh, grpo_learner.GRPOLearner(cluster, config, reward_fns=reward_fns)


def _data(steps, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"prompts": np.array(["".join(rng.choice(list(LETTERS), 4)) for _ in range(PROMPTS)])}
        for _ in range(steps)
    ]


def run(workdir, *, steps, manager=None, **kwargs):
    """One Tunix GRPO run with fm attached; returns the manager and the learner."""
    manager = manager or fm_tunix.Manager(workdir=workdir)
    mesh, learner = _learner(workdir, manager, steps=steps, **kwargs)
    manager.attach(learner)
    with warnings.catch_warnings(), mesh:  # Tunix 0.1.5 reads the legacy mesh context
        warnings.simplefilter("ignore", DeprecationWarning)
        learner.train(manager.dataset(_data(steps)))
    return manager, learner


def test_config_names_the_bad_value():
    with pytest.raises(ValueError, match="diagnoser must be 'rules' or 'learned', got 'llm'"):
        fm_tunix.Config(diagnoser="llm")
    with pytest.raises(ValueError, match="verify_window must be an int >= 1, got 0"):
        fm_tunix.Config(verify_window=0)


def _tunix_history(learner, name):
    """A metric as Tunix itself logged it ("global" prefix: the learner's own metrics)."""
    logger = learner.rl_cluster.actor_trainer.metrics_logger
    return np.asarray(logger.get_metric_history("global", name, "train"), np.float64)


def test_clean_run_raises_no_alarm_and_reads_what_tunix_computes(tmp_path):
    steps = 40
    manager, learner = run(str(tmp_path), steps=steps)
    summary = manager.summary()
    assert summary["fm_errors"] == [] and not summary["unmanaged"]
    assert [r["step"] for r in manager.records] == list(range(1, steps + 1))
    assert summary["alarms"] == [] and summary["actions"] == [] and not summary["halted"]
    seen = {"kl_ref_k1", "entropy_mean", "length_mean", "grad_norm", "update_param_ratio"}
    assert seen | {"reward_mean", "adv_scale_ratio", "check_adv_flip"} <= set(summary["signals"])
    # fm's statistics against Tunix's own figures of the same steps (computed independently):
    # the mean completion length (in-step, from the loss), the mean summed reward (host), the
    # learning rate (optimizer) and Tunix's k3 KL ("kl" in its loss aux).
    col = lambda k: np.array([r[k] for r in manager.records])  # noqa: E731
    np.testing.assert_allclose(
        col("length_mean"), _tunix_history(learner, "completions/mean_length"), rtol=1e-6
    )
    np.testing.assert_allclose(
        col("reward_mean"), _tunix_history(learner, "rewards/sum"), rtol=1e-5
    )
    np.testing.assert_allclose(col("lr"), LR, rtol=1e-6)
    kl = learner.rl_cluster.actor_trainer.metrics_logger.get_metric_history("actor", "kl", "train")
    np.testing.assert_allclose(col("kl_ref_k3"), np.asarray(kl), rtol=1e-4, atol=1e-7)
    # No recompiles: Tunix compiles its train step twice by itself (without fm too: the first
    # call's optimizer state is placed unlike its outputs); fm's statistics inside add none
    # over 40 steps, and fm's detector compiles once.
    assert learner.rl_cluster.actor_trainer._jitted_train_step_fn.jitted_fn._cache_size() == 2
    assert isinstance(manager._update, jax.stages.Compiled)  # compiled ahead of time, once
    with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
        assert sum(1 for _ in f) == steps
    # What fm may turn here, declared (fm.remediate.Capabilities), and turning it.
    controller = manager.controller
    caps = controller.capabilities()
    assert {"lr", "lr_scale", "lr_cap", "kl_coef", "eps_low", "temperature"} <= caps.knobs
    assert caps.reset_moments and caps.switches == frozenset()  # no redundant verifier given
    controller.set_knobs(lr_scale=0.5, kl_coef=0.1, temperature=0.7)
    assert controller.knobs()["lr_scale"] == 0.5 and learner.algo_config.beta == 0.1
    assert learner.rl_cluster.cluster_config.rollout_config.temperature == 0.7
    assert learner.rl_cluster.actor_trainer._jitted_train_step_fn is None  # β: retraced
    with pytest.raises(ValueError, match="no knob"):
        controller.set_knobs(grad_clip=1.0)
    controller.reset_moments()
    adam = [s for s in jax.tree.leaves(
        learner.rl_cluster.actor_trainer.optimizer.opt_state, is_leaf=tunix_step._has_moments
    ) if tunix_step._has_moments(s)][0]  # fmt: skip
    assert all(not np.any(np.asarray(v.get_value())) for v in jax.tree.leaves(
        (adam.mu, adam.nu), is_leaf=lambda x: isinstance(x, nnx.Variable)))  # fmt: skip
    assert int(adam.count.get_value()) == steps  # the step count is kept


def _checkpoint_params(workdir, step):
    """The weights of Tunix's checkpoint of `step`, read with Orbax directly."""
    path = os.path.join(workdir, "checkpoints", "actor", str(step), "model_params")
    return jax.tree.leaves(ocp.PyTreeCheckpointer().restore(path))


def _spy_restores(monkeypatch, workdir):
    """Records, for every rollback, whether the weights after it equal the checkpoint's."""
    restored = []
    original = fm_tunix.Controller.restore

    def restore(self, step):
        expected = _checkpoint_params(workdir, step)
        original(self, step)
        now = jax.tree.leaves(nnx.state(self.trainer.model).to_pure_dict())
        same = len(now) == len(expected) and all(
            np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(now, expected, strict=True)
        )
        restored.append((step, same))

    monkeypatch.setattr(fm_tunix.Controller, "restore", restore)
    return restored


def test_lr_spike_is_detected_diagnosed_and_rolled_back_through_tunix(tmp_path, monkeypatch):
    onset = 24  # the schedule (Tunix's optimizer) multiplies the learning rate by 30 from here

    def schedule(count):  # count = updates so far: update `onset` sees count onset - 1
        return LR * jnp.where(count >= onset - 1, 30.0, 1.0)

    restored = _spy_restores(monkeypatch, str(tmp_path))
    manager, _ = run(str(tmp_path), steps=40, learning_rate=schedule)
    summary = manager.summary()
    assert summary["fm_errors"] == []
    assert onset <= summary["alarms"][0] < onset + 10
    diagnosis = summary["diagnoses"][0]
    assert diagnosis["family"] == "optimization-dynamics", diagnosis
    # Rolled back through Tunix's checkpoints (every 4 steps) to one before the onset, the
    # weights equal to the checkpoint's; the learning-rate cap of `monitor` ends the fault's
    # effect and the run verifies as recovered.
    first = summary["actions"][0]
    assert first["restored_to"] < onset and first["restored_to"] % 4 == 0
    assert restored and all(same for _, same in restored), restored
    remedies = [a["remedy"] for action in summary["actions"] for a in action["actions"]]
    assert "lr_cap" in remedies, remedies
    assert summary["verifications"][-1]["outcome"] == "recovered", summary["verifications"]
    assert not summary["halted"]
    after = [r for r in manager.records if r["step"] > summary["verifications"][-1]["step"] - 5]
    assert all(r["lr"] <= LR * 1.0001 for r in after)  # the cap holds the spike at the old rate


def _raise(message):
    def broken(*args, **kwargs):
        raise RuntimeError(message)

    return broken


@pytest.mark.parametrize("where", ["diagnoser", "host statistics", "in-step statistics"])
def test_an_exception_inside_fm_never_stops_tunix(tmp_path, monkeypatch, where):
    """fm raising in its diagnoser, in its host statistics (a verifier that fails at step 5)
    or while Tunix traces fm's in-step statistics: an fm_error, and Tunix trains every step."""
    steps, diagnoser, shadow = 10, None, None
    # Thresholds that alarm on the first steps past a 2-step warm-up, so the diagnoser runs.
    config = fm_tunix.Config(detect=detect.DetectConfig(warmup=2, z_threshold=1e-3))
    if where == "diagnoser":
        diagnoser = _raise("diagnoser bug")
    elif where == "host statistics":
        calls = []

        def shadow(prompts, completions, **kwargs):
            calls.append(1)
            if len(calls) == 5:
                raise RuntimeError("verifier bug")
            return share_of_a(prompts, completions)

    else:  # fails while Tunix traces its train step (not when fm sizes its keys at attach)
        sizing = fm_tunix.step_stats

        def step_stats(example, logits, **kwargs):
            if logits.shape[0] == GROUP:
                return sizing(example, logits, **kwargs)
            raise RuntimeError("statistics bug")

        monkeypatch.setattr(tunix_step, "step_stats", step_stats)
    manager = fm_tunix.Manager(
        config, workdir=str(tmp_path), diagnoser=diagnoser, shadow_reward_fn=shadow
    )
    manager, learner = run(str(tmp_path), steps=steps, manager=manager)
    summary = manager.summary()
    assert learner.rl_cluster.actor_trainer.train_steps == steps
    assert summary["unmanaged"] and len(summary["fm_errors"]) == 1
    error = summary["fm_errors"][0]
    assert error["where"] == where if where != "diagnoser" else error["where"] == "host side"
    assert "bug" in error["traceback"]
    assert summary["actions"] == [] and len(manager.records) < steps  # unmanaged since


def _flipping(onset):
    """A reward function that flips every other reward from training step `onset` on."""
    calls = []

    def flipping(prompts, completions, mode, **kwargs):
        calls.append(mode)
        rewards = share_of_a(prompts, completions)
        if calls.count("train") >= onset:
            return [1.0 - r if i % 2 == 0 else r for i, r in enumerate(rewards)]
        return rewards

    return flipping


def test_flipped_rewards_fail_over_to_the_redundant_verifier(tmp_path):
    onset = 24
    flipping = _flipping(onset)
    manager = fm_tunix.Manager(workdir=str(tmp_path), shadow_reward_fn=share_of_a)
    manager, learner = run(str(tmp_path), steps=40, manager=manager, reward_fns=flipping)
    summary = manager.summary()
    assert summary["fm_errors"] == []
    assert "reward_shadow_gap" in summary["signals"]
    assert onset <= summary["alarms"][0] < onset + 10
    assert summary["diagnoses"][0]["family"] == "reward", summary["diagnoses"][0]
    assert summary["actions"][0]["restored_to"] < onset
    remedies = [a["remedy"] for action in summary["actions"] for a in action["actions"]]
    assert "verifier_failover" in remedies, remedies
    assert learner.reward_fns == [share_of_a]  # Tunix now scores with the verifier
    assert summary["verifications"][-1]["outcome"] == "recovered", summary["verifications"]
    assert manager.records[-1]["reward_shadow_gap"] == 0.0


def test_without_a_verifier_the_failover_is_unavailable_and_tunix_halts(tmp_path):
    """No redundant verifier: the diagnosis lists verifier_failover as unavailable, the plan
    rolls back, raises Tunix's β, and halts Tunix with a report when the alarm persists."""
    onset = 24
    manager, learner = run(str(tmp_path), steps=40, reward_fns=_flipping(onset))
    summary = manager.summary()
    assert summary["fm_errors"] == []
    assert onset <= summary["alarms"][0] < onset + 10
    diagnosis = summary["diagnoses"][0]
    assert diagnosis["family"] == "reward", diagnosis
    missing = {u["remedy"]: u["reason"] for u in diagnosis["unavailable"]}
    assert "no switch verifier_failover" in missing["verifier_failover"]
    assert summary["actions"] and summary["halted"]
    assert summary["halt_report"]["reason"] == "the plan is used up"
    remedies = [a["remedy"] for action in summary["actions"] for a in action["actions"]]
    assert "raise_kl" in remedies and learner.algo_config.beta == 0.08  # Tunix's own β, ×2
    # The halt is observed one step late, so Tunix stops after the step in flight.
    halt = next(e for e in manager.events if e["event"] == "halt")
    assert learner.rl_cluster.actor_trainer.train_steps == halt["step"] + 1 < 40

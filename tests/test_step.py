"""The compiled RL step: invariants of GRPO / PPO updates, metrics, no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rftjax import models
from rftjax.config import RLConfig
from rftjax.knobs import make_knobs
from rftjax.tasks import make_task
from rftjax.train.setup import to_prompt_batch
from rftjax.train.step import init_state, make_learner

MODEL = models.ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=2
)
REQUIRED = (
    "reward_mean",
    "reward_std",
    "frac_zero_std_groups",
    "adv_mean",
    "adv_std",
    "adv_max_abs",
    "entropy",
    "kl_ref",
    "ppo_kl",
    "clipfrac_low",
    "clipfrac_high",
    "is_ratio_mean",
    "is_ratio_max",
    "length_mean",
    "length_max",
    "clip_ratio",
    "grad_norm",
    "update_norm",
    "lr",
)


@pytest.fixture(scope="module")
def task():
    return make_task("arith", seed=0, eval_size=16)


def _setup(task, **rl):
    cfg = RLConfig(prompts_per_step=4, group_size=4, max_new_tokens=4, **rl)
    graphdef, params = models.create(MODEL, 0)
    learner = make_learner(graphdef, cfg, eos_id=2, pad_id=0, reward_fn=task.jnp_reward)
    return cfg, graphdef, learner, init_state(params, cfg, 0)


def _batch(task, step):
    return to_prompt_batch(task.train_batch(step, 4))


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_step_reports_required_metrics_and_compiles_once(task, algo):
    _, _, learner, state = _setup(task, algo=algo)
    for i, lr in enumerate([1e-3, 5e-4, 2e-4]):
        knobs = make_knobs(lr=lr, kl_coef=0.1 * i, temperature=1.0 - 0.1 * i, top_p=1.0 - 0.05 * i)
        state, metrics = learner.step(state, _batch(task, i), knobs)
    assert learner.step._cache_size() == 1
    metrics = jax.device_get(metrics)
    missing = [k for k in REQUIRED if k not in metrics]
    assert not missing
    assert all(np.isfinite(v) for v in metrics.values())
    assert int(state.step) == 3 and float(metrics["lr"]) == pytest.approx(2e-4)


def test_split_rollout_and_learn_compile_once(task):
    _, _, learner, state = _setup(task)
    for i in range(2):
        knobs = make_knobs(lr=1e-3 / (i + 1), eps_high=0.2 + 0.1 * i)
        ro = learner.rollout(state, _batch(task, i), knobs)
        rewards = {"reward": jnp.asarray(np.random.default_rng(i).random(16), jnp.float32)}
        state, _ = learner.learn(state, ro, rewards, knobs)
    assert learner.rollout._cache_size() == 1 and learner.learn._cache_size() == 1


def test_caller_params_survive_the_donated_step(task):
    cfg, _, learner, _ = _setup(task)
    _, params = models.create(MODEL, 0)
    state = init_state(params, cfg, 0)
    learner.step(state, _batch(task, 0), make_knobs())
    assert np.isfinite(np.asarray(params["model"]["norm"]["weight"])).all()  # not deleted


def test_constant_rewards_give_no_update_without_regularizers(task):
    # Equal rewards in every group: all GRPO advantages are 0, so with β = 0 and no entropy bonus
    # the gradient is exactly 0 and Adam leaves the parameters where they are.
    _, _, learner, state = _setup(task)
    knobs = make_knobs(lr=1e-2, kl_coef=0.0, ent_coef=0.0)
    before = jax.tree.map(np.array, state.params)
    ro = learner.rollout(state, _batch(task, 0), knobs)
    state, metrics = learner.learn(state, ro, {"reward": jnp.ones(16)}, knobs)
    assert float(metrics["grad_norm"]) == 0.0 and float(metrics["frac_zero_std_groups"]) == 1.0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_grpo_step_moves_probability_toward_rewarded_completions(task):
    cfg, graphdef, learner, state = _setup(task)
    knobs = make_knobs(lr=1e-3, kl_coef=0.0)
    ro = learner.rollout(state, _batch(task, 0), knobs)
    rewards = jnp.tile(jnp.array([1.0, 0.0, 0.0, 0.0]), 4)
    from rftjax.sampling import response_logprobs

    def seq_logp(policy):
        lp, _, _ = response_logprobs(
            graphdef,
            policy,
            ro.tokens[::4, :-4],
            ro.valid[::4, :-4],
            ro.response,
            ro.response_mask,
            knobs.temperature,
        )
        return np.asarray((lp * ro.response_mask).sum(-1))

    before = seq_logp(state.params["policy"])
    state, metrics = learner.learn(state, ro, {"reward": rewards}, knobs)
    gain = seq_logp(state.params["policy"]) - before
    rewarded = np.asarray(rewards) > 0
    assert gain[rewarded].mean() > 0 > gain[~rewarded].mean()
    assert float(metrics["ppo_kl"]) == 0.0  # one update: the behaviour policy is the current one


def test_several_updates_per_rollout_move_off_policy(task):
    _, _, learner, state = _setup(task, num_epochs=2, num_minibatches=2)
    state, metrics = learner.step(state, _batch(task, 0), make_knobs(lr=1e-2))
    # 4 updates: after the first, the trainer has moved away from the behaviour policy.
    assert float(metrics["ratio_max"]) > 1.0
    assert float(metrics["is_ratio_mean"]) == pytest.approx(1.0, abs=1e-5)


def test_ppo_trains_its_value_head(task):
    _, _, learner, state = _setup(task, algo="ppo")
    w0 = np.array(state.params["value_head"]["weight"])
    knobs = make_knobs(lr=1e-2, vf_coef=1.0)
    ro = learner.rollout(state, _batch(task, 0), knobs)
    rewards = {"reward": jnp.asarray(np.random.default_rng(0).random(16), jnp.float32)}
    state, metrics = learner.learn(state, ro, rewards, knobs)
    assert np.abs(np.asarray(state.params["value_head"]["weight"]) - w0).max() > 0
    assert "vf_loss" in metrics and np.isfinite(float(metrics["vf_loss"]))


def test_truncated_importance_weights_follow_the_knob(task):
    # Sampler log-probs 0.5 nats below the trainer's: every ratio is e^0.5 ≈ 1.65. With β = 0 the
    # gradient is the policy-gradient term alone, scaled by the (constant) weight.
    _, _, learner, state = _setup(task)
    ro = learner.rollout(state, _batch(task, 0), make_knobs())
    shifted = ro._replace(logp=ro.logp - 0.5 * ro.response_mask)
    rewards = {"reward": jnp.asarray(np.random.default_rng(0).random(16), jnp.float32)}

    def grad_norm(is_cap):
        knobs = make_knobs(lr=0.0, kl_coef=0.0, is_cap=is_cap)
        _, m = learner.learn(jax.tree.map(jnp.copy, state), shifted, rewards, knobs)
        assert float(m["is_ratio_mean"]) == pytest.approx(np.exp(0.5), rel=1e-4)
        return float(m["grad_norm"])

    off, capped, loose = grad_norm(0.0), grad_norm(1.2), grad_norm(10.0)
    assert off > 0
    assert capped / off == pytest.approx(1.2, rel=1e-4)
    assert loose / off == pytest.approx(np.exp(0.5), rel=1e-4)


def test_skip_nonfinite_keeps_weights_and_moments_through_a_nan_gradient():
    import optax

    from rftjax.train.step import apply_update

    params = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
    optimizer = optax.scale_by_adam()
    state = optimizer.init(params)
    nan = {"w": jnp.array([jnp.nan, 1.0, 1.0, 1.0]), "b": jnp.ones(2)}
    fn = jax.jit(lambda p, s, g, k: apply_update(p, s, g, k, 1e-2, optimizer)[:2])
    for switch in (1.0, 0.0):
        new_params, new_state = fn(params, state, nan, make_knobs(skip_nonfinite=switch))
        leaves = jax.tree.leaves((new_params, new_state))
        if switch:  # skipped: everything as it was
            for a, b in zip(leaves, jax.tree.leaves((params, state)), strict=True):
                np.testing.assert_array_equal(a, b)
        else:
            assert not all(np.isfinite(x).all() for x in leaves)
    finite = {"w": jnp.ones(4), "b": jnp.ones(2)}  # a finite step is not skipped
    moved, _ = fn(params, state, finite, make_knobs(skip_nonfinite=1.0))
    assert not np.array_equal(moved["w"], params["w"])
    assert fn._cache_size() == 1  # the switch is a runtime value

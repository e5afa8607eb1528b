"""Tool use: the calculator, the call protocol's error observations, multi-turn generation with
the KV cache, and observation tokens kept out of the loss."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import small_shapes

from rftjax import algorithms as alg
from rftjax import models, sampling, tools
from rftjax.config import RLConfig
from rftjax.knobs import make_knobs
from rftjax.tasks import make_task
from rftjax.tasks.calc import after_last_observation, tool_reward
from rftjax.tokenizer import EOS_ID, PAD_ID, char_tokenizer
from rftjax.train.step import PromptBatch, init_state, make_learner

CFG = small_shapes.MODEL.replace(vocab_size=64)
TOK = char_tokenizer()
CALL, END = 4, 5  # <call> </call>
N = 24


def ids(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


def env(**kw):
    kw = {"max_obs": 16, "max_turns": 2, "timeout": 1.0, **kw}
    return tools.ToolEnv({"calc": tools.calculate}, TOK, alphabet="0123456789+-*/() ", **kw)


@pytest.fixture(scope="module")
def model():
    return models.create(CFG, 0)


def test_calculator_values_and_refusals():
    assert tools.calculate("37*58") == "2146"
    assert tools.calculate("2+3*4") == "14"
    assert tools.calculate("(2+3)*4") == "20"
    assert tools.calculate("-7/2") == "-4"  # "/" is floor division
    for bad in ["", "3**", "2**10", "1/0", "a+1", "__import__('os')", "9" * 300]:
        with pytest.raises(ValueError):
            tools.calculate(bad)


def test_each_failure_is_an_error_observation():
    def slow(_):
        time.sleep(2.0)
        return "1"

    def raises(_):
        raise RuntimeError("boom")

    e = tools.ToolEnv({"slow": slow, "raises": raises, "calc": tools.calculate}, TOK, max_obs=16)
    e.timeout = 0.2
    cases = {
        "calc: 6*7": (tools.OK, "42"),
        "calc 6*7": (tools.PARSE_ERROR, "error: parse"),  # no "name:" with several tools
        "nope: 1": (tools.PARSE_ERROR, "error: parse"),
        "raises: 1": (tools.TOOL_ERROR, "error: tool"),
        "calc: 3**": (tools.TOOL_ERROR, "error: tool"),
        "slow: 1": (tools.TIMEOUT, "error: timeout"),
    }
    for text, (status, observation) in cases.items():
        got, obs = e.call(ids(text))
        assert got == status, text
        assert TOK.decode(obs) == f"<result>{observation}</result>"
    assert e.call(None)[0] == tools.PARSE_ERROR  # </call> with no <call>
    assert e.call([CALL, *ids("1")])[0] == tools.PARSE_ERROR  # a marker inside the call
    # After a time-out the environment still answers (a fresh worker thread).
    assert e.call(ids("calc: 1+1")) == (tools.OK, [6, *ids("2"), 7])


def test_long_observations_are_cut_keeping_the_closing_marker():
    e = env(max_obs=5)
    status, obs = e.call(ids("99999*99999"))
    assert status == tools.OK and TOK.decode(obs) == "<result>999</result>"


def _script(rows):
    """[B, N] token script: row r's tokens at the positions the policy writes (observation
    positions are filled by the environment; what the script holds there is ignored)."""
    out = np.full((len(rows), N), EOS_ID, np.int32)
    for r, seq in enumerate(rows):
        out[r, : len(seq)] = seq
    return jnp.asarray(out)


def _force(script):
    def hook(logits, i):
        col = jax.lax.dynamic_index_in_dim(script, i, axis=1, keepdims=False)
        return jnp.where(jax.nn.one_hot(col, logits.shape[-1]) > 0, 30.0, -30.0)

    return hook


def _scripted(model, script, e, sampling_params=None):
    graphdef, params = model
    b = script.shape[0]
    prompts = jnp.full((b, 3), 8, jnp.int32)
    return jax.jit(
        functools.partial(
            sampling.generate,
            graphdef,
            max_new_tokens=N,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            logits_hook=_force(script),
            tools=e.spec(),
        )
    )(
        params,
        prompts,
        jnp.ones_like(prompts),
        jax.random.PRNGKey(0),
        sampling_params or sampling.sampling_params(temperature=0.0),
    )


OBS = 4  # <result> 1 2 </result>
X = 0  # placeholder at positions the environment fills


def test_multi_turn_rollout_feeds_observations_and_counts_calls(model):
    e = env()
    rows = [
        [CALL, *ids("3*4"), END, *[X] * OBS, *ids("12"), EOS_ID],  # a good call
        [CALL, *ids("x"), END, *[X] * 14, *ids("5"), EOS_ID],  # malformed: parse error
        [*ids("7"), EOS_ID],  # no call
        [END, *[X] * 14, *ids("1"), EOS_ID],  # </call> without <call>
        [CALL, *ids("3**"), END, *[X] * 13, EOS_ID],  # the tool raises
        [CALL, END, *[X] * 14, CALL, *ids("1"), END, *[X] * 3, CALL, END],  # limit
    ]
    ro = jax.device_get(_scripted(model, _script(rows), e))
    text = lambda r: TOK.decode([t for t in ro.response[r] if t != PAD_ID])
    assert text(0) == "<call>3*4</call><result>12</result>12<eos>"
    assert text(1) == "<call>x</call><result>error: parse</result>5<eos>"
    assert text(2) == "7<eos>"
    assert text(3) == "</call><result>error: parse</result>1<eos>"
    assert text(4) == "<call>3**</call><result>error: tool</result><eos>"
    # Row 5: an empty call (parse error), a good one, then a third call over max_turns=2:
    # the row is aborted right after that </call>.
    assert text(5) == (
        "<call></call><result>error: parse</result><call>1</call><result>1</result><call></call>"
    )
    np.testing.assert_array_equal(ro.tool_calls, [1, 1, 0, 1, 1, 2])
    np.testing.assert_array_equal(ro.tool_errors, [0, 1, 0, 1, 1, 2])
    # Of those, the environment's own failures: only row 4's tool raising (parse errors and
    # the turn limit are the policy's doing).
    np.testing.assert_array_equal(ro.tool_failures, [0, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(ro.turns, ro.tool_calls + 1)
    np.testing.assert_array_equal(ro.aborted, [0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(ro.truncated, [0] * 6)
    # Observation positions: real context (valid) but not the policy's (mask 0, log-prob 0).
    p = 3
    obs = ro.valid[:, p:] & (ro.response_mask == 0)
    assert obs[0].tolist() == [0] * 5 + [1] * OBS + [0] * (N - 5 - OBS)
    assert np.all(ro.logp[obs] == 0)
    np.testing.assert_array_equal(ro.lengths, ro.response_mask.sum(1))
    assert ro.lengths[0] == 5 + 3  # <call> 3 * 4 </call>, then 1 2 <eos>


def test_a_timeout_in_the_sampler_is_an_error_observation_and_the_rollout_goes_on(model):
    calls = []

    def slow(text):
        calls.append(text)
        if text == "1":
            time.sleep(1.5)
        return text

    e = tools.ToolEnv({"echo": slow}, TOK, max_obs=16, timeout=0.2)
    rows = [[CALL, *ids("1"), END, *[X] * 16, EOS_ID], [CALL, *ids("2"), END, X, X, X, EOS_ID]]
    ro = jax.device_get(_scripted(model, _script(rows), e))
    assert TOK.decode(ro.response[0][3:19]) == "<result>error: timeout</result>"
    assert TOK.decode(ro.response[1][3:6]) == "<result>2</result>"
    np.testing.assert_array_equal(ro.tool_errors, [1, 0])
    np.testing.assert_array_equal(ro.tool_failures, [1, 0])  # a timeout is the environment's
    assert sorted(calls) == ["1", "2"]  # both rows were served in the one round-trip


def _partial_script(b, seed):
    """Forces ``<call>d*d</call>`` at positions 0-4 of every row; the model chooses every
    later token (after the observation) itself."""
    rng = np.random.default_rng(seed)
    script = np.full((b, N), -1, np.int32)
    script[:, 0], script[:, 4] = CALL, END
    script[:, 1] = rng.integers(8, 18, b)
    script[:, 2] = 20  # "*"
    script[:, 3] = rng.integers(8, 18, b)
    script = jnp.asarray(script)

    def hook(logits, i):
        col = jax.lax.dynamic_index_in_dim(script, i, axis=1, keepdims=False)
        forced = jnp.where(jax.nn.one_hot(col, logits.shape[-1]) > 0, 30.0, -30.0)
        return jnp.where((col >= 0)[:, None], forced, logits)

    return hook


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_multi_turn_generation_with_the_cache_equals_full_recompute(model, temperature):
    graphdef, params = model
    e = env()
    rng = np.random.default_rng(1)
    prompts = jnp.asarray(rng.integers(8, 56, (3, 5)), jnp.int32)
    mask = jnp.ones_like(prompts).at[0, :2].set(0)
    prompts = jnp.where(mask > 0, prompts, PAD_ID)
    kw = dict(
        group_size=2,
        max_new_tokens=N,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        logits_hook=_partial_script(6, 0),
        tools=e.spec(),
    )
    sp = sampling.sampling_params(temperature=temperature)
    key = jax.random.PRNGKey(3)
    cached = jax.jit(functools.partial(sampling.generate, graphdef, **kw))(
        params, prompts, mask, key, sp
    )
    full = jax.jit(functools.partial(sampling.generate_recompute, graphdef, **kw))(
        params, prompts, mask, key, sp
    )
    cached, full = jax.device_get((cached, full))
    assert cached.tool_calls.min() >= 1  # every row called and got an observation
    np.testing.assert_array_equal(cached.response, full.response)
    np.testing.assert_array_equal(cached.valid, full.valid)
    np.testing.assert_array_equal(cached.response_mask, full.response_mask)
    np.testing.assert_allclose(cached.logp, full.logp, atol=2e-5)
    # The model's own tokens after the observation exist (the test compares real decoding).
    assert cached.response_mask[:, 9:].sum() > 0


def test_trainer_logprobs_match_the_sampler_across_observations(model):
    graphdef, params = model
    e = env()
    prompts = jnp.full((2, 3), 9, jnp.int32)
    ro = jax.jit(
        functools.partial(
            sampling.generate,
            graphdef,
            group_size=4,
            max_new_tokens=N,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            logits_hook=_partial_script(8, 1),
            tools=e.spec(),
        )
    )(params, prompts, jnp.ones_like(prompts), jax.random.PRNGKey(0), sampling.sampling_params())
    # Forced positions carry the hook's log-probs; compare where the model chose freely.
    logp, _, _ = sampling.response_logprobs(
        graphdef, params, prompts, jnp.ones_like(prompts), ro.response, ro.valid[:, 3:], 1.0
    )
    free = np.asarray(ro.response_mask > 0) & (np.arange(N) >= 5)[None]
    assert free.sum() > 0
    np.testing.assert_allclose(np.asarray(logp)[free], np.asarray(ro.logp)[free], atol=2e-5)


def _tool_learner(model, **kw):
    graphdef, params = model
    rl = RLConfig(prompts_per_step=2, group_size=4, max_new_tokens=N)
    learner = make_learner(graphdef, rl, eos_id=EOS_ID, pad_id=PAD_ID, tools=env().spec(), **kw)
    return rl, learner, init_state(params, rl, 0)


def _tool_rollout(model):
    """A rollout in which every row calls the calculator (forced), then the model writes."""
    rl, learner, state = _tool_learner(model)
    graphdef, params = model
    prompts = jnp.full((2, 3), 9, jnp.int32)
    ro = sampling.generate(
        graphdef,
        params,
        prompts,
        jnp.ones_like(prompts),
        jax.random.PRNGKey(5),
        sampling.sampling_params(),
        group_size=4,
        max_new_tokens=N,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        logits_hook=_partial_script(8, 2),
        tools=env().spec(),
    )
    return rl, learner, state, ro


def test_observation_tokens_do_not_count_in_loss_kl_or_entropy(model):
    rl, learner, state, ro = _tool_rollout(model)
    obs = (ro.valid[:, 3:]) & (ro.response_mask == 0)
    assert int(obs.sum()) >= 8 * 3  # every row has an observation
    rewards = {"reward": jnp.arange(8, dtype=jnp.float32) % 3}
    knobs = make_knobs(kl_coef=0.1, ent_coef=0.01)
    # Reference = policy moved a little, so that the KL term is not zero.
    ref = jax.tree.map(lambda x: x * 1.01, state.ref_params)
    state = state._replace(ref_params=ref)
    copy = lambda s: jax.tree.map(jnp.copy, s)
    _, metrics = learner.learn(copy(state), ro, rewards, knobs)

    # Independent computation over the policy's tokens only.
    graphdef, params = model
    args = (jnp.full((2, 3), 9, jnp.int32), jnp.ones((2, 3), jnp.int32), ro.response)
    logp, ent, _ = sampling.response_logprobs(graphdef, params, *args, ro.valid[:, 3:], 1.0)
    ref_logp, _, _ = sampling.response_logprobs(graphdef, ref, *args, ro.valid[:, 3:], 1.0)
    mask = ro.response_mask
    adv = alg.group_advantages(rewards["reward"], group_size=4)[:, None] * mask
    agg = dict(mode="token_mean", max_len=N)
    pg = -alg.aggregate(adv, mask, **agg)
    kl = alg.aggregate(alg.kl_penalty(logp, ref_logp, kind="k3"), mask, **agg)
    entropy = alg.aggregate(ent, mask, **agg)
    np.testing.assert_allclose(metrics["pg_loss"], pg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["kl_ref"], kl, rtol=1e-4)
    np.testing.assert_allclose(metrics["entropy"], entropy, rtol=1e-5)
    # Counting the observation tokens would give other values (the check can fail).
    everything = ro.valid[:, 3:].astype(jnp.float32)
    adv_all = alg.group_advantages(rewards["reward"], group_size=4)[:, None] * everything
    assert abs(alg.aggregate(adv_all, everything, **agg) + pg) > 1e-2

    # The sampler's log-probs of observation tokens do not enter the update at all.
    noisy = ro._replace(logp=jnp.where(obs, -5.0, ro.logp))
    s1, m1 = learner.learn(copy(state), ro, rewards, knobs)
    s2, m2 = learner.learn(copy(state), noisy, rewards, knobs)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert jax.device_get(m1) == jax.device_get(m2)
    assert float(metrics["tool_calls_mean"]) >= 1.0


def test_tool_rollout_and_step_compile_once(model):
    rl, learner, state = _tool_learner(model)
    task = make_task("calc", seed=0)
    graphdef, _ = model
    learner = make_learner(
        graphdef,
        rl,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        reward_fn=tool_reward,
        tools=task.tools.spec(),
    )
    for step in range(2):
        b = task.train_batch(step, 2)
        batch = PromptBatch(*(jnp.asarray(x) for x in (b.prompts, b.prompt_mask, b.answers)))
        knobs = make_knobs(temperature=1.0 - 0.1 * step, lr=1e-4 * (step + 1))
        state, metrics = learner.step(state, batch, knobs)
    assert learner.step._cache_size() == 1
    assert "tool_calls_mean" in metrics


def test_tool_reward_scores_what_follows_the_last_observation():
    answers = jnp.asarray([ids("12") + [EOS_ID, PAD_ID]] * 4, jnp.int32)
    texts = [
        "<call>3*4</call><result>12</result>12<eos>",  # right, with the tool
        "12<eos>",  # right, without
        "<call>3*4</call><result>12</result>13<eos>",  # wrong answer
        "<call>3*4</call><result>12</result>",  # no answer after the observation
    ]
    resp = np.full((4, 20), PAD_ID, np.int32)
    for r, t in enumerate(texts):
        row = TOK(t.replace("<eos>", ""), add_special_tokens=False)["input_ids"]
        row += [EOS_ID] if t.endswith("<eos>") else []
        resp[r, : len(row)] = row
    out = jax.device_get(tool_reward(jnp.asarray(resp), answers))
    np.testing.assert_array_equal(out["correct"], [1, 1, 0, 0])
    np.testing.assert_array_equal(out["tool_used"], [1, 0, 1, 1])
    np.testing.assert_array_equal(out["format"], [1, 1, 1, 0])
    tail = jax.device_get(after_last_observation(jnp.asarray(resp)))
    assert TOK.decode([t for t in tail[0] if t != PAD_ID]) == "12<eos>"
    # The host-side twin agrees.
    task = make_task("calc", seed=0)
    host = task.text_reward([t.replace("<eos>", "") for t in texts], ["12"] * 4)
    np.testing.assert_array_equal(host["correct"][:3], out["correct"][:3])
    np.testing.assert_array_equal(host["tool_used"], out["tool_used"])


def test_calc_demonstrations_mask_observations_out_of_the_warmup_loss():
    task = make_task("calc", seed=0, tool_demo_fraction=0.5)
    demo = task.demo_batch(0, 64)
    used = 0
    for target, mask in zip(demo.targets, demo.target_mask, strict=True):
        text = TOK.decode([t for t in target if t != PAD_ID])
        if "<call>" in text:
            used += 1
            start = list(target).index(6)  # <result>
            stop = list(target).index(7)  # </result>
            assert mask[start : stop + 1].sum() == 0 and mask[:start].all()
            assert mask[stop + 1 :].sum() == (target[stop + 1 :] != PAD_ID).sum()
        else:
            assert mask.sum() == (target != PAD_ID).sum()
    assert 16 < used < 48

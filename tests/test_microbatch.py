"""Micro-batches (gradient accumulation) and per-layer remat: the plain step's loss, gradients,
metrics and updated parameters, one compilation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faults import NO_HOOKS
from rftjax import config, models, sampling
from rftjax.config import RLConfig
from rftjax.knobs import make_knobs
from rftjax.models import transformer
from rftjax.tasks import make_task
from rftjax.train import stages as st
from rftjax.train import update as up
from rftjax.train.setup import to_prompt_batch
from rftjax.train.step import init_state, make_learner, make_optimizer

MODEL = models.ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=2
)
DEEPER = dataclasses.replace(MODEL, num_layers=3)  # traced only, not compiled
GROUPS, G, P, N = 4, 2, 3, 4  # prompts, group size, prompt slots, response slots
# Loss-mask lengths per row: uneven across micro-batches (tokens and rows with a valid token),
# and a row that counts nothing, so a wrong micro-batch weighting changes the result.
LENGTHS = np.array([4, 1, 0, 2, 3, 3, 4, 4])
KNOBS = dict(kl_coef=0.3, ent_coef=0.05, vf_coef=0.5, temperature=0.9)


def _spec(model=MODEL, **rl) -> st.StepSpec:
    cfg = RLConfig(prompts_per_step=GROUPS, group_size=G, max_new_tokens=N, **rl)
    graphdef, _ = models.create(model, 0)
    return st.StepSpec(graphdef, cfg, make_optimizer(cfg), eos_id=2, pad_id=0, hooks=NO_HOOKS)


def _params(algo: str, model=MODEL):
    _, policy = models.create(model, 0)
    params = init_state(policy, RLConfig(algo=algo, group_size=G), 0).params
    if algo == "ppo":  # a value head that reads the hidden states (zeros would not)
        key = jax.random.PRNGKey(5)
        params["value_head"]["weight"] = 0.3 * jax.random.normal(key, (MODEL.hidden_size,))
    return params


def _minibatch(seed: int = 0, targets: bool = False) -> dict:
    """One minibatch as `learn` builds it: B = GROUPS × G rows, a group's prompt shared; with
    `targets`, as several updates a step see it (behaviour log-probs and advantages given)."""
    rng = np.random.default_rng(seed)
    b = GROUPS * G
    prompts = np.repeat(rng.integers(3, 64, (GROUPS, P)), G, axis=0)
    prompt_valid = np.repeat(np.arange(P)[None] >= rng.integers(0, 2, (GROUPS, 1)), G, axis=0)
    response_mask = np.arange(N)[None] < np.maximum(LENGTHS, 1)[:, None]  # one token at least
    loss_mask = np.arange(N)[None] < LENGTHS[:, None]
    mb = {
        "tokens": jnp.asarray(np.concatenate([prompts, rng.integers(3, 64, (b, N))], 1), jnp.int32),
        "valid": jnp.asarray(np.concatenate([prompt_valid, response_mask], 1)),
        "mask": jnp.asarray(response_mask, jnp.float32),
        "loss_mask": jnp.asarray(loss_mask, jnp.float32),
        "sampler_logp": jnp.asarray(-rng.uniform(0.5, 5.0, (b, N)), jnp.float32),
        "ref_logp": jnp.asarray(-rng.uniform(0.5, 5.0, (b, N)), jnp.float32),
        "scores": jnp.asarray(rng.integers(0, 2, b), jnp.float32),
    }
    if targets:
        mb["old_logp"] = mb["sampler_logp"] + jnp.asarray(rng.normal(0, 0.1, (b, N)), jnp.float32)
        mb["adv"] = jnp.asarray(rng.normal(0, 1, (b, N)), jnp.float32) * mb["loss_mask"]
        mb["old_values"] = mb["returns"] = jnp.zeros((b, N))
    return mb


def _gradients(spec, params, mb):
    knobs = make_knobs(**KNOBS)
    return jax.jit(lambda p, d: up.gradients(spec, p, d, knobs, None))(params, mb)


def _assert_trees_close(a, b, rtol=2e-4, atol=1e-6):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def _assert_metrics_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6, err_msg=k)


def test_micro_weights_by_hand():
    # contiguous rows (length buckets): (4, 1 valid tokens | 0, 2) -> tokens 5 | 2, rows 2 | 1
    mask = jnp.asarray(np.arange(4)[None] < np.array([4, 1, 0, 2])[:, None], jnp.float32)
    w = lambda mode, g=None: np.asarray(up.micro_weights(mask, 2, mode, g))  # noqa: E731
    np.testing.assert_allclose(w("token_mean"), [5 / 7, 2 / 7], rtol=1e-6)
    np.testing.assert_allclose(w("seq_mean_token_mean"), [2 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(w("seq_mean_token_sum_norm"), [0.5, 0.5], rtol=1e-6)
    # groups of one row, interleaved: (4, 0 | 1, 2) -> tokens 4 | 3, rows 1 | 2
    np.testing.assert_allclose(w("token_mean", 1), [4 / 7, 3 / 7], rtol=1e-6)
    np.testing.assert_allclose(w("seq_mean_token_mean", 1), [1 / 3, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(w("token_mean", 2), [5 / 7, 2 / 7], rtol=1e-6)  # 2 groups of 2
    empty = np.asarray(up.micro_weights(jnp.zeros((4, 4)), 2, "token_mean"))
    np.testing.assert_allclose(empty, [0.5, 0.5])  # sums to 1: the probe reads the coefficients


def test_micro_batches_take_whole_groups_from_every_devices_block():
    rows = jnp.arange(48)  # 12 groups of 4 rows; a batch over 3 devices: 16 rows (4 groups) each
    parts = up.split_micro(rows, 2, 4)
    for part in np.asarray(parts):
        groups = part.reshape(-1, 4)
        assert all(list(g) == list(range(g[0], g[0] + 4)) for g in groups)  # whole groups
        assert np.bincount(part // 16, minlength=3).tolist() == [8, 8, 8]  # every device
    np.testing.assert_array_equal(up.join_micro(parts, 4), rows)
    np.testing.assert_array_equal(up.join_micro(up.split_micro(rows, 3), None), rows)


@pytest.mark.parametrize(
    "loss_agg, k, remat, epochs, buckets, chunk, attn",
    [
        ("token_mean", 4, "none", 1, 1, 0, 0),
        ("seq_mean_token_mean", 2, "layer", 2, 1, 5, 3),  # several updates: targets with data
        ("token_mean", 1, "none", 1, 4, 3, 2),  # rows by length: chunks at sizes 1, 3, 4, 4
        ("seq_mean_token_sum_norm", 1, "layer", 1, 2, 0, 0),
        ("token_mean", 1, "none", 2, 4, 0, 0),  # several updates: targets come with the data
    ],
)
def test_micro_batches_and_remat_give_the_minibatch_gradient_and_metrics(
    loss_agg, k, remat, epochs, buckets, chunk, attn
):
    algo, rl = "grpo", dict(loss_agg=loss_agg, num_epochs=epochs)
    params, mb = _params(algo), _minibatch(targets=epochs > 1)
    plain = _gradients(_spec(algo=algo, **rl), params, mb)
    spec = _spec(algo=algo, num_microbatches=k, remat=remat, length_buckets=buckets,
                 logits_chunk=chunk, attention_chunk=attn, **rl)  # fmt: skip
    (grads, probed), metrics = _gradients(spec, params, mb)
    _assert_trees_close(grads, plain[0][0])
    # the coefficient probe measures the coefficients applied (fm's regularizer audit)
    np.testing.assert_allclose(probed["kl_coef"], KNOBS["kl_coef"], rtol=1e-5)
    np.testing.assert_allclose(probed["ent_coef"], -KNOBS["ent_coef"], rtol=1e-5)
    _assert_trees_close(probed, plain[0][1])
    _assert_metrics_close(jax.device_get(metrics), jax.device_get(plain[1]))
    assert float(jnp.abs(plain[1]["kl_ref"])) > 0 and float(plain[1]["ratio_max"]) > 0


def test_bucketed_forward_equals_the_padded_one_up_to_each_rows_end():
    spec, params, mb = _spec(), _params("grpo"), _minibatch()
    prompts, valid = mb["tokens"][::G, :P], mb["valid"][::G, :P]
    args = (prompts, valid, mb["tokens"][:, P:], mb["valid"][:, P:], jnp.float32(0.9))
    policy = params["policy"]
    plain = sampling.response_logprobs(spec.graphdef, policy, *args)
    bucketed = jax.jit(lambda p: sampling.response_logprobs(spec.graphdef, p, *args, buckets=4))(
        policy
    )
    # rows' last real slots 4 1 1 2 3 3 4 4; sorted (stable) in chunks of 2 rows:
    # (1, 2) ends 1 1 -> size 1, (3, 4) ends 2 3 -> 3, (5, 0) ends 3 4 -> 4, (6, 7) -> 4
    assert sampling.bucket_sizes(N, 4) == (1, 2, 3, 4)
    sizes = [4, 1, 1, 3, 3, 4, 4, 4]  # each row's chunk's size, by hand
    for row, end in enumerate(np.maximum(LENGTHS, 1)):
        for got, want in zip(bucketed, plain, strict=True):
            np.testing.assert_allclose(got[row, :end], want[row, :end], rtol=2e-5, atol=2e-6)
            assert not np.any(np.asarray(got[row, sizes[row] :]))  # never computed
            assert np.all(np.asarray(got[row, : sizes[row]]) != 0)  # computed
    with pytest.raises(ValueError, match="8 rows cannot be split into 3"):
        sampling.response_logprobs(spec.graphdef, policy, *args, buckets=3)


def test_chunked_logits_give_the_same_values_and_gradients_with_less_memory():
    rng = np.random.default_rng(0)
    b, n, e, v = 4, 127, 16, 2048  # 508 tokens: 32 chunks of 16, the last with 4 of padding
    w = jnp.asarray(rng.normal(0, 0.3, (v, e)), jnp.float32)
    h = jnp.asarray(rng.normal(0, 1, (b, n, e)), jnp.float32)
    tok = jnp.asarray(rng.integers(0, v, (b, n)), jnp.int32)
    cw = jnp.asarray(rng.normal(0, 1, (2, b, n)), jnp.float32)  # a loss that reads every slot

    def grad_fn(chunk):
        def loss(w, h):
            logp, entropy = sampling.token_logprobs(w, h, tok, jnp.float32(0.7), chunk)
            return jnp.sum(cw[0] * logp) + jnp.sum(cw[1] * entropy), (logp, entropy)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    (want, want_grads), (got, got_grads) = (grad_fn(c)(w, h) for c in (0, 16))
    _assert_trees_close(got, want, rtol=1e-5)
    _assert_trees_close(got_grads, want_grads, rtol=1e-4, atol=1e-5)
    assert float(jnp.max(want[1][1])) > 1.0  # entropies of real distributions, not zeros
    # The whole logits [b·n, v] fp32 (4 MiB) against a few chunks' [16, v] (128 KiB each)
    temp = [grad_fn(c).lower(w, h).compile().memory_analysis().temp_size_in_bytes for c in (0, 16)]
    assert temp[0] >= b * n * v * 4 and temp[1] < b * n * v * 4 / 4


def test_chunked_attention_gives_the_same_values_and_gradients_with_less_memory():
    rng = np.random.default_rng(1)
    b, s, k, g, d = 2, 203, 2, 3, 8  # 203 queries: 13 chunks of 16, the last with 5 of padding
    q = jnp.asarray(rng.normal(0, 1, (b, s, k * g, d)), jnp.float32)
    kv = jnp.asarray(rng.normal(0, 1, (2, b, k, s, d)), jnp.float32)
    valid = jnp.asarray(rng.random((b, s)) > 0.2)
    mask = transformer.causal_mask(valid)
    cw = jnp.asarray(rng.normal(0, 1, (b, s, k * g, d)), jnp.float32)

    def grad_fn(chunk):
        def loss(q, kv):
            out = transformer.attention(q, kv[0], kv[1], mask, chunk)
            return jnp.sum(cw * out), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    (want, want_grads), (got, got_grads) = (grad_fn(c)(q, kv) for c in (0, 16))
    _assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    _assert_trees_close(got_grads, want_grads, rtol=1e-4, atol=1e-5)
    # fp32 scores [b, k, g, s, s] (1.9 MiB), several times over unchunked; a chunk's [.., 16, s]
    # are 1/12.7 of them (measured: 11.9 MB of temporaries against 1.1 MB)
    scores = b * k * g * s * s * 4
    temp = [grad_fn(c).lower(q, kv).compile().memory_analysis().temp_size_in_bytes for c in (0, 16)]
    assert temp[0] >= scores and temp[1] < temp[0] / 8


def test_remat_checkpoints_each_layer_of_the_learner_only():
    params, mb = _params("grpo", DEEPER), _minibatch()
    knobs = make_knobs(**KNOBS)

    def checkpoints(spec):
        jaxpr = jax.make_jaxpr(lambda p: up.gradients(spec, p, mb, knobs, None))(params)
        return str(jaxpr).count("remat")  # jax.checkpoint's primitive

    assert checkpoints(_spec(DEEPER)) == 0
    assert checkpoints(_spec(DEEPER, remat="layer")) == DEEPER.num_layers * 2  # prompt, response
    spec = _spec(DEEPER, remat="layer")  # the sampler decodes with the graph it was given
    assert spec.graphdef == models.create(DEEPER, 0)[0]


def test_ppo_learner_with_micro_batches_and_remat_matches_the_plain_step():
    task = make_task("arith", seed=0, eval_size=16)
    # one update: GAE from the current values, whitened over the minibatch, the value loss
    rl = dict(prompts_per_step=GROUPS, group_size=G, max_new_tokens=N)
    rl.update(loss_agg="seq_mean_token_sum_norm", num_microbatches=1)
    learners = [
        make_learner(
            models.create(MODEL, 0)[0],
            RLConfig(algo="ppo", **{**rl, **extra}),
            eos_id=2,
            pad_id=0,
            reward_fn=task.jnp_reward,
        )
        for extra in (
            {},
            {"num_microbatches": 4, "remat": "layer", "logits_chunk": 3, "attention_chunk": 3},
            {"length_buckets": 4},
        )
    ]
    _, policy = models.create(MODEL, 0)
    cfg = RLConfig(algo="ppo", group_size=G)
    knobs = make_knobs(lr=1e-3, **KNOBS)
    state = init_state(policy, cfg, 0)
    ro = learners[0].rollout(state, to_prompt_batch(task.train_batch(0, GROUPS)), knobs)
    rewards = {"reward": jnp.asarray(np.random.default_rng(0).random(GROUPS * G), jnp.float32)}
    outs = []
    for learner in learners:
        new, metrics = learner.learn(init_state(policy, cfg, 0), ro, rewards, knobs)
        outs.append((jax.device_get(new.params), jax.device_get(metrics)))
        learner.learn(new, ro, rewards, knobs)  # a second step: the same program
        assert learner.learn._cache_size() == 1
    (params, metrics), *others = outs
    for params_m, metrics_m in others:
        # Adam turns a gradient into about ±lr per element: 1% of one update as the tolerance
        _assert_trees_close(params_m, params, rtol=1e-4, atol=1e-5)
        _assert_metrics_close(metrics_m, metrics)


def test_length_buckets_by_default_only_where_responses_are_long():
    # 0 (the default) chooses: 8 buckets from 64 response slots, where the rows divide by 8
    # and there is one micro-batch; else every row at full length. A given value is kept.
    assert RLConfig().length_buckets == 0
    assert RLConfig(max_new_tokens=4).buckets == 1  # the built-in task: nothing to skip
    assert RLConfig(max_new_tokens=63).buckets == 1
    assert RLConfig(max_new_tokens=64).buckets == 8  # 16 x 8 rows
    assert RLConfig(max_new_tokens=256, prompts_per_step=3, group_size=2).buckets == 1  # 6 rows
    assert RLConfig(max_new_tokens=256, prompts_per_step=8, num_minibatches=2).buckets == 8
    four_rows = RLConfig(max_new_tokens=256, prompts_per_step=2, group_size=4, num_minibatches=2)
    assert four_rows.buckets == 1
    assert RLConfig(max_new_tokens=256, num_microbatches=2).buckets == 1
    assert RLConfig(max_new_tokens=256, length_buckets=1).buckets == 1
    assert RLConfig(max_new_tokens=4, length_buckets=4).buckets == 4
    with pytest.raises(ValueError, match="length_buckets must be >= 0"):
        RLConfig(length_buckets=-1)


def test_the_console_names_the_length_buckets_the_first_step_compiles():
    from rftjax.train.loop import _buckets_note

    assert _buckets_note(RLConfig(max_new_tokens=4)) == ""
    assert "; 8 length buckets (chosen for 64 slots)" in _buckets_note(RLConfig(max_new_tokens=64))
    assert "; 4 length buckets (--length_buckets)" in _buckets_note(RLConfig(length_buckets=4))


def test_micro_batches_must_hold_whole_groups():
    with pytest.raises(ValueError, match="num_microbatches=3.*divisor of 4"):
        RLConfig(prompts_per_step=8, group_size=2, num_minibatches=2, num_microbatches=3)
    with pytest.raises(ValueError, match="holds 8 rows.*length_buckets=3; accepted: a divisor"):
        RLConfig(prompts_per_step=4, group_size=2, length_buckets=3)
    with pytest.raises(ValueError, match="length_buckets=2 already runs.*num_microbatches=1"):
        RLConfig(prompts_per_step=4, group_size=2, num_microbatches=2, length_buckets=2)
    with pytest.raises(ValueError, match="remat='full'.*accepted: none, layer"):
        RLConfig(remat="full")
    assert config.REMAT_MODES == transformer.REMAT_MODES  # the config's copy of the model's

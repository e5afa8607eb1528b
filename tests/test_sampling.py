"""Sampling: KV cache equals full recompute, sampler and trainer log-probs agree, EOS handling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import small_shapes

from rftjax import models, sampling
from rftjax.sampling import sampler as smp

CFG = small_shapes.MODEL.replace(tie_word_embeddings=True)
PAD, N, GROUP = 0, 8, 2


@pytest.fixture(scope="module")
def model():
    return models.create(CFG, 0)


def _prompts(seed=0, bp=3, p=6):
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, CFG.vocab_size, (bp, p)).astype(np.int32)
    mask = np.ones((bp, p), np.int32)
    mask[0, :3] = 0
    mask[1, :1] = 0
    prompts[mask == 0] = PAD
    return jnp.asarray(prompts), jnp.asarray(mask)


def _pair(graphdef, eos_id):
    kw = dict(group_size=GROUP, max_new_tokens=N, eos_id=eos_id, pad_id=PAD)
    cached = jax.jit(functools.partial(sampling.generate, graphdef, **kw))
    recompute = jax.jit(functools.partial(sampling.generate_recompute, graphdef, **kw))
    return cached, recompute


def _frequent_eos(graphdef, params, prompts, mask, sp, key=0):
    """An EOS id that the same draws emit mid-way in row 0, so EOS handling is exercised."""
    cached, _ = _pair(graphdef, eos_id=-1)
    ro = cached(params, prompts, mask, jax.random.PRNGKey(key), sp)
    return int(np.asarray(ro.response)[0, N // 2])


@pytest.mark.parametrize("phase", [16, 3])  # one decode phase; three (3, 6 and 8 positions)
@pytest.mark.parametrize("temperature,top_p,top_k", [(0.0, 1.0, 0), (1.0, 1.0, 0), (0.7, 0.9, 5)])
def test_kv_cache_equals_full_recompute(model, temperature, top_p, top_k, phase, monkeypatch):
    monkeypatch.setattr(smp, "DECODE_PHASE", phase)
    graphdef, params = model
    prompts, mask = _prompts()
    sp = sampling.sampling_params(temperature, top_p, top_k)
    eos = _frequent_eos(graphdef, params, prompts, mask, sp, key=3)
    cached, recompute = _pair(graphdef, eos)
    a = cached(params, prompts, mask, jax.random.PRNGKey(3), sp)
    b = recompute(params, prompts, mask, jax.random.PRNGKey(3), sp)
    np.testing.assert_array_equal(a.response, b.response)
    np.testing.assert_array_equal(a.response_mask, b.response_mask)
    np.testing.assert_allclose(a.logp, b.logp, atol=1e-5)
    assert np.asarray(a.lengths).min() < N  # some row stopped at EOS


def test_compacted_phases_change_no_token(model, monkeypatch):
    """16 rows, phases of 4 positions: rows that end early leave later phases, which then run
    on the smallest of 16 / 12 / 8 / 4 rows that holds the rest; the same tokens as all rows
    throughout, and as a full recompute."""
    monkeypatch.setattr(smp, "DECODE_PHASE", 4)
    graphdef, params = model
    prompts, mask = _prompts(seed=1, bp=4)
    sp = sampling.sampling_params(0.7, 0.9, 5)  # the restricted draw; its noise as plain
    n, group, key = 16, 4, jax.random.PRNGKey(5)
    kw = dict(group_size=group, max_new_tokens=n, pad_id=PAD)
    plain = functools.partial(sampling.generate, graphdef, **kw)
    first = np.asarray(jax.jit(plain, static_argnames="eos_id")(
        params, prompts, mask, key, sp, eos_id=-1).response)  # fmt: skip
    eos = int(np.bincount(first[:, :4].ravel()).argmax())  # ends many rows in the first phase
    compact = jax.jit(functools.partial(plain, eos_id=eos))
    a = compact(params, prompts, mask, key, sp)
    monkeypatch.setattr(smp, "COMPACT_MIN_ROWS", 10**6)  # every phase with all 16 rows
    b = jax.jit(functools.partial(plain, eos_id=eos))(params, prompts, mask, key, sp)
    recompute = jax.jit(functools.partial(sampling.generate_recompute, graphdef, eos_id=eos, **kw))
    c = recompute(params, prompts, mask, key, sp)
    lengths = np.asarray(a.lengths)
    assert (lengths <= 4).sum() >= 4 and lengths.max() > 8  # compacted phases ran, rows went on
    for other in (b, c):
        np.testing.assert_array_equal(a.response, other.response)
        np.testing.assert_array_equal(a.response_mask, other.response_mask)
        np.testing.assert_allclose(a.logp, other.logp, atol=1e-5)
    assert compact._cache_size() == 1


def test_row_sizes_and_size_index_by_hand():
    assert smp.row_sizes(64) == (64, 48, 32, 16)
    assert smp.row_sizes(10) == (10, 8, 5, 3)  # rounded up
    assert smp.row_sizes(4) == (4,)  # below COMPACT_MIN_ROWS: never compacted
    sizes = (64, 48, 32, 16)
    done = lambda left: jnp.arange(64) >= left  # noqa: E731 - `left` rows unfinished
    picked = [int(smp.size_index(done(k), sizes)) for k in (64, 49, 48, 33, 32, 17, 16, 1, 0)]
    assert picked == [0, 0, 1, 1, 2, 2, 3, 3, 0]  # all done: the full batch, nothing copied


def test_decode_phases_by_hand():
    assert smp.decode_phases(4) == (4,)  # the default task's 4 new tokens: one loop, as before
    assert smp.decode_phases(64) == (16, 32, 48, 64)
    assert smp.decode_phases(256) == tuple(range(32, 257, 32))  # at most 8 phases
    assert smp.decode_phases(1000) == (125, 250, 375, 500, 625, 750, 875, 1000)
    cache = smp.KVCache((jnp.ones((2, 1, 3, 4)),), (jnp.ones((2, 1, 3, 4)),),
                        jnp.ones((2, 3), bool), jnp.asarray(3))  # fmt: skip
    longer = smp.extend_cache(cache, 5)
    assert longer.keys[0].shape == (2, 1, 5, 4) and float(longer.values[0][:, :, 3:].sum()) == 0
    np.testing.assert_array_equal(longer.valid, [[1, 1, 1, 0, 0]] * 2)


def test_eos_convention(model):
    graphdef, params = model
    prompts, mask = _prompts(1)
    sp = sampling.sampling_params(0.0)
    eos = _frequent_eos(graphdef, params, prompts, mask, sp)
    ro = _pair(graphdef, eos)[0](params, prompts, mask, jax.random.PRNGKey(0), sp)
    response, rmask = np.asarray(ro.response), np.asarray(ro.response_mask)
    for row, m, length, trunc in zip(
        response, rmask, np.asarray(ro.lengths), np.asarray(ro.truncated), strict=True
    ):
        hits = np.flatnonzero(row == eos)
        if hits.size:  # EOS counts as a response token; everything after it is masked pad
            assert length == hits[0] + 1 and not trunc
            assert (row[length:] == PAD).all() and (m[length:] == 0).all()
        else:
            assert length == N and trunc
        assert (m[:length] == 1).all()
    assert (np.asarray(ro.logp)[rmask == 0] == 0).all()
    # Tokens of the rollout are the repeated prompts followed by the response.
    np.testing.assert_array_equal(np.asarray(ro.tokens)[:, :6], np.repeat(prompts, GROUP, 0))


def _reference_logprobs(graphdef, params, prompts, mask, response, rmask, temperature):
    toks = jnp.concatenate([jnp.repeat(prompts, GROUP, 0), response], 1)
    valid = jnp.concatenate([jnp.repeat(mask, GROUP, 0) > 0, rmask > 0], 1)
    logits, _, _ = models.full_forward(graphdef, params, toks, valid)
    p = prompts.shape[1]
    logp_all = sampling.log_probs(logits[:, p - 1 : -1], temperature)
    return jnp.take_along_axis(logp_all, response[..., None], -1)[..., 0]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampler_and_trainer_logprobs_agree(model, temperature):
    graphdef, params = model
    prompts, mask = _prompts(2)
    sp = sampling.sampling_params(temperature)
    ro = _pair(graphdef, 1)[0](params, prompts, mask, jax.random.PRNGKey(5), sp)
    logp, entropy, hidden = sampling.response_logprobs(
        graphdef, params, prompts, mask, ro.response, ro.response_mask, sp.temperature
    )
    m = np.asarray(ro.response_mask)
    np.testing.assert_allclose(np.asarray(logp) * m, ro.logp, atol=1e-5)
    ref = _reference_logprobs(
        graphdef, params, prompts, mask, ro.response, ro.response_mask, sp.temperature
    )
    np.testing.assert_allclose(np.asarray(logp) * m, np.asarray(ref) * m, atol=1e-5)
    assert hidden.shape == (6, N, CFG.hidden_size) and (np.asarray(entropy) >= 0).all()


def test_shared_prompt_gradients_equal_full_forward(model):
    graphdef, params = model
    prompts, mask = _prompts(3)
    rng = np.random.default_rng(0)
    response = jnp.asarray(rng.integers(3, CFG.vocab_size, (6, N)), jnp.int32)
    rmask = jnp.asarray(np.arange(N)[None] < rng.integers(1, N + 1, (6, 1)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(6, N)), jnp.float32)
    t = jnp.asarray(0.8)

    def shared(p):
        lp = sampling.response_logprobs(graphdef, p, prompts, mask, response, rmask, t)[0]
        return jnp.sum(lp * weights * rmask)

    def full(p):
        return jnp.sum(
            _reference_logprobs(graphdef, p, prompts, mask, response, rmask, t) * weights * rmask
        )

    g1, g2 = jax.grad(shared)(params), jax.grad(full)(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_restrict_top_k_and_top_p_hand_example():
    logits = jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25]]))
    keep = lambda p, k: np.isfinite(
        np.asarray(smp._restrict(logits, jnp.asarray(p), jnp.asarray(k)))
    )[0].tolist()
    assert keep(1.0, 1) == [False, True, False, False]
    assert keep(1.0, 3) == [False, True, True, True]
    # nucleus: 0.5 then 0.25 reaches 0.75 >= 0.7, so {0.5, 0.25} is the smallest set
    assert keep(0.7, 0) == [False, True, False, True]
    assert keep(0.8, 0) == [False, True, True, True]
    assert keep(0.8, 2) == [False, True, False, True]


def test_greedy_ignores_randomness_and_sampling_uses_it(model):
    graphdef, params = model
    prompts, mask = _prompts(4)
    gen = _pair(graphdef, -1)[0]
    greedy = sampling.sampling_params(0.0)
    a = gen(params, prompts, mask, jax.random.PRNGKey(0), greedy)
    b = gen(params, prompts, mask, jax.random.PRNGKey(1), greedy)
    np.testing.assert_array_equal(a.response, b.response)
    hot = sampling.sampling_params(1.5)
    c = gen(params, prompts, mask, jax.random.PRNGKey(0), hot)
    d = gen(params, prompts, mask, jax.random.PRNGKey(1), hot)
    assert (np.asarray(c.response) != np.asarray(d.response)).any()


def test_generate_compiles_once_for_new_prompts_and_settings(model):
    graphdef, params = model
    gen = _pair(graphdef, 1)[0]
    for seed, (t, p, k) in enumerate([(1.0, 1.0, 0), (0.5, 0.9, 3), (0.0, 1.0, 0)]):
        prompts, mask = _prompts(seed)
        gen(params, prompts, mask, jax.random.PRNGKey(seed), sampling.sampling_params(t, p, k))
    assert gen._cache_size() == 1


def test_small_temperature_gives_finite_log_probs():
    logits = jnp.array([[300.0, 0.0, -300.0]])
    for t in (1e-3, 1e-9):  # 1e-9 is below the floor and computed at 1e-3
        lp = np.asarray(sampling.log_probs(logits, jnp.asarray(t)))
        assert np.isfinite(lp[0, 0]) and lp[0, 0] == pytest.approx(0.0, abs=1e-6)
    tok, lp = sampling.sample_token(logits, jax.random.PRNGKey(0), sampling.sampling_params(1e-3))
    assert int(tok[0]) == 0 and np.isfinite(float(lp[0]))

"""Mixed-precision projections (`models.mixed`): bf16 operands, products summed in float32."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faults import NO_HOOKS
from rftjax import models, sampling
from rftjax.config import RLConfig
from rftjax.knobs import make_knobs
from rftjax.models import mixed
from rftjax.sampling import sampler
from rftjax.tasks import make_task
from rftjax.train import stages as st
from rftjax.train import update as up
from rftjax.train.setup import to_prompt_batch
from rftjax.train.step import init_state, make_learner, make_optimizer

MODEL = models.ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2
)
MIXED = dataclasses.replace(MODEL, matmul_dtype="bfloat16")


def _rounded(a) -> np.ndarray:
    """``a`` rounded to bfloat16, as float64: products of these are exact in float32."""
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)


# YNNPACK's bf16 path with N < K and with N > K; a small dot (every dimension < 8); a vector
# (M = 1); one row pair
SHAPES = [(64, 256, 96), (32, 64, 160), (4, 4, 4), (1, 32, 16), (2, 16, 40)]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_values_and_gradients_are_products_of_the_rounded_operands(m, k, n):
    rng = np.random.default_rng(m + k + n)
    x, w, g = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (n, k), (m, n)))
    y, vjp = jax.vjp(jax.jit(mixed.matmul), x, w)
    dx, dw = vjp(g)
    xr, wr, gr = _rounded(x), _rounded(w), _rounded(g)
    # float32 sums of exact products: only the order of the additions differs
    tol = dict(rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(y, xr @ wr.T, **tol)
    np.testing.assert_allclose(dx, gr @ wr, **tol)
    np.testing.assert_allclose(dw, gr.T @ xr, **tol)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    # the rounding is real: the float32 product of the unrounded operands is not within tol
    assert np.abs(np.asarray(y) - x.astype(np.float64) @ w.T.astype(np.float64)).max() > 1e-3


def test_inside_a_loop_each_step_rounds_and_the_program_compiles_once():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 32)).astype(np.float32)
    w = (rng.standard_normal((32, 32)) / 6).astype(np.float32)
    run = jax.jit(
        lambda h, w: jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(mixed.matmul(h, w)), h)
    )
    expected = x.astype(np.float64)
    for _ in range(3):
        expected = np.tanh(_rounded(expected) @ _rounded(w).T)
    np.testing.assert_allclose(run(x, w), expected, rtol=1e-4, atol=1e-5)
    run(x + 1, w)
    assert run._cache_size() == 1


def _cpu_has_bf16_dot() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(
    jax.default_backend() != "cpu" or not _cpu_has_bf16_dot(),
    reason="XLA:CPU's bf16 dot path (YNNPACK) needs AVX512-BF16",
)
@pytest.mark.parametrize("n", [96, 512])
def test_on_cpu_forward_and_both_gradient_dots_take_the_bf16_path(n):
    x, w = jnp.ones((64, 256)), jnp.ones((n, 256))
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(mixed.matmul(x, w) ** 2), argnums=(0, 1)))
    text = grad.lower(x, w).compile().as_text()
    # the computations called as YNNPACK fusions whose two operands are bf16, into float32
    ynn = [re.search(r"calls=%([\w.\-]+)", ln).group(1) for ln in text.splitlines()
           if "__ynn_fusion" in ln]  # fmt: skip
    headers = [ln for ln in text.splitlines() if re.match(r"%[\w.\-]+ \(.*\) -> ", ln)]
    bf16_in = r"\([\w.]+: bf16\[[\d,]*\], [\w.]+: bf16\[[\d,]*\]\) -> f32"
    bf16_dots = sum(bool(re.match(rf"%{re.escape(n)} {bf16_in}", h)) for n in ynn for h in headers)
    assert bf16_dots == 3  # y = x·wᵀ, dx = g·w, dw = gᵀ·x


def _gradients(model, mb, buckets: int = 1):
    cfg = RLConfig(prompts_per_step=4, group_size=2, max_new_tokens=4, length_buckets=buckets)
    graphdef, policy = models.create(model, 0)
    spec = st.StepSpec(graphdef, cfg, make_optimizer(cfg), eos_id=2, pad_id=0, hooks=NO_HOOKS)
    params = init_state(policy, cfg, 0).params
    knobs = make_knobs(kl_coef=0.3, ent_coef=0.05)
    return jax.jit(lambda p, d: up.gradients(spec, p, d, knobs, None))(params, mb)


def _minibatch(rng, b: int, p: int, n: int) -> dict:
    """b rows of groups of 2, prompts of p tokens and n response tokens, all real."""
    prompts = np.repeat(rng.integers(3, 64, (b // 2, p)), 2, axis=0)
    return {
        "tokens": jnp.asarray(np.concatenate([prompts, rng.integers(3, 64, (b, n))], 1)),
        "valid": jnp.ones((b, p + n), bool),
        "mask": jnp.ones((b, n)),
        "loss_mask": jnp.ones((b, n)),
        "sampler_logp": jnp.asarray(-rng.uniform(0.5, 5.0, (b, n)), jnp.float32),
        "ref_logp": jnp.asarray(-rng.uniform(0.5, 5.0, (b, n)), jnp.float32),
        "scores": jnp.asarray(rng.integers(0, 2, b), jnp.float32),
    }


def test_the_learners_gradient_is_the_float32_one_to_bf16_precision():
    mb = _minibatch(np.random.default_rng(0), b=8, p=3, n=4)
    exact, mixed_ = (jax.tree.leaves(_gradients(m, mb)[0]) for m in (MODEL, MIXED))
    flat = lambda leaves: np.concatenate([np.ravel(x) for x in leaves]).astype(np.float64)
    e, m = flat(exact), flat(mixed_)
    rel = np.linalg.norm(m - e) / np.linalg.norm(e)
    assert 1e-5 < rel < 3e-2  # bf16 has 8 significant bits: ~0.4% a rounding, not none


def _loss(graphdef, params, tokens):
    logits, _, _ = models.full_forward(graphdef, params, tokens, jnp.ones(tokens.shape, bool))
    return jnp.sum(jax.nn.log_softmax(logits)[..., 3])


def test_prepared_weights_give_the_same_values_and_gradients():
    graphdef, params = models.create(MIXED, 0)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, MIXED.vocab_size)
    prepared = models.prepare_matmuls(graphdef, params, backward=True)
    wrapped = [x for x in jax.tree.leaves(prepared, is_leaf=lambda x: isinstance(x, mixed.Prepared))
               if isinstance(x, mixed.Prepared)]  # fmt: skip
    assert len(wrapped) == 7 * MIXED.num_layers  # q, k, v, o, gate, up, down; not the head
    for p in wrapped:
        assert p.transposed.shape == p.weight.shape[::-1] and p.transposed.dtype == jnp.bfloat16
        np.testing.assert_array_equal(p.transposed, p.weight.T.astype(jnp.bfloat16))
    plain = jax.jit(jax.value_and_grad(lambda p: _loss(graphdef, p, tokens)))(params)
    bind = lambda p, pre: _loss(graphdef, models.bind_prepared(pre, p), tokens)  # noqa: E731
    bound = jax.jit(jax.value_and_grad(bind))(params, prepared)
    assert jax.tree.structure(plain) == jax.tree.structure(bound)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(bound), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    again = models.prepare_matmuls(graphdef, prepared, backward=True)  # already prepared: as is
    assert jax.tree.structure(again) == jax.tree.structure(prepared)
    # float32 matmuls: nothing to prepare
    graphdef32, params32 = models.create(MODEL, 0)
    assert models.prepare_matmuls(graphdef32, params32) is params32


def _weight_transposes(fn, *args) -> int:
    """How many row-major transposes (`mixed`'s while loops: a counter, their trip count, the
    bf16 array and its transpose) of a layer weight the lowered program of fn(*args) makes."""
    sizes = {MIXED.hidden_size, MIXED.intermediate_size}
    count = 0
    for line in jax.jit(fn).lower(*args).as_text().splitlines():
        if "stablehlo.while(" not in line:
            continue
        types = re.findall(r"tensor<([\dx]*)x?(\w+)>", line.split(" : ")[-1])
        arrays = [tuple(int(d) for d in dims.split("x") if d) for dims, dt in types if dt == "bf16"]
        if len(types) == 4 and len(arrays) == 2 and arrays[0] == arrays[1][::-1]:
            count += set(arrays[0]) <= sizes
    return count


def test_buckets_and_decode_phases_round_and_transpose_each_weight_once():
    graphdef, params = models.create(MIXED, 0)
    rng = np.random.default_rng(0)
    prompts, prompt_mask = jnp.asarray(rng.integers(3, 64, (2, 3))), jnp.ones((2, 3), jnp.int32)
    response = jnp.asarray(rng.integers(3, 64, (8, 32)))
    # rows of many lengths: the buckets run at several sizes (one switch branch each)
    ends = np.array([5, 8, 12, 16, 20, 24, 30, 32])
    response_mask = jnp.asarray(np.arange(32)[None] < ends[:, None])
    logprobs = lambda p: sampling.response_logprobs(  # noqa: E731
        graphdef, p, prompts, prompt_mask, response, response_mask, 1.0, buckets=4
    )
    assert _weight_transposes(logprobs, params) == 7 * MIXED.num_layers
    rollout = lambda p: sampling.generate(  # noqa: E731
        graphdef, p, prompts, prompt_mask, jax.random.PRNGKey(0), sampling.sampling_params(),
        group_size=4, max_new_tokens=48, eos_id=2, pad_id=0)  # fmt: skip
    assert len(sampler.decode_phases(48)) > 1
    assert _weight_transposes(rollout, params) == 7 * MIXED.num_layers
    # the bucketed gradient: each weight once forward (its own gradient's transposes are of
    # activations), for every bucket and the prompts' pass
    mb = _minibatch(rng, b=8, p=3, n=4)
    mb["valid"] = mb["valid"].at[:4, -2:].set(False)
    mb["mask"] = mb["loss_mask"] = mb["valid"][:, 3:].astype(jnp.float32)
    assert _weight_transposes(lambda d: _gradients(MIXED, d, buckets=2), mb) == 7 * MIXED.num_layers


def test_a_grpo_step_with_length_buckets_and_remat_compiles_once():
    task = make_task("arith", seed=0, eval_size=16)
    rl = RLConfig(prompts_per_step=4, group_size=2, max_new_tokens=8, length_buckets=2,
                  remat="layer")  # fmt: skip
    learner = make_learner(
        models.create(MIXED, 0)[0], rl, eos_id=2, pad_id=0, reward_fn=task.jnp_reward
    )
    state = init_state(models.create(MIXED, 0)[1], rl, 0)
    knobs = make_knobs(lr=1e-3)
    for i in range(2):
        state, metrics = learner.step(state, to_prompt_batch(task.train_batch(i, 4)), knobs)
        assert all(np.isfinite(float(v)) for v in metrics.values())
    assert learner.step._cache_size() == 1


def test_matmul_dtype_accepts_the_compute_dtype_or_bf16_operands_only():
    assert MIXED.mixed_matmuls and not MODEL.mixed_matmuls
    assert not dataclasses.replace(MODEL, dtype="bfloat16", matmul_dtype="bfloat16").mixed_matmuls
    with pytest.raises(ValueError, match="matmul_dtype='float32' with dtype='bfloat16'.*accepted"):
        dataclasses.replace(MODEL, dtype="bfloat16", matmul_dtype="float32")
    with pytest.raises(ValueError, match="matmul_dtype='float16'"):
        dataclasses.replace(MODEL, matmul_dtype="float16")

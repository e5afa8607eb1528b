"""The vs_trl benchmark: its hand FLOP count against XLA's own count of the compiled forward
and backward, and one alternating step of each trainer at a toy size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rftjax import models, sampling
from rftjax.benchmarks import vs_trl

CFG = models.ModelConfig(
    vocab_size=64, hidden_size=64, intermediate_size=256, num_layers=1, num_heads=4,
    num_kv_heads=4,
)  # fmt: skip
BP, G, P, N = 2, 3, 8, 12


def _xla_flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def test_forward_and_step_flops_agree_with_xla():
    graphdef, params = models.create(CFG, 0)
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(8, 60, (BP, P)), jnp.int32)
    prompt_mask = jnp.ones((BP, P), jnp.int32)
    response = jnp.asarray(rng.integers(8, 60, (BP * G, N)), jnp.int32)
    response_mask = jnp.ones((BP * G, N), jnp.int32)
    temp = jnp.ones(())

    def forward(params):
        out = sampling.response_logprobs(
            graphdef, params, prompts, prompt_mask, response, response_mask, temp
        )
        return out[0].sum()

    hand = vs_trl.forward_flops(CFG, prompts=BP, group_size=G, prompt_len=P, new_tokens=N)
    xla_fwd = _xla_flops(forward, params)
    # XLA also counts norms, softmax and activations, which the hand count leaves out.
    assert hand <= xla_fwd <= 1.08 * hand, (hand, xla_fwd)
    xla_both = _xla_flops(jax.value_and_grad(forward), params)
    steps = vs_trl.step_flops(CFG, prompts=BP, group_size=G, prompt_len=P, new_tokens=N)
    assert steps["policy"] == 3 * hand and steps["total"] == 5 * hand
    assert 0.9 * steps["policy"] <= xla_both <= 1.15 * steps["policy"], (steps, xla_both)


def test_config_checks_and_the_table():
    with pytest.raises(ValueError, match="new_tokens must be > 0"):
        vs_trl.Config(new_tokens=0)
    with pytest.raises(ValueError, match="vocab_size"):
        vs_trl.Config(vocab_size=32)
    with pytest.raises(ValueError, match="matmul_dtype='float16'; accepted: float32, bfloat16"):
        vs_trl.Config(matmul_dtype="float16")
    assert vs_trl.Config().rows == 64
    env = vs_trl.child_env("pinned")
    assert "intra_op_parallelism_threads=1" in env["XLA_FLAGS"] and env["OMP_NUM_THREADS"] == "1"


@pytest.mark.slow  # ~30 s of CPU: importing TRL, compiling the step; not in the default CI run
def test_one_alternating_step_of_each_trainer_at_a_toy_size():
    pytest.importorskip("trl")
    config = vs_trl.Config(
        hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, prompts=2,
        group_size=2, new_tokens=4, warmup=1, steps=1,
    )  # fmt: skip
    out = vs_trl.measure(config, "default")
    for name in ("rftjax", "trl"):
        fig = out[name]
        assert fig["seconds_per_step"] > 0
        assert fig["completions_per_second"] == pytest.approx(4 / fig["seconds_per_step"])
        assert 1 <= fig["mean_length"] <= 4  # at least one token, at most the cap
    ratio = out["rftjax"]["completions_per_second"] / out["trl"]["completions_per_second"]
    assert out["ratio_completions_per_second"] == pytest.approx(ratio)
    assert "| default | rftjax |" in vs_trl.table(config, [out])

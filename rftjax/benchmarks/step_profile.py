"""Where an rftjax GRPO step spends its time, at a `vs_trl.Config` shape, one process.

Times (medians of ``--repeats`` calls, after compilation) the whole step, its rollout and its
learner, and inside the learner the reference forward, the policy forward + backward and the
Adam update, each as its own compiled function; reads from the rollouts the decode steps the
loop ran and the share of response slots after EOS (computed, never used); sets each against
`vs_trl.step_flops` and a matmul measured in the same process. Run it under the XLA flags or
model dtype to compare (``XLA_FLAGS=...``, ``--dtype=bfloat16``).

  python -m rftjax.benchmarks.step_profile [--config=JSON] [--dtype=bfloat16] [--threads=pinned]
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _median_seconds(fn, repeats: int) -> float:
    import jax
    import numpy as np

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _pieces(graphdef, state, batch, ro):
    """Compiled reference forward, policy forward + backward, and Adam update of one rollout."""
    import jax
    import jax.numpy as jnp
    import optax

    from rftjax.sampling import response_logprobs

    temp = jnp.ones(())

    def logp_sum(params):
        return response_logprobs(graphdef, params, batch.prompts, batch.prompt_mask,
                                 ro.response, ro.response_mask, temp)[0].sum()  # fmt: skip

    forward = jax.jit(logp_sum)
    both = jax.jit(jax.value_and_grad(logp_sum))
    adam = optax.adam(1e-5)
    opt_state = adam.init(state.params["policy"])
    grads = both(state.params["policy"])[1]
    update = jax.jit(lambda g, s, p: optax.apply_updates(p, adam.update(g, s, p)[0]))
    policy = state.params["policy"]
    return {
        "reference_forward": lambda: forward(state.ref_params),
        "policy_forward_backward": lambda: both(policy),
        "adam": lambda: update(grads, opt_state, policy),
    }


def profile(config, dtype: str = "float32", repeats: int = 5) -> dict:
    """Seconds per stage, FLOP shares, decode steps and padding of the step at ``config``."""
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np

    from rftjax.benchmarks import vs_trl

    with tempfile.TemporaryDirectory() as tmp:
        vs_trl.write_checkpoint(tmp, config)
        task, batches, _ = vs_trl.prompt_batches(config, 8)
        runner = vs_trl.RftjaxRunner(tmp, config, task, batches, dtype=dtype)
    learner, knobs, batch = runner.learner, runner.knobs, runner.batches[0]
    for _ in range(3):
        runner.step()
    state = runner.state
    times = {"step": _median_seconds(runner.step, repeats)}
    state = runner.state
    times["rollout"] = _median_seconds(lambda: learner.rollout(state, batch, knobs), repeats)
    ro = learner.rollout(state, batch, knobs)
    answers = jnp.repeat(batch.answers, config.group_size, 0)
    rewards = {"reward": task.jnp_reward(ro.response, answers)["reward"]}
    copies = [jax.tree.map(jnp.copy, state) for _ in range(repeats + 1)]
    times["learn"] = _median_seconds(
        lambda: learner.learn(copies.pop(), ro, rewards, knobs)[1], repeats
    )
    for name, fn in _pieces(runner.graphdef, state, batch, ro).items():
        times[name] = _median_seconds(fn, repeats)
    lengths = np.asarray(ro.response_mask).sum(1)
    shape = dict(prompts=config.prompts, group_size=config.group_size, new_tokens=config.new_tokens)
    flops = vs_trl.step_flops(runner.cfg, prompt_len=batch.prompts.shape[1], **shape)
    peak = vs_trl.matmul_peak("jax")
    return {
        "dtype": dtype,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "seconds": times,
        "flops": flops,
        "matmul_peak_gflops": peak / 1e9,
        "step_share_of_peak": flops["total"] / times["step"] / peak,
        "learn_share_of_peak": (flops["reference"] + flops["policy"]) / times["learn"] / peak,
        "rollout_share_of_peak": flops["rollout"] / times["rollout"] / peak,
        "decode_steps": int(lengths.max()),
        "mean_length": float(lengths.mean()),
        "padding_share": float(1 - lengths.mean() / config.new_tokens),
    }


def main(argv=None) -> None:
    from rftjax.benchmarks import vs_trl

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="{}", help="vs_trl.Config fields as JSON")
    parser.add_argument("--dtype", default="float32", help="model compute dtype")
    parser.add_argument("--threads", choices=vs_trl.SETTINGS, default="default")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--core", type=int, default=0, help="pinned: the CPU core")
    args = parser.parse_args(argv)
    if args.threads == "pinned":
        os.environ.update(vs_trl.child_env("pinned"))
        os.sched_setaffinity(0, {args.core})
    config = vs_trl.Config(**json.loads(args.config))
    print(json.dumps(profile(config, args.dtype, args.repeats), indent=1))


if __name__ == "__main__":
    main()

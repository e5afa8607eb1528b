"""The projections' matmul on this machine, three ways, side by side (GFLOP/s).

- ``float32``: ``x · wᵀ`` as `Linear` computes it by default;
- ``bf16 (wᵀ in place)``: bf16 operands summed in float32, the weight transposed inside the
  program, as a plain ``jnp.dot`` writes it (XLA:CPU turns it back into a float32 dot: the
  transposed operand is column-major, which YNNPACK's bf16 kernels do not take);
- ``mixed``: `models.mixed.matmul`, the same rounding with row-major operands.

Each forward (``x [M, K] · w [N, K]ᵀ``) and forward + backward (3 × the FLOPs) at the vs_trl
model's shapes; the variants' calls alternate, medians of ``repeats``.

  python -m launch.bench --what=matmul [--repeats=N]
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from rftjax.models import mixed

# (M, K, N): a decode step's rows, a length bucket's, a learner batch's; MLP up and down
SHAPES = ((64, 256, 1024), (64, 1024, 256), (512, 256, 1024), (512, 1024, 256),
          (3200, 256, 1024), (3200, 1024, 256))  # fmt: skip
VARIANTS = {
    "float32": lambda x, w: jnp.dot(x, w.T),
    "bf16 (wT in place)": lambda x, w: jnp.dot(
        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16).T, preferred_element_type=jnp.float32
    ),
    "mixed": mixed.matmul,
}


def _programs(m: int, k: int, n: int):
    x = jax.random.normal(jax.random.PRNGKey(0), (m, k))
    w = jax.random.normal(jax.random.PRNGKey(1), (n, k)) / k**0.5
    out = {}
    for name, f in VARIANTS.items():
        loss = lambda x, w, f=f: jnp.sum(f(x, w) ** 2)
        out[name, "forward"] = jax.jit(f)
        out[name, "forward+backward"] = jax.jit(jax.grad(loss, argnums=(0, 1)))
    for program in out.values():
        jax.block_until_ready(program(x, w))  # compile
    return out, (x, w)


def rates(m: int, k: int, n: int, repeats: int) -> dict:
    """GFLOP/s of every variant and pass at one shape (alternating calls, medians)."""
    programs, args = _programs(m, k, n)
    seconds = {key: [] for key in programs}
    for _ in range(repeats):
        for key, program in programs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(program(*args))
            seconds[key].append(time.perf_counter() - t0)
    flops = {"forward": 2.0 * m * k * n, "forward+backward": 6.0 * m * k * n}
    return {
        f"{name} {p}": flops[p] / statistics.median(s) / 1e9 for (name, p), s in seconds.items()
    }


def run(repeats: int, shapes=SHAPES) -> dict:
    rows = [{"shape": list(s), **rates(*s, repeats)} for s in shapes]
    speedup = {
        p: statistics.median(r[f"mixed {p}"] / r[f"float32 {p}"] for r in rows)
        for p in ("forward", "forward+backward")
    }
    return {
        "rows": rows,
        "mixed_speedup_forward": speedup["forward"],
        "mixed_speedup_grad": speedup["forward+backward"],
    }


def report(out: dict, repeats: int) -> list[str]:
    keys = [k for k in out["rows"][0] if k != "shape"]
    lines = [
        f"GFLOP/s, median of {repeats} alternating calls (x [M, K] · w [N, K]^T)",
        "",
        "| M, K, N | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for r in out["rows"]:
        lines.append(f"| {r['shape']} | " + " | ".join(f"{r[k]:.0f}" for k in keys) + " |")
    lines.append(
        f"mixed / float32, median over the shapes: forward {out['mixed_speedup_forward']:.2f}x,"
        f" forward+backward {out['mixed_speedup_grad']:.2f}x"
    )
    return lines

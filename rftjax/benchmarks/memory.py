"""Compiled memory per device of the GRPO step at real model sizes, without allocating weights.

The fused step (`make_learner(...).step`) is lowered and compiled ahead of time for
abstract arguments (`jax.ShapeDtypeStruct` with the mesh's shardings; the state's shapes come
from `jax.eval_shape`) on simulated CPU devices, and XLA's `memory_analysis()` of the
per-device program is read: arguments, outputs, temporaries, and the donated state that
outputs reuse. Nothing of the model's size is ever allocated.

  python -m rftjax.benchmarks.memory --model=qwen2.5-0.5b --mesh=fsdp:8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

# Public config.json figures of Qwen2.5 (tied embeddings at 0.5B / 1.5B, untied at 7B).
QWEN25 = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                         intermediate_size=4864, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                         intermediate_size=8960, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                       intermediate_size=18944, tie_word_embeddings=False),
}  # fmt: skip
_MARK = "MEMORY "
# the `Shape` fields each row reports
LEVERS = ("remat", "num_microbatches", "logits_chunk", "attention_chunk")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shape:
    """A step's size: prompts × group_size completions of prompt_len + new_tokens tokens."""

    prompts: int = 8
    group_size: int = 8
    prompt_len: int = 512
    new_tokens: int = 1024
    answer_len: int = 8
    num_microbatches: int = 1  # gradient accumulation (RLConfig.num_microbatches)
    remat: str = "none"  # "layer": recompute each decoder layer in the backward (RLConfig.remat)
    logits_chunk: int = 0  # vocabulary logits this many tokens at a time (RLConfig.logits_chunk)
    attention_chunk: int = 0  # attention this many queries at a time (RLConfig.attention_chunk)


def model_config(name: str, **overrides):
    """The `ModelConfig` of a `QWEN25` name (Qwen2: QKV bias, vocab 151,936), bf16 compute."""
    from rftjax.models import ModelConfig
    from rftjax.train.setup import check_master_weights

    if name not in QWEN25:
        raise ValueError(f"model {name!r}; accepted: {sorted(QWEN25)}")
    kw = dict(vocab_size=151936, qkv_bias=True, rope_theta=1e6, max_position_embeddings=32768,
              model_type="qwen2", dtype="bfloat16", **QWEN25[name])  # fmt: skip
    kw.update(overrides)
    cfg = ModelConfig(**kw)
    check_master_weights(cfg)  # as launch.train: what it measures must be a trainable setup
    return cfg


def abstract_arguments(cfg, rl, shape: Shape, mesh):
    """Abstract ``(state, batch, knobs)`` of the step, with the mesh's shardings."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from rftjax import parallel
    from rftjax.knobs import make_knobs
    from rftjax.models import hf
    from rftjax.train.step import PromptBatch, init_state

    _, params = hf.abstract_params(cfg)
    state = jax.eval_shape(lambda p: init_state(p, rl, 0), params)
    knobs = jax.eval_shape(make_knobs)

    def placed(tree, shardings):
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
        )

    state = placed(state, parallel.state_shardings(state, mesh))
    knobs = placed(knobs, jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), knobs))
    rows = (shape.prompts, shape.prompt_len)
    batch = PromptBatch(
        jax.ShapeDtypeStruct(rows, jnp.int32),
        jax.ShapeDtypeStruct(rows, jnp.int32),
        jax.ShapeDtypeStruct((shape.prompts, shape.answer_len), jnp.int32),
    )
    batch = placed(batch, jax.tree.map(
        lambda x: NamedSharding(mesh, parallel.batch_spec(x.shape, mesh)), batch))  # fmt: skip
    return state, batch, knobs


def _reward(response, answers):
    """A compiled reward of the right shape (exact match of the first answer token)."""
    import jax.numpy as jnp

    return {"reward": (response[:, 0] == answers[:, 0]).astype(jnp.float32)}


def memory_figures(compiled) -> dict[str, int]:
    """Bytes per device of a compiled program; ``total`` = arguments + outputs + temporaries
    − outputs that reuse donated arguments."""
    m = compiled.memory_analysis()
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
    }
    out["total_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    )
    return out


def _learner_step(cfg, shape: Shape, mesh):
    """The fused step (not yet lowered) of ``cfg`` at ``shape`` on ``mesh``."""
    from rftjax.models import hf
    from rftjax.train.step import make_learner

    graphdef, _ = hf.abstract_params(cfg)
    learner = make_learner(graphdef, _rl(shape), eos_id=2, pad_id=0, reward_fn=_reward, mesh=mesh)
    return learner.step


def _rl(shape: Shape):
    from rftjax.config import RLConfig

    return RLConfig(prompts_per_step=shape.prompts, group_size=shape.group_size,
                    max_new_tokens=shape.new_tokens, num_microbatches=shape.num_microbatches,
                    remat=shape.remat, logits_chunk=shape.logits_chunk,
                    attention_chunk=shape.attention_chunk,
                    length_buckets=1)  # fmt: skip  # the peak: every row at the cap


def compiled_step(cfg, shape: Shape, mesh_spec: str):
    """The fused GRPO step of ``cfg`` at ``shape``, compiled for abstract arguments on a mesh
    of this process's devices (``--mesh`` syntax), and those arguments."""
    from rftjax import parallel

    mesh = parallel.make_mesh(mesh_spec)
    args = abstract_arguments(cfg, _rl(shape), shape, mesh)
    return _learner_step(cfg, shape, mesh).lower(*args, None).compile(), args


def run(model: str, shape: Shape, mesh_spec: str, devices: int, overrides: dict | None = None):
    """`memory_figures` of the step, compiled in a fresh process with ``devices`` CPU devices."""
    cmd = [sys.executable, "-m", "rftjax.benchmarks.memory", f"--model={model}",
           f"--mesh={mesh_spec}", f"--shape={json.dumps(dataclasses.asdict(shape))}",
           f"--overrides={json.dumps(overrides or {})}"]  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": " ".join(xla_flags(devices)), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(_MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"memory {model} {mesh_spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(_MARK) :])


def xla_flags(devices: int) -> list[str]:
    """The compiler flags of a point: ``devices`` simulated CPU devices, and XLA:CPU's
    memory-minimizing scheduler instead of its default concurrency-optimized one (which keeps
    rematerialized and micro-batched work alive together: see BUILD_NOTES, "[scale] remat and
    micro-batches"); GPU and TPU compilers schedule for memory by default."""
    return [f"--xla_force_host_platform_device_count={devices}",
            "--xla_cpu_enable_concurrency_optimized_scheduler=false"]  # fmt: skip


def devices_of(mesh_spec: str) -> int:
    """Devices a ``--mesh`` spec names (every axis size must be given: no ``-1``)."""
    from rftjax import parallel

    sizes = parallel.parse_mesh(mesh_spec, None)
    if any(v < 0 for v in sizes.values()):
        raise ValueError(f"--mesh={mesh_spec!r}: give every axis size (no -1) for --what=memory")
    n = 1
    for v in sizes.values():
        n *= v
    return n


def shape_from_flags(values) -> Shape:
    """`Shape` defaults, with ``--prompts_per_step``, ``--group_size``, ``--max_new_tokens``,
    ``--num_microbatches``, ``--remat``, ``--logits_chunk`` and ``--attention_chunk`` where
    given on the command line."""
    given = {"prompts_per_step": "prompts", "group_size": "group_size",
             "max_new_tokens": "new_tokens", "num_microbatches": "num_microbatches",
             "remat": "remat", "logits_chunk": "logits_chunk",
             "attention_chunk": "attention_chunk"}  # fmt: skip
    return Shape(**{f: getattr(values, k) for k, f in given.items() if values[k].present})


def table(rows: list[dict]) -> str:
    """Markdown rows: model, mesh, the memory levers, and GiB per device (total, temporaries,
    arguments)."""
    gib = 2.0**30
    lines = ["| model | mesh | remat | micro-batches | logits chunk | attention chunk | "
             "GiB per device | temporaries | arguments |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        levers = " | ".join(str(r[k]) for k in LEVERS)
        sizes = [r[k] / gib for k in ("total_bytes", "temp_bytes", "argument_bytes")]
        cells = " | ".join(f"{v:.2f}" for v in sizes)
        lines.append(f"| {r['model']} | {r['mesh'] or 'one device'} | {levers} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b", help=f"one of {sorted(QWEN25)}")
    parser.add_argument("--mesh", default="", help="e.g. fsdp:8 (launch.train's --mesh)")
    parser.add_argument("--shape", default="{}", help="Shape fields as JSON")
    parser.add_argument("--overrides", default="{}", help="ModelConfig overrides as JSON")
    args = parser.parse_args(argv)
    cfg = model_config(args.model, **json.loads(args.overrides))
    shape = Shape(**json.loads(args.shape))
    compiled, _ = compiled_step(cfg, shape, args.mesh)
    levers = {k: getattr(shape, k) for k in LEVERS}
    out = {"model": args.model, "mesh": args.mesh, **levers, **memory_figures(compiled)}
    print(_MARK + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

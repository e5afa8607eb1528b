"""Runs the mesh scenarios of test_mesh.py in a process with 8 simulated CPU devices.

`python tests/mesh_worker.py OUT_DIR` (XLA_FLAGS=--xla_force_host_platform_device_count=8 set
by the caller, before jax starts). Writes OUT_DIR/result.json:
  runs: {mesh spec: metrics.jsonl records} of the same 5-step run on one device ("") and on
        meshes; compiles: {mesh spec: compiled versions of the fused step after the run};
  remesh: records of that run for 3 steps on one mesh, resumed to 5 on another;
  planted: events.jsonl of a run whose replicas of `model.norm.weight` were made to differ.

`python tests/mesh_worker.py OUT_DIR --multiprocess PID NPROC PORT` is one process of the
two-process run (2 local devices each): 3 steps, save, resume to 5 steps, in OUT_DIR/mp.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STEPS = 5
MESHES = ("", "data:2,fsdp:4", "data:2,fsdp:2,tensor:2")  # one device first: the reference


def config(workdir: str, mesh: str, steps: int = STEPS, **kw):
    import small_shapes

    from rftjax.config import RLConfig, TrainConfig

    return TrainConfig(
        workdir=workdir,
        steps=steps,
        task="sort",  # graded rewards: groups differ, so advantages and gradients are real
        model_overrides=small_shapes.OVERRIDES,
        warmup_steps=10,
        warmup_batch_size=16,
        eval_size=16,
        eval_every=STEPS,
        checkpoint_every=3,
        fm="detect",
        # An entropy bonus gives every step a real gradient: with zero-reward groups and
        # π = π_ref the gradient is rounding noise, which Adam would scale up to lr-sized steps.
        knobs={"ent_coef": 0.01},
        rl=RLConfig(prompts_per_step=8, group_size=4),
        mesh=mesh,
        **kw,
    )


def records(workdir: str, name: str = "metrics.jsonl") -> list[dict]:
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plant_divergence(state, mesh):
    """One device's copy of the replicated `model.norm.weight` gets one bit flipped."""
    import jax
    import numpy as np

    leaf = state.params["policy"]["model"]["norm"]["weight"]
    x = leaf[...]
    victim = mesh.devices.flat[5]
    bufs = []
    for shard in x.addressable_shards:
        data = shard.data
        if shard.device == victim:
            bits = np.asarray(data).view(np.uint32).copy()
            bits[3] ^= 1  # lowest mantissa bit
            data = jax.device_put(bits.view(np.float32), victim)
        bufs.append(data)
    leaf.value = jax.make_array_from_single_device_arrays(x.shape, x.sharding, bufs)
    return state


def single_process(out: str) -> None:
    from rftjax import parallel
    from rftjax.train import loop
    from rftjax.train.setup import CompileCache

    cache = CompileCache()
    result = {"runs": {}, "compiles": {}}
    warm = None
    for mesh in MESHES:
        workdir = os.path.join(out, f"run{len(result['runs'])}")
        if warm is not None:  # the same single-device warm-up: reuse its cache
            shutil.copytree(warm, os.path.join(workdir, "warmup"))
        cfg = config(workdir, mesh)
        loop.run(cfg, cache)
        warm = os.path.join(workdir, "warmup")
        result["runs"][mesh] = records(workdir)
        if mesh:
            result["compiles"][mesh] = cache.learners()[-1].step._cache_size()
    # 3 steps on one mesh, resumed to 5 on another: Orbax reshards on restore.
    remesh = os.path.join(out, "remesh")
    shutil.copytree(warm, os.path.join(remesh, "warmup"))
    loop.run(config(remesh, MESHES[1], steps=3))
    loop.run(config(remesh, MESHES[2], resume=True))
    result["remesh"] = records(remesh)
    # A planted divergence: placement is followed by one replica's bit flip.
    place = parallel.place_state
    planted = os.path.join(out, "planted")
    shutil.copytree(warm, os.path.join(planted, "warmup"))

    def place_and_plant(state, mesh):
        state = place(state, mesh)
        return state if mesh is None else plant_divergence(state, mesh)

    loop.parallel.place_state = place_and_plant
    try:
        summary = loop.run(dataclasses.replace(config(planted, MESHES[1]), steps=1))
    finally:
        loop.parallel.place_state = place
    result["planted"] = {"events": records(planted, "events.jsonl"), "summary": summary}
    with open(os.path.join(out, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)


def multi_process(out: str, pid: int, nproc: int, port: int) -> None:
    from rftjax import parallel

    parallel.initialize_distributed(f"localhost:{port}", nproc, pid)
    import jax

    from fm import integrity
    from rftjax.train import loop

    workdir = os.path.join(out, "mp")
    loop.run(config(workdir, "data:2,fsdp:2", steps=3))
    summary = loop.run(config(workdir, "data:2,fsdp:2", resume=True))
    # Every process ends with the same weights: fingerprints of the gathered parameters.
    from rftjax.checkpoint import Checkpointer

    final, _ = Checkpointer(os.path.join(workdir, "checkpoints")).restore(None, _target(workdir))
    params = parallel.fetch(final.params["policy"])
    sums = [int(integrity.checksum(x)) for x in jax.tree.leaves(params)]
    with open(os.path.join(out, f"mp{pid}.json"), "w", encoding="utf-8") as f:
        json.dump({"steps": summary["steps_completed"], "checksums": sums}, f)


def _target(workdir: str):
    """A placed template of the run's state, to restore the last checkpoint into."""
    from rftjax import parallel
    from rftjax.train.setup import CompileCache, setup
    from rftjax.train.step import init_state

    cfg = config(workdir, "data:2,fsdp:2", resume=True)
    run, model = setup(cfg, CompileCache())
    run.checkpointer.close()
    state = init_state(model.params, cfg.rl, cfg.seed, model.monitor)
    return parallel.place_state(state, run.mesh)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "--multiprocess":
        multi_process(sys.argv[1], *map(int, sys.argv[3:6]))
    else:
        single_process(sys.argv[1])

"""`ray_overhead`: what Ray adds to a campaign run (`--executor=ray`): starting and stopping a
local Ray instance, and per trivial task the round trip (submit, wait, fetch), the cost in a
batch submitted at once, and the wait of a task that depends on another's result (as a faulted
run on its clean twin). Needs the ray extra."""

from __future__ import annotations

import time


def _echo(x, *after):
    """A trivial Ray task (`ray_overhead`)."""
    del after
    return x


def run(repeats: int) -> dict:
    """Seconds: Ray's start and stop, and per trivial task its round trip, its share of a
    batch, and one link of a chain of dependent tasks (all after the workers started)."""
    from rftjax.campaign import on_ray

    ray = on_ray.import_ray()
    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False)
    out = {"start_seconds": time.perf_counter() - t0, "cpus": ray.cluster_resources()["CPU"]}
    task = ray.remote(num_cpus=1)(_echo)
    ray.get([task.remote(i) for i in range(int(out["cpus"]) * 2)])  # workers started
    t0 = time.perf_counter()
    for i in range(repeats):
        ray.get(task.remote(i))
    out["round_trip_seconds"] = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    ray.get([task.remote(i) for i in range(repeats)])
    out["batched_seconds_per_task"] = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    ref = task.remote(0)
    for i in range(repeats):
        ref = task.remote(i, ref)
    ray.get(ref)
    out["dependency_seconds_per_link"] = (time.perf_counter() - t0) / (repeats + 1)
    t0 = time.perf_counter()
    ray.shutdown()
    out["stop_seconds"] = time.perf_counter() - t0
    return out


def report(out: dict, repeats: int) -> list[str]:
    return [
        f"Ray ({out['cpus']:g} CPUs): start {out['start_seconds']:.2f} s, stop "
        f"{out['stop_seconds']:.2f} s; per trivial task ({repeats} each): round trip "
        f"{out['round_trip_seconds'] * 1e3:.2f} ms, in a batch "
        f"{out['batched_seconds_per_task'] * 1e3:.2f} ms, a dependency link "
        f"{out['dependency_seconds_per_link'] * 1e3:.2f} ms"
    ]

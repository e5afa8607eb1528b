"""The Ray executor of campaigns: each run a Ray task, on one machine or a cluster.

The executor only decides where runs execute: a task calls `runs.run_one`, the function a
local worker process calls, so a run computes the same thing under either executor. A faulted
run that forks from a clean twin still to run takes the twin's task as an argument (an object
reference), so Ray starts it only once the twin has finished; a task whose worker died is
retried by Ray (`max_retries`) and resumes from the run's last checkpoint. Runs write into the
campaign folder, from which the driver assembles the tables: that folder must be on storage
every node sees at the same path, which `check_shared_storage` verifies on every node before
the first run, and every run again where it starts (a node may join later).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from rftjax.campaign.runs import Run, run_one, twin_name

EXTRA = "pip install 'rftjax[ray]'"
_TOKEN = ".ray-campaign-token"  # written by the driver into the campaign folder


@dataclasses.dataclass(frozen=True, kw_only=True)
class RayOptions:
    """Where a campaign's Ray tasks run and what each one holds.

    address: "" starts a local Ray instance; "auto" joins the cluster running on this machine
      (`ray start`); else a cluster's address (host:port).
    run_cpus, run_gpus: resources one run declares (fractions share a device).
    max_retries: times Ray runs a task again after its worker died (node lost, OOM-killed).
    """

    address: str = ""
    run_cpus: float = 1.0
    run_gpus: float = 0.0
    max_retries: int = 3

    def __post_init__(self):
        if not self.run_cpus >= 0 or not self.run_gpus >= 0:
            raise ValueError(
                f"--run_cpus and --run_gpus must be >= 0, got {self.run_cpus} and {self.run_gpus}"
            )
        if self.run_cpus == 0 and self.run_gpus == 0:
            raise ValueError("a run must declare some resources: --run_cpus or --run_gpus > 0")
        if self.max_retries < 0:
            raise ValueError(f"--run_retries must be >= 0, got {self.max_retries}")


def import_ray():
    """The `ray` module, or a ValueError that names the extra to install."""
    try:
        import ray
    except ImportError as e:
        raise ValueError(f"--executor=ray needs Ray, which is not installed: {EXTRA}") from e
    return ray


def dependencies(todo: Sequence[Run]) -> dict[str, str]:
    """run name -> name of the clean twin it must wait for: a faulted run that forks, whose
    twin is among the runs still to do (a finished twin needs no waiting)."""
    pending = {r.name for r in todo if r.clean}
    waits = {}
    for run in todo:
        twin = twin_name(run.seed, run.config)
        if not run.clean and run.fork and twin in pending:
            waits[run.name] = twin
    return waits


def _sees(out: str, token: str) -> tuple[str, bool]:
    """(host, whether `out` here holds the driver's token)."""
    path = os.path.join(out, _TOKEN)
    try:
        with open(path, encoding="utf-8") as f:
            return socket.gethostname(), f.read() == token
    except OSError:
        return socket.gethostname(), False


def _not_shared(out: str, hosts: Sequence[str]) -> str:
    return (
        f"the campaign folder {out} is not visible from Ray node(s) {', '.join(hosts)}: run "
        "folders (and the warm-up cache in them) must be on storage every node sees at the "
        "same path (NFS, a cluster file system); pass such a folder as --out"
    )


def campaign_run(base, out: str, run: Run, token: str, *twins: Any) -> tuple[float, str]:
    """One run in a Ray task: the local executor's `run_one`, after its twin (`twins` holds
    its result: Ray starts this task only once it exists)."""
    del twins
    host, seen = _sees(out, token)
    if not seen:
        return 0.0, _not_shared(out, [host])
    return run_one(base, out, run)


def check_shared_storage(ray, out: str, token: str) -> None:
    """Raises ValueError unless every alive node reads the driver's token in `out`."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(_sees)
    refs = [
        probe.options(
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
        ).remote(out, token)
        for node in ray.nodes()
        if node["Alive"]
    ]
    blind = [host for host, seen in ray.get(refs) if not seen]
    if blind:
        raise ValueError(_not_shared(out, blind))


def _connect(ray, options: RayOptions, report) -> bool:
    """Starts or joins Ray; reports the cluster and its dashboard. True if we connected."""
    if ray.is_initialized():
        context, ours = None, False
    else:
        address = options.address or "local"
        try:
            with warnings.catch_warnings():
                # Ray starts its processes with fork + exec, which JAX's fork warning
                # cannot tell from a bare fork; nothing of JAX runs in the child.
                warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
                context, ours = ray.init(address=address), True
        except ConnectionError as e:
            raise ValueError(f"--ray_address={options.address}: {e}") from e
    have = ray.cluster_resources()
    line = f"Ray: {len([n for n in ray.nodes() if n['Alive']])} node(s), "
    line += f"{have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs"
    dashboard = getattr(context, "dashboard_url", "") if context is not None else ""
    report(line + (f"; dashboard http://{dashboard}" if dashboard else ""))
    for name, need in (("CPU", options.run_cpus), ("GPU", options.run_gpus)):
        if need > have.get(name, 0):
            report(
                f"warning: a run asks for {need:g} {name}s and the cluster now has "
                f"{have.get(name, 0):g}: runs wait until nodes with them join"
            )
    return ours


def run_all(
    todo: Sequence[Run],
    out: str,
    base,
    options: RayOptions,
    *,
    runs_per_worker: int | None = None,
    report=print,
) -> Iterator[tuple[Run, float, str]]:
    """Runs `todo` as Ray tasks; yields (run, seconds, error) as each finishes. `out` must be
    an absolute path on shared storage. `runs_per_worker` becomes Ray's `max_calls` for CPU
    runs (Ray already gives each GPU run a fresh worker)."""
    ray = import_ray()
    ours = _connect(ray, options, report)
    token = uuid.uuid4().hex
    os.makedirs(out, exist_ok=True)
    token_path = os.path.join(out, _TOKEN)
    with open(token_path, "w", encoding="utf-8") as f:
        f.write(token)
    try:
        check_shared_storage(ray, out, token)
        settings = dict(num_cpus=options.run_cpus, num_gpus=options.run_gpus)
        settings["max_retries"] = options.max_retries
        if runs_per_worker and not options.run_gpus:
            settings["max_calls"] = runs_per_worker
        task = ray.remote(**settings)(campaign_run)
        waits = dependencies(todo)
        refs: dict[str, Any] = {}
        for run in sorted(todo, key=lambda r: not r.clean):  # twins first
            after = [refs[waits[run.name]]] if run.name in waits else []
            refs[run.name] = task.remote(base, out, run, token, *after)
        by_name = {r.name: r for r in todo}
        pending = {ref: by_name[name] for name, ref in refs.items()}  # twins first
        unfinished: set[str] = set()
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(ready)
            try:
                seconds, error = ray.get(ready)
            except ray.exceptions.RayError as e:  # a worker died more than max_retries times
                seconds, error = 0.0, f"{type(e).__name__}: {str(e).splitlines()[0]}"
                unfinished.add(run.name)
                if waits.get(run.name) in unfinished:  # Ray did not start it
                    error = f"not run: its clean twin {waits[run.name]} did not finish ({error})"
            yield run, seconds, error
    finally:
        if os.path.exists(token_path):
            os.remove(token_path)
        if ours:
            ray.shutdown()

"""Campaigns on Ray (`launch.faultbench generate --executor=ray`) against the local executor.

A Ray instance started here (2 CPUs, no dashboard, on this machine) runs a tiny campaign (a
clean twin and two faulted runs that fork from it); its tables must equal, value for value, the
ones the local executor wrote: once plainly, once with the worker of the twin killed mid-run
(Ray retries it; it resumes from its checkpoint), once with the driver interrupted and run
again (finished runs skipped). The runs share a JAX compilation cache so that each compiles
only once in the module; the cache changes no result (the executables are the same).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fm.faultbench import records
from rftjax import campaign
from rftjax.campaign import on_ray
from rftjax.campaign.runs import Run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = {
    "name": "ray-tiny",
    "base": {
        "model_overrides": "num_layers=1,hidden_size=32,intermediate_size=64,"
        "num_heads=2,num_kv_heads=2",
        "prompts_per_step": 2,
        "group_size": 4,
        "steps": 8,
        "warmup_steps": 2,
        "warmup_batch_size": 8,
        "eval_size": 8,
        "eval_every": 4,
        "checkpoint_every": 2,
        "log_every": 4,
    },
    "splits": {"train": [0], "eval": []},
    "runs": [
        {"seed": 0, "type": "CA1", "severity": "severe", "onset": 5},
        {"seed": 0, "type": "CA1", "severity": "subtle", "onset": 7},
    ],
}
RUNS = 3  # the clean twin s0/clean and its two faulted runs
TABLES = ("manifest", "steps", "trajectories")


def test_dependencies_wait_only_for_twins_still_to_run():
    twin = Run("s0/clean", 0, {})
    forks = [Run(f"s0/CA1-{i}", 0, {"fault": "CA1"}) for i in range(2)]
    settings = '{"steps": 9}'  # other settings: another twin, in its own folder
    other = Run(campaign.twin_name(0, settings), 0, {}, config=settings)
    fresh = Run("s0/RF1", 0, {"fault": "RF1"}, fork=False)
    moved = Run("c/s0/CA1", 0, {"fault": "CA1"}, config=settings)
    assert other.name.endswith("/s0/clean") and other.name != twin.name
    assert on_ray.dependencies([twin, *forks, other, fresh, moved]) == {
        "s0/CA1-0": "s0/clean",
        "s0/CA1-1": "s0/clean",
        "c/s0/CA1": other.name,
    }
    # A twin that finished earlier is not in the to-do list: nothing to wait for.
    assert on_ray.dependencies(forks) == {}


def test_ray_options_and_a_missing_ray_name_what_to_do(monkeypatch):
    with pytest.raises(ValueError, match="--run_cpus or --run_gpus"):
        on_ray.RayOptions(run_cpus=0)
    with pytest.raises(ValueError, match="must be >= 0"):
        on_ray.RayOptions(run_gpus=-1)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'rftjax\[ray\]'"):
        on_ray.import_ray()


def test_a_run_where_the_campaign_folder_is_not_visible_fails_with_what_to_do(tmp_path):
    run = Run("s0/clean", 0, {})
    (tmp_path / on_ray._TOKEN).write_text("another campaign's token")
    seconds, error = on_ray.campaign_run(None, str(tmp_path), run, "ours")
    assert seconds == 0.0 and "not visible from Ray node(s)" in error
    assert "storage every node sees" in error and not (tmp_path / "s0").exists()


def _faultbench(*args):
    cmd = [sys.executable, "-m", "launch.faultbench", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _start(*args):
    """The driver, with Ctrl-C's default disposition: a test suite started in the background
    of a non-interactive shell inherits SIGINT ignored, and so would the driver."""
    cmd = [sys.executable, "-m", "launch.faultbench", *args]
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_sigint)  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(folder, spec path): a compilation cache every process of the module inherits."""
    root = tmp_path_factory.mktemp("ray_campaign")
    spec = root / "spec.json"
    spec.write_text(json.dumps(SPEC))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_COMPILATION_CACHE_DIR", str(root / "jax_cache"))
        mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        mp.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
        yield root, spec


@pytest.fixture(scope="module")
def local_tables(setup):
    root, spec = setup
    out = root / "local"
    proc = _faultbench("generate", f"--spec={spec}", f"--out={out}", "--workers=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def cluster(setup):
    """The address of a Ray instance on this machine (its workers inherit our environment)."""
    ray = pytest.importorskip("ray")
    context = ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


def _assert_same_tables(a, b):
    """Every column of the three tables equal bit for bit, but the runs' wall-clock time."""
    for name in TABLES:
        x, y = (records.read(str(d / f"{name}.parquet")) for d in (a, b))
        assert list(x) == list(y), name
        for column in x:
            if (name, column) == ("manifest", "wall_seconds"):
                continue
            u, v = np.asarray(x[column]), np.asarray(y[column])
            assert u.dtype == v.dtype and u.shape == v.shape, (name, column)
            same = list(u) == list(v) if u.dtype == object else u.tobytes() == v.tobytes()
            assert same, (name, column)
    assert len(records.read(str(a / "manifest.parquet"))["run_id"]) == RUNS


def _progress(stdout: str) -> list[str]:
    return re.findall(r"^\[\d+/\d+ .*$", stdout, re.M)


def test_ray_executor_writes_the_local_executors_tables(setup, local_tables, cluster):
    root, spec = setup
    out = root / "ray"
    proc = _faultbench("generate", f"--spec={spec}", f"--out={out}", "--executor=ray",
                       f"--ray_address={cluster}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Ray: 1 node(s), 2 CPUs, 0 GPUs" in proc.stdout
    lines = _progress(proc.stdout)
    assert len(lines) == RUNS and lines[-1].startswith(f"[{RUNS}/{RUNS} 100%")
    assert "s0/clean" in lines[0]  # its faulted runs wait for it
    _assert_same_tables(local_tables, out)
    assert not (out / on_ray._TOKEN).exists()


def test_the_storage_check_names_the_nodes_that_cannot_see_the_folder(tmp_path, cluster):
    import ray

    (tmp_path / on_ray._TOKEN).write_text("written by the driver")
    on_ray.check_shared_storage(ray, str(tmp_path), "written by the driver")
    with pytest.raises(ValueError, match=rf"not visible from Ray node\(s\) {os.uname().nodename}"):
        on_ray.check_shared_storage(ray, str(tmp_path), "another token")


def _workers_of(cache_dir: str, title: str) -> list[int]:
    """Processes titled `title` whose environment holds our compilation cache (Ray workers of
    this module's Ray instance)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if not f.read().startswith(title.encode()):
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"JAX_COMPILATION_CACHE_DIR={cache_dir}".encode() in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:  # gone, or not ours
            continue
    return found


def _wait_for(condition, proc, timeout=300):
    t0 = time.time()
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def test_a_killed_worker_is_retried_and_the_tables_do_not_change(setup, local_tables, cluster):
    root, spec = setup
    out = root / "killed"
    proc = _start("generate", f"--spec={spec}", f"--out={out}", "--executor=ray",
                  f"--ray_address={cluster}", "--run_retries=1")  # fmt: skip
    twin = out / "s0" / "clean"
    # The twin has saved a checkpoint and runs on (its faulted runs wait for it: the only
    # worker running a campaign run is the twin's).
    saved = lambda: any(p.name.isdigit() for p in (twin / "checkpoints").glob("*"))
    _wait_for(lambda: (twin / "checkpoints").is_dir() and saved(), proc)
    workers = _workers_of(os.environ["JAX_COMPILATION_CACHE_DIR"], "ray::campaign_run")
    assert len(workers) == 1 and not (twin / "summary.json").exists()
    os.kill(workers[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "FAILED" not in stdout and len(_progress(stdout)) == RUNS
    _assert_same_tables(local_tables, out)


def test_an_interrupted_driver_resumes_and_skips_finished_runs(setup, local_tables):
    """On a Ray instance the driver starts itself (no --ray_address)."""
    pytest.importorskip("ray")
    root, spec = setup
    out = root / "resumed"
    args = ("generate", f"--spec={spec}", f"--out={out}", "--executor=ray")
    proc = _start(*args)
    _wait_for(lambda: (out / "s0" / "clean" / "summary.json").exists(), proc)
    # Ctrl-C, pressed again while the driver has not noticed (its first act then is to remove
    # its token): once in the tests a single SIGINT was lost inside Ray's wait.
    token = out / on_ray._TOKEN
    for _ in range(20):
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        while token.exists() and time.time() - t0 < 1.0:
            time.sleep(0.02)
        if not token.exists():
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, stdout + stderr[-3000:]
    finished = [r for r in campaign.resolve(SPEC).runs if (out / r.name / "summary.json").exists()]
    assert 1 <= len(finished) < RUNS, stdout
    again = _faultbench(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(finished)} of {RUNS} runs already finished" in again.stdout
    lines = _progress(again.stdout)
    assert len(lines) == RUNS - len(finished)
    assert not any(r.name + ":" in line for r in finished for line in lines)
    _assert_same_tables(local_tables, out)

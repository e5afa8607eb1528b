"""The benchmark entry point runs and reports its figures (tiny settings: a smoke test, not a
timing test; the figures themselves are recorded in BUILD_NOTES.md)."""

import json
import os
import subprocess
import sys

import pytest
import small_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [*small_shapes.RUN_FLAGS, "--repeats=3"]


@pytest.mark.parametrize(
    "what,keys",
    [
        ("step", ["completions_per_second", "ratio_vs_reference", "cache_speedup"]),
        ("fm_overhead", ["median_ratio", "memory_ratio", "fm_state_bytes"]),
        ("campaign_vmap", ["seconds_one_by_one", "seconds_vmapped", "ratio_one_by_one_vs_vmapped"]),
        ("matmul", ["mixed_speedup_forward", "mixed_speedup_grad"]),
    ],
)
def test_bench_prints_and_writes_its_figures(tmp_path, what, keys):
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.bench",
            f"--what={what}",
            f"--json={out}",
            "--decode_tokens=6",
            *SMALL,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    flat = {k: v for section in figures.values() for k, v in section.items()}
    for key in keys:
        assert key in flat and flat[key] > 0, key
    if what == "step":
        assert figures["decode"]["identical_tokens"] is True


def test_fault_overhead_bench_reports_each_type(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.bench",
            "--what=fault_overhead",
            "--fault_types=PG2,OD3",
            f"--json={out}",
            *SMALL,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())["fault_overhead"]
    assert sorted(figures) == ["OD3", "PG2"]
    assert all(r["median_ratio"] > 0 and r["step_seconds_clean"] > 0 for r in figures.values())
    assert "PG2:" in proc.stdout and "median per-pair ratio" in proc.stdout

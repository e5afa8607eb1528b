"""Power curves: the magnitude ladder, debouncing to a false-alarm budget, the curves on
hand-made runs, and `launch.faultbench power` on a pipeline-sized sweep."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from fm.faultbench import power
from fm.faultbench.scoring import RunLabel
from rftjax.campaign import power as sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sweep_is_geometric_in_the_distance_from_the_identity():
    # lr × (presets 1.5, 3, 10): |log m| from log(1.5) / 4 to log(10); the middle of three
    # is their geometric mean.
    lo, hi = math.log(1.5) / 4, math.log(10.0)
    mid = math.exp(math.sqrt(lo * hi))
    assert sweep.sweep("OD1", "spike", points=3) == [1.11, float(f"{mid:.3g}"), 10.0]
    # Advantages × shrinking (0.5 .. 0.01): the same ladder below 1.
    assert sweep.sweep("CA2", "scale", points=2) == [float(f"{2**-0.25:.3g}"), 0.01]
    # lr × 0 at severe: linear in |m - 1|, from 0.7 / 4.
    assert sweep.sweep("OD1", "stall", points=2) == [0.825, 0.0]
    # A fraction (identity 0): from 0.1 / 4 to 1.
    assert sweep.sweep("CA1", "flip", points=3) == [0.025, float(f"{math.sqrt(0.025):.3g}"), 1.0]
    # Steps of lag are integers >= 1: 0.5, 4, 32 round to 1 (kept), 4, 32.
    assert sweep.sweep("PG2", "lag", points=3) == [1, 4, 32]
    assert sweep.strength("OD1", "stall", 0.0) == 1.0
    with pytest.raises(ValueError, match="OD1 has no variant 'sideways'; accepted: spike, stall"):
        sweep.sweep("OD1", "sideways")


def test_power_spec_has_a_grid_entry_per_variant_and_resolves():
    from rftjax import campaign

    spec = sweep.power_spec({"steps": 60}, ["OD1", "CA1"], [0, 1], points=2)
    assert [(g["types"], g["variants"]) for g in spec["grid"]] == [
        (["OD1"], ["spike"]), (["OD1"], ["stall"]), (["CA1"], ["flip"])]  # fmt: skip
    c = campaign.resolve(spec)
    assert sum(r.clean for r in c.runs) == 2 and len(c.runs) == 2 + 2 * 3 * 2
    # "first" and "others" split "all": the default variant, and the rest (CA1 has no other).
    for which, want in (("first", [("OD1", "spike"), ("CA1", "flip")]),
                        ("others", [("OD1", "stall")])):  # fmt: skip
        part = sweep.power_spec({"steps": 60}, ["OD1", "CA1"], [0], points=2, variants=which)
        assert [(g["types"][0], g["variants"][0]) for g in part["grid"]] == want
    with pytest.raises(ValueError, match="one of all, first, others; got 'some'"):
        sweep.power_spec({"steps": 60}, ["OD1"], [0], variants="some")


def test_debounce_and_calibrate_by_hand():
    a = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
    assert power.debounce(a, 1).tolist() == a.tolist()
    assert np.flatnonzero(power.debounce(a, 2)).tolist() == [1, 4, 5]
    assert np.flatnonzero(power.debounce(a, 3)).tolist() == [5]
    # Two clean runs of 8 and 12 steps: k=1 gives 6 alarm steps of 20 (300 / 1k), k=2 three
    # (150), k=3 one (50), k=4 none.
    clean = [a, np.zeros(12, bool)]
    assert power.calibrate(clean, budget=60.0) == (3, 50.0)
    assert power.calibrate(clean, budget=0.0, max_k=3) == (3, 50.0)  # out of reach
    assert power.calibrate(clean, budget=400.0) == (1, 300.0)
    with pytest.raises(ValueError, match="k >= 1"):
        power.debounce(a, 0)


def test_curves_and_minimal_detectable_magnitude_by_hand():
    T = 30

    def lab(run_id, onset=None):
        clean = onset is None
        return RunLabel(run_id, "none" if clean else "OD1", "x", "custom", onset or -1, T)

    labels = [lab("c0"), lab("w0", 10), lab("w1", 10), lab("m0", 10), lab("s0", 10)]
    vm = {"w0": ("spike", 1.1), "w1": ("spike", 1.1), "m0": ("spike", 2.0), "s0": ("spike", 10.0)}
    alarm_steps = {"c0": [3], "w0": [], "w1": [12, 13], "m0": [10, 11], "s0": [11, 12, 20]}

    def alarms(label):
        a = np.zeros(T, bool)
        a[np.asarray(alarm_steps[label.run_id], int) - 1] = True
        return a

    # Budget 0: c0's lone alarm step must go, so k = 2; then w1 is detected at step 13
    # (delay 3), m0 at 11 (delay 1), s0 at 12 (delay 2); w0 never.
    out = power.curves(labels, vm, {"d": alarms}, lambda t, v, m: m, window=5, budget=0.0)
    d = out["detectors"]["d"]
    assert (d["k"], d["false_alarms_per_1000_clean_steps"], d["within_budget"]) == (2, 0.0, True)
    points = d["curves"]["OD1/spike"]["points"]
    assert [(p["magnitude"], p["runs"], p["detected"]) for p in points] == [
        (1.1, 2, 1), (2.0, 1, 1), (10.0, 1, 1)]  # fmt: skip
    assert [p["delay_median"] for p in points] == [3.0, 1.0, 2.0]
    assert d["curves"]["OD1/spike"]["minimal_detectable"] == 1.1  # rate 0.5 counts
    assert "| OD1/spike | 1.1 |" in power.markdown(out)
    later = [{"magnitude": m, "detection_rate": r} for m, r in ((1, 1.0), (2, 0.0), (3, 1.0))]
    assert power.minimal_detectable(later) == 3  # detectable from 3 on, not from 1


def test_power_command_on_a_pipeline_sized_sweep(tmp_path):
    out = tmp_path / "power"
    cmd = [sys.executable, "-m", "launch.faultbench", "power", "--spec=pipeline", "--types=OD1",
           "--variants=first", "--points=2", "--seeds=0", "--window=5", "--workers=1",
           "--detector=fm,zscore,rules", f"--out={out}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "power.json").read_text())
    assert set(result["detectors"]) == {"fm", "zscore", "rules"} and result["budget"] == 0.5
    for d in result["detectors"].values():
        assert d["within_budget"] == (d["false_alarms_per_1000_clean_steps"] <= 0.5)
        points = d["curves"]["OD1/spike"]["points"]
        assert [(p["magnitude"], p["runs"]) for p in points] == [(1.11, 1), (10.0, 1)]
        assert all(p["detection_rate"] == p["detected"] / p["runs"] for p in points)
        assert d["curves"]["OD1/spike"]["minimal_detectable"] == power.minimal_detectable(points)
    assert "| OD1/spike |" in (out / "power.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert result["plots"] == ["power_optimization-dynamics.png"]
    assert (out / "power_optimization-dynamics.png").stat().st_size > 0

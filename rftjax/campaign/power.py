"""Power sweeps (`launch.faultbench power`): each fault variant at a geometric ladder of
magnitudes, from well below its "subtle" preset to its "severe" one, on several seeds.

A magnitude's strength is its distance from the fault's identity: for a factor ("learning rate
×", "advantages ×", ...; identity 1) the distance |log m| when every preset is positive, else
|m − 1| (a stall to lr × 0); for everything else (fractions, probabilities, noise scales,
bonuses; identity 0) m itself. The ladder is geometric in that distance, from the subtle
preset's distance / `below` to the severe preset's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from faults import SPECS
from rftjax.campaign.spec import TOOL_TYPES, _tool_task

_FACTOR = re.compile(r"×(, once)?$")  # units of a multiplicative magnitude (identity 1)


def _scale(type_id: str, variant: str) -> tuple[str, tuple[float, float, float]]:
    """("log" | "linear1" | "linear0", the variant's presets)."""
    spec = SPECS[type_id]
    if variant not in spec.variants:
        raise ValueError(
            f"{type_id} has no variant {variant!r}; accepted: {', '.join(spec.variants)}"
        )
    i = spec.variants.index(variant)
    presets = tuple(float(p) for p in spec.presets[i])
    if _FACTOR.search(spec.units[i]):
        return ("log" if min(presets) > 0 else "linear1"), presets
    return "linear0", presets


def strength(type_id: str, variant: str, magnitude: float) -> float:
    """The magnitude's distance from the fault's identity (see the module docstring)."""
    kind, _ = _scale(type_id, variant)
    if kind == "log":
        return abs(float(np.log(magnitude)))
    if kind == "linear1":
        return abs(magnitude - 1.0)
    return abs(magnitude)


def sweep(type_id: str, variant: str, *, points: int = 6, below: float = 4.0) -> list[float]:
    """`points` magnitudes, weakest first, geometric in `strength` from the subtle preset's
    strength / `below` to the severe preset's; 3 significant digits; integer presets (PG2's
    lag in steps) give distinct integers >= 1."""
    if points < 2:
        raise ValueError(f"a sweep needs >= 2 points, got {points}")
    if below < 1:
        raise ValueError(f"'below' divides the subtle preset's strength; need >= 1, got {below}")
    kind, presets = _scale(type_id, variant)
    lo = strength(type_id, variant, presets[0]) / below
    hi = strength(type_id, variant, presets[-1])
    d = np.geomspace(lo, hi, points)
    if kind == "log":
        sign = 1.0 if presets[-1] > 1 else -1.0
        values = np.exp(sign * d)
    elif kind == "linear1":
        sign = 1.0 if presets[-1] > 1 else -1.0
        values = 1.0 + sign * d
    else:
        values = d
    if all(float(p).is_integer() for p in presets):
        return sorted({max(1, round(v)) for v in values})
    return [float(f"{v:.3g}") for v in values]


VARIANTS = ("all", "first", "others")  # which variants of each type a sweep runs


def power_spec(
    base: dict[str, Any],
    types: Sequence[str],
    seeds: Sequence[int],
    *,
    variants: str = "all",
    points: int = 6,
    below: float = 4.0,
) -> dict[str, Any]:
    """A campaign spec of the sweep: every (type, variant) (`variants`: one of `VARIANTS`:
    "all"; "first", the default one; "others", all but the default, to complete a "first"
    sweep) at `sweep` magnitudes on every seed, onset just after a third of the run; a clean
    twin per seed (and per task: the tool types run on the tool task)."""
    if variants not in VARIANTS:
        raise ValueError(f"variants must be one of {', '.join(VARIANTS)}; got {variants!r}")
    grid = []
    for type_id in types:
        spec = SPECS[type_id]
        chosen = {"all": spec.variants, "first": spec.variants[:1], "others": spec.variants[1:]}
        for variant in chosen[variants]:
            entry = {
                "types": [type_id],
                "variants": [variant],
                "magnitudes": sweep(type_id, variant, points=points, below=below),
                "seeds": list(seeds),
            }
            if type_id in TOOL_TYPES:
                entry["overrides"] = _tool_task()
            grid.append(entry)
    return {
        "name": "power",
        "description": f"power sweep: {points} magnitudes per variant, {len(seeds)} seeds",
        "base": dict(base),
        "grid": grid,
    }


def run(
    base: dict[str, Any],
    types: Sequence[str],
    seeds: Sequence[int],
    detectors: Sequence[str],
    out: str,
    *,
    variants: str = "all",
    points: int = 6,
    window: int = 50,
    budget: float = 0.5,
    workers: int = 1,
    ray_options=None,
) -> tuple[dict[str, Any], list]:
    """`launch.faultbench power`: generates the sweep of `power_spec` into `out`, scores every
    detector at one false-alarm budget (`fm.faultbench.power`) and draws a picture per
    family. Returns (the result, the runs that failed)."""
    import os

    from fm import taxonomy
    from fm.faultbench import power as fb_power
    from fm.faultbench import records as fb_records
    from rftjax.campaign.dataset import generate
    from rftjax.campaign.spec import resolve

    spec = power_spec(base, list(types), list(seeds), variants=variants, points=points)
    failed, _ = generate(resolve(spec), out, workers=workers, ray_options=ray_options)
    result = fb_power.evaluate(
        fb_records.load(out), list(detectors), strength, window=window, budget=budget
    )
    pictures = fb_power.plot(result, taxonomy.family_of, out)
    result["plots"] = [os.path.basename(p) for p in pictures]
    return result, failed

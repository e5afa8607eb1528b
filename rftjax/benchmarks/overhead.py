"""What failure management and fault injection cost the step, measured side by side.

`fault_overhead`: per fault type, the step carrying an inactive fault versus the clean step.
`fm_overhead`: the step with fm's statistics and detector versus without.
`campaign_vmap`: how a campaign could step several runs of one configuration: one after another
(as a worker process does) versus one program vmapped over the runs' stacked states (with fm's
detector, as campaigns run). Alternating calls; medians.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import faults
from fm import taxonomy
from rftjax.benchmarks import harness as h
from rftjax.config import TrainConfig
from rftjax.knobs import make_knobs
from rftjax.train import monitor as run_monitor
from rftjax.train.step import init_state


def fault_overhead(
    cfg: TrainConfig, knob_values: dict, repeats: int, fault_types: str = "all"
) -> dict:
    """Per fault type: the step carrying the fault, not yet active (a campaign run before its
    onset), against the clean step; alternating calls in one process, median per-pair ratio."""
    setup = h.setup(cfg)
    rl = setup.rl
    knobs = make_knobs(**knob_values)
    batches = h.prompt_batches(setup)
    tools = setup.task.tool_spec()
    fault_setup = faults.Setup(rl.group_size, rl.max_new_tokens, rl.normalize_adv_std, tools)
    clean = h.runner(setup, batches, knobs)
    out = {}
    types = list(faults.SPECS) if fault_types == "all" else fault_types.split(",")
    if fault_types == "all" and tools is None:  # tool faults need a tool task
        types = [t for t in types if taxonomy.get(t).family != "tool-environment"]
    for type_id in types:
        faulted = h.runner(
            setup,
            batches,
            knobs,
            fault=faults.make(type_id, fault_setup),
            fparams=faults.params_for(type_id, onset=10**9, severity="severe"),
        )
        off, on = h.alternate(clean, faulted, batches, knobs, repeats)
        out[type_id] = {
            "step_seconds_clean": float(np.median(off)),
            "step_seconds_inactive_fault": float(np.median(on)),
            "median_ratio": float(np.median(on / off)),
        }
    return out


def fm_overhead(cfg: TrainConfig, knob_values: dict, repeats: int) -> dict:
    """Step time with fm statistics + detection versus without: same process, alternating
    calls after compilation, median of per-pair ratios."""
    setup = h.setup(cfg)
    fm_monitor = run_monitor.make_monitor(setup.rl)
    knobs = make_knobs(**knob_values)
    batches = h.prompt_batches(setup)
    variants = {
        "off": h.runner(setup, batches, knobs),
        "fm": h.runner(setup, batches, knobs, monitor=fm_monitor),
    }
    off, on = h.alternate(variants["off"], variants["fm"], batches, knobs, repeats)
    fm_state_bytes = sum(x.nbytes for x in jax.tree.leaves(variants["fm"]["state"].fm))
    return {
        "signals": len(fm_monitor.detector.signals),
        "step_seconds_off": float(np.median(off)),
        "step_seconds_fm": float(np.median(on)),
        "median_ratio": float(np.median(on / off)),
        "ratio_of_medians": float(np.median(on) / np.median(off)),
        "memory_bytes_off": variants["off"]["memory"],
        "memory_bytes_fm": variants["fm"]["memory"],
        "memory_ratio": variants["fm"]["memory"] / variants["off"]["memory"],
        "fm_state_bytes": int(fm_state_bytes),
    }


def campaign_vmap(cfg: TrainConfig, knob_values: dict, repeats: int, runs: int = 2) -> dict:
    """`runs` runs' steps one after another versus one step vmapped over their stacked
    states and batches (each run its own seed and data), called alternately; medians."""
    setup = h.setup(cfg)
    task, rl, _, params, _ = setup
    if task.jnp_reward is None:
        raise ValueError(f"--what=campaign_vmap needs a compiled reward, not {cfg.task!r}")
    fm_monitor = run_monitor.make_monitor(rl, tools=task.tools is not None)
    step = h.learner(setup, monitor=fm_monitor).step
    knobs = make_knobs(**knob_values)
    n, batches = runs, h.prompt_batches(setup)
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
    # Call i gives run r batch (i + 3r) mod 8: each run its own data, as a list and stacked.
    calls = [[batches[(i + 3 * r) % 8] for r in range(n)] for i in range(8)]
    calls = [(runs, stack(runs)) for runs in calls]
    states = [init_state(params, rl, cfg.seed + r, fm_monitor) for r in range(n)]

    def one_by_one(states, call, knobs, fparams=None):
        out = [step(state, batch, knobs) for state, batch in zip(states, call[0], strict=True)]
        return [s for s, _ in out], out[-1][1]

    vstep = jax.jit(jax.vmap(step, in_axes=(0, 0, None)))
    seq = {"step": one_by_one, "state": states}
    vmapped = {"step": lambda state, call, knobs, fparams=None: vstep(state, call[1], knobs),
               "state": stack(states)}  # fmt: skip
    h.alternate(seq, vmapped, calls[:2], knobs, 2)  # compile
    t_seq, t_vmap = h.alternate(seq, vmapped, calls, knobs, repeats)
    return {
        "runs": n,
        "seconds_one_by_one": float(np.median(t_seq)),
        "seconds_vmapped": float(np.median(t_vmap)),
        "ratio_one_by_one_vs_vmapped": float(np.median(t_seq) / np.median(t_vmap)),
    }


def report_fault_overhead(out: dict, repeats: int) -> list[str]:
    lines = [f"inactive fault vs clean step, {repeats} alternating pairs per type:"]
    for type_id, r in out.items():
        lines.append(
            f"  {type_id}: {r['step_seconds_clean'] * 1e3:.2f} ms -> "
            f"{r['step_seconds_inactive_fault'] * 1e3:.2f} ms, median per-pair ratio "
            f"{r['median_ratio']:.3f}"
        )
    return lines


def report_fm_overhead(out: dict, repeats: int) -> list[str]:
    return [
        f"fm overhead ({out['signals']} signals), {repeats} alternating pairs:",
        f"  step without fm {out['step_seconds_off'] * 1e3:.2f} ms, with fm "
        f"{out['step_seconds_fm'] * 1e3:.2f} ms (medians)",
        f"  median per-pair ratio {out['median_ratio']:.3f}, ratio of medians "
        f"{out['ratio_of_medians']:.3f}",
        f"  compiled memory (args + outputs + temps): {out['memory_bytes_off']:,} -> "
        f"{out['memory_bytes_fm']:,} bytes ({out['memory_ratio']:.3f}x); fm state "
        f"{out['fm_state_bytes']:,} bytes",
    ]


def report_campaign_vmap(out: dict, repeats: int) -> list[str]:
    del repeats
    return [
        f"{out['runs']} runs' steps, with fm: one after another "
        f"{out['seconds_one_by_one'] * 1e3:.2f} ms, vmapped {out['seconds_vmapped'] * 1e3:.2f}"
        f" ms (ratio {out['ratio_one_by_one_vs_vmapped']:.3f}; > 1: vmap is faster)"
    ]

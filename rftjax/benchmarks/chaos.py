"""Chaos test of the trainer: start, kill at a random moment (SIGTERM or SIGKILL), resume, and
compare the finished run with one that was never interrupted.

Each cycle starts `python -m launch.train ... --resume` in a subprocess, waits a random time,
sends the signal and waits for the process to end. When a cycle's run completes on its own,
its records are compared with the reference and a new episode starts in a fresh folder, until
`cycles` kills have been made. "Steps lost" of a kill are the steps the run had logged beyond
the checkpoint the next start resumes from: at most the steps since the last checkpoint on
SIGKILL, none on SIGTERM (the trainer saves the step it finishes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rftjax.train.logs import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train_command(workdir: str, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "launch.train", f"--workdir={workdir}", "--resume", *args]


def start(workdir: str, args: Sequence[str]) -> subprocess.Popen:
    os.makedirs(workdir, exist_ok=True)
    log = open(os.path.join(workdir, "train.log"), "a", encoding="utf-8")  # noqa: SIM115
    return subprocess.Popen(
        train_command(workdir, args), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
    )


def logged_step(workdir: str) -> int:
    """The last step in metrics.jsonl (0 if none)."""
    steps = [r.get("step", 0) for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
    return max(steps, default=0)


def checkpoint_step(workdir: str) -> int:
    """The latest complete checkpoint (0 if none): Orbax lists a step only once finalized,
    under its plain number."""
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return 0
    return max((int(n) for n in os.listdir(folder) if n.isdigit()), default=0)


def compare(reference: str, candidate: str) -> list[str]:
    """Differences between two finished runs' records (empty: identical)."""
    problems = []
    for name in ("metrics.jsonl", "events.jsonl"):
        ref = read_jsonl(os.path.join(reference, name))
        got = read_jsonl(os.path.join(candidate, name))
        if ref != got:
            steps = [r.get("step") for r, g in zip(ref, got, strict=False) if r != g]
            first = steps[0] if steps else min(len(ref), len(got)) + 1
            problems.append(f"{name}: {len(ref)} vs {len(got)} records, first differs at {first}")
    summaries = []
    for folder in (reference, candidate):
        path = os.path.join(folder, "summary.json")
        summaries.append(json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {})
    for key in ("eval_accuracy_final", "eval_reward_final", "steps_completed"):
        if summaries[0].get(key) != summaries[1].get(key):
            problems.append(f"summary {key}: {summaries[0].get(key)} vs {summaries[1].get(key)}")
    return problems


def run_chaos(
    out: str,
    args: Sequence[str],
    *,
    cycles: int,
    seed: int = 0,
    max_delay: float | None = None,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """`cycles` kills of `launch.train <args>` runs under `out`; returns the figures."""
    rng = np.random.default_rng(seed)
    shutil.rmtree(out, ignore_errors=True)
    reference = os.path.join(out, "reference")
    t0 = time.time()
    proc = start(reference, args)
    if proc.wait() != 0:
        raise RuntimeError(f"the reference run failed; see {reference}/train.log")
    wall = time.time() - t0
    # Kills spread over a run's whole life: start-up, warm-up, compile, steps, saves.
    max_delay = max_delay or wall
    report(f"reference run: {wall:.1f} s; kills at uniform(0.5, {max_delay:.1f}) s")
    kills: list[dict[str, Any]] = []
    episodes: list[dict[str, Any]] = []

    def finished(episode: int, code: int) -> None:
        """Compares a run that ended on its own with the reference."""
        workdir = os.path.join(out, f"episode{episode}")
        if code != 0:
            raise RuntimeError(f"a resumed run failed (exit {code}); see {workdir}/train.log")
        problems = compare(reference, workdir)
        kills_here = sum(k["episode"] == episode for k in kills)
        episodes.append({"episode": episode, "kills": kills_here, "mismatches": problems})
        report(f"episode {episode} finished: {'identical' if not problems else problems}")

    episode = 0
    while len(kills) < cycles:
        workdir = os.path.join(out, f"episode{episode}")
        proc = start(workdir, args)
        delay = float(rng.uniform(0.5, max_delay))
        try:
            code = proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            sig = signal.SIGTERM if rng.random() < 0.5 else signal.SIGKILL
            proc.send_signal(sig)
            code = proc.wait()
            logged = logged_step(workdir)
            resumed = checkpoint_step(workdir)
            kills.append(
                {
                    "episode": episode,
                    "signal": sig.name,
                    "after_s": round(delay, 2),
                    "exit_code": code,
                    "logged_step": logged,
                    "checkpoint_step": resumed,
                    "steps_lost": logged - resumed,
                }
            )
            k = kills[-1]
            report(
                f"[{len(kills)}/{cycles}] {sig.name} after {delay:.1f} s: exit {code}, "
                f"logged step {logged}, checkpoint {resumed}, lost {k['steps_lost']}"
            )
            continue
        finished(episode, code)
        episode += 1
    # The last episode, resumed once more, runs to its end.
    finished(episode, start(os.path.join(out, f"episode{episode}"), args).wait())
    term = [k for k in kills if k["signal"] == "SIGTERM"]
    hard = [k for k in kills if k["signal"] == "SIGKILL"]
    return {
        "cycles": len(kills),
        "episodes": len(episodes),
        "mismatched_episodes": sum(bool(e["mismatches"]) for e in episodes),
        "sigterm": len(term),
        "sigterm_exit_0": sum(k["exit_code"] == 0 for k in term),
        "sigterm_steps_lost_max": max((k["steps_lost"] for k in term), default=0),
        "sigkill": len(hard),
        "sigkill_steps_lost_max": max((k["steps_lost"] for k in hard), default=0),
        "kills": kills,
        "episode_results": episodes,
    }


def report(out: dict[str, Any]) -> list[str]:
    return [
        f"chaos: {out['cycles']} kills over {out['episodes']} runs to completion; "
        f"runs whose records differ from the uninterrupted run: {out['mismatched_episodes']}",
        f"  SIGTERM {out['sigterm']}: exit 0 in {out['sigterm_exit_0']}, steps lost at most "
        f"{out['sigterm_steps_lost_max']}; SIGKILL {out['sigkill']}: steps lost at most "
        f"{out['sigkill_steps_lost_max']}",
    ]

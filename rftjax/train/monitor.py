"""How the RL step is watched: the `fm.monitor.Monitor` of a run (fm's public in-step API)."""

from __future__ import annotations

from fm import detect
from fm import monitor as fmm
from rftjax.config import RLConfig


def make_monitor(rl: RLConfig, *, tools: bool = False, sharded: bool = False) -> fmm.Monitor:
    """fm's monitor for a run of `rl`: the default signals (the advantage cross-checks only for
    group-normalized GRPO advantages, the tool signals only with tools), integrity audits on
    (`sharded`: the state is placed on a device mesh)."""
    signals = detect.default_signals(group_normalized=rl.algo == "grpo", tools=tools)
    return fmm.monitor(
        group_size=rl.group_size,
        max_len=rl.max_new_tokens,
        signals=signals,
        audits=True,
        sharded=sharded,
    )

"""Orbax checkpoints with pinned steps."""

from rftjax.checkpoint.manager import Checkpointer, PinnedSteps

__all__ = ["Checkpointer", "PinnedSteps"]

"""Orbax checkpoints with pinned steps."""

from rftjax.checkpoint.manager import Checkpointer, CorruptCheckpoint, PinnedSteps, checksums

__all__ = ["Checkpointer", "CorruptCheckpoint", "PinnedSteps", "checksums"]

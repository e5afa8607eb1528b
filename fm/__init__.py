"""fm: failure management for JAX trainers — in-step statistics and online detectors.

A library in the spirit of optax: pure functions of generic inputs (`fm.stats`) and an
`init` / `update` detector with fixed-shape state (`fm.detect`) that live inside a compiled
train step; cross-replica parameter checksums for device meshes (`fm.integrity`). fm depends
only on jax, numpy and optax; it never imports the trainer around it.
"""

from fm import detect, integrity, stats, taxonomy

__all__ = ["detect", "integrity", "stats", "taxonomy"]

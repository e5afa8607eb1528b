"""Test order: the tests that run another framework inside the test process (TRL on torch, a
Tunix learner, a Ray driver) go last, so that their native threads and handlers outlive no
other test in the same process.

XLA's CPU backend compiles the tests' programs without LLVM optimization
(`--xla_backend_optimization_level=0`, set before jax starts; XLA's own HLO passes, fusion
and buffer assignment still run): the programs are tiny, LLVM spent more time optimizing them
than they ran, and the suite's compile-bound files take about 40 % less time (BUILD_NOTES,
"### CI"). Subprocesses the tests start inherit it. An XLA_FLAGS that already names a level
is left as it is."""

import os

_OPT = "--xla_backend_optimization_level"
if _OPT not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_OPT}=0".strip()

FOREIGN = ("test_fm_trl.py", "test_fm_tunix.py", "test_ray_campaign.py")


def pytest_collection_modifyitems(items):
    rank = lambda item: next(  # noqa: E731
        (i + 1 for i, name in enumerate(FOREIGN) if item.path.name == name), 0
    )
    items.sort(key=rank)  # stable: the order within each group is kept

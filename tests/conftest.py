"""Test order: the tests that run another framework inside the test process (TRL on torch, a
Tunix learner, a Ray driver) go last, so that their native threads and handlers outlive no
other test in the same process."""

FOREIGN = ("test_fm_trl.py", "test_fm_tunix.py", "test_ray_campaign.py")


def pytest_collection_modifyitems(items):
    rank = lambda item: next(  # noqa: E731
        (i + 1 for i, name in enumerate(FOREIGN) if item.path.name == name), 0
    )
    items.sort(key=rank)  # stable: the order within each group is kept

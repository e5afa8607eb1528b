"""What a log can show: which fault types fm can see, and tell apart, from the signals it has.

The rules diagnoser (`fm.diagnose`) reads each type's signature in `fm.taxonomy` (the `fm.stats`
keys its fault moves, and which way), plus the hard invariants of `fm.diagnose.INVARIANTS`.
From a log that carries only some of those statistics:

  - a type none of whose signature statistics is logged cannot be seen at all;
  - types whose observable signatures (the logged statistics with their directions) are the
    same cannot be told apart: the diagnoser would give them the same score on any run.

  - a tool-environment type needs a tool statistic: without one the trainer ran no tools, or
    its log does not say (the same rule as the remediator's "no tool faults without tools").

Only the visible types are ranked; a diagnosis names the types it cannot be told from.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import NamedTuple

from fm import diagnose as dg
from fm import taxonomy

_TOOL_PREFIX = "tool_"


class View(NamedTuple):
    signals: tuple[str, ...]  # the fm statistics the log carries
    observable: dict[str, tuple[tuple[str, str], ...]]  # visible type -> logged signature
    invisible: dict[str, tuple[str, ...]]  # type -> its signature statistics (none logged)
    groups: tuple[tuple[str, ...], ...]  # visible types that share an observable signature

    @property
    def visible(self) -> tuple[str, ...]:
        return tuple(self.observable)

    def twins(self, type_id: str) -> tuple[str, ...]:
        """The other visible types `type_id` cannot be told apart from."""
        for group in self.groups:
            if type_id in group:
                return tuple(t for t in group if t != type_id)
        return ()

    def as_json(self) -> dict:
        return {
            "signals": list(self.signals),
            "visible": {t: [f"{k}{d}" for k, d in sig] for t, sig in self.observable.items()},
            "invisible": {t: list(keys) for t, keys in self.invisible.items()},
            "indistinguishable": [list(g) for g in self.groups],
        }


def signature(type_id: str) -> tuple[tuple[str, str], ...]:
    """A type's signature: its taxonomy signals and the invariants that name it."""
    entry = taxonomy.get(type_id)
    extra = tuple((k, "+") for k, t in dg.INVARIANTS.items() if t == type_id)
    return tuple(dict.fromkeys(entry.signals + extra))


def view(signals: Iterable[str]) -> View:
    """The view of a log that carries the fm statistics `signals`."""
    have = tuple(sorted(set(signals)))
    observable, invisible = {}, {}
    for entry in taxonomy.CATALOG:
        sig = signature(entry.id)
        seen = tuple((k, d) for k, d in sig if k in have)
        tools = any(k.startswith(_TOOL_PREFIX) for k, _ in seen)
        if seen and (entry.family != "tool-environment" or tools):
            observable[entry.id] = seen
        else:
            invisible[entry.id] = tuple(k for k, _ in sig)
    by_signature = defaultdict(list)
    for type_id, seen in observable.items():
        by_signature[tuple(sorted(seen))].append(type_id)
    groups = tuple(tuple(g) for g in by_signature.values() if len(g) > 1)
    return View(have, observable, invisible, groups)

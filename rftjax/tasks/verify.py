"""Verification of free-text answers (GSM8K style final-number matching)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

# A sign only counts when it does not follow a word character or ")" (so "3-5" gives "3", "5").
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\$?(?:[0-9][0-9,]*(?:\.[0-9]+)?|\.[0-9]+)")
_MARKER = "####"


def normalize_number(text: str) -> str:
    """Strips ``$``, commas, whitespace and a trailing ``.`` from a number string."""
    out = re.sub(r"[\s$,]", "", text)
    return out[:-1] if out.endswith(".") else out


def extract_final_number(text: str) -> str | None:
    """The final answer of ``text``, normalized (e.g. ``"1234"``, ``"-3.5"``), or None.

    Prefers the first number after the last ``####``; otherwise the last number in the text.
    """
    if _MARKER in text:
        match = _NUMBER.search(text.rsplit(_MARKER, 1)[1])
        if match:
            return normalize_number(match.group())
    matches = _NUMBER.findall(text)
    return normalize_number(matches[-1]) if matches else None


def parse_number(text: str) -> float | None:
    """``text`` as a float after normalization, or None if it is not a finite number."""
    try:
        value = float(normalize_number(text))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def numbers_equal(a: str | None, b: str | None, *, tol: float = 1e-6) -> bool:
    """True iff both parse as numbers equal within ``tol`` (relative and absolute)."""
    x = parse_number(a) if a is not None else None
    y = parse_number(b) if b is not None else None
    if x is None or y is None:
        return False
    return math.isclose(x, y, rel_tol=tol, abs_tol=tol)


def gsm8k_reward(responses: Sequence[str], answers: Sequence[str | float]) -> dict[str, np.ndarray]:
    """Final-number match of each response against its answer (text or number).

    Returns:
      ``{reward, correct, format}``, float32 ``[B]``: ``format`` is 1 iff a number was found
      in the response, ``correct`` iff it equals the answer's final number; reward = correct.
    """
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    found = [extract_final_number(r) for r in responses]
    targets = [extract_final_number(str(a)) for a in answers]
    correct = np.array(
        [numbers_equal(f, t) for f, t in zip(found, targets, strict=True)], np.float32
    )
    fmt = np.array([f is not None for f in found], np.float32)
    return {"reward": correct, "correct": correct, "format": fmt}

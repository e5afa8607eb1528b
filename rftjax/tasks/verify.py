"""Verification of free-text answers: GSM8K (final number) and MATH (``\\boxed{}``) styles."""

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


# --- MATH style: \boxed{...} answers ------------------------------------------------------

ANSWER_FORMATS = ("auto", "gsm8k", "math")
_BOXED = ("\\boxed", "\\fbox")
_FRAC = re.compile(r"^(-?)\\frac\{(-?[0-9.]+)\}\{(-?[0-9.]+)\}$")
_SLASH = re.compile(r"^(-?[0-9.]+)/(-?[0-9.]+)$")
_WRAPPERS = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced.

    ``\\boxed 5`` (a space, no braces) gives ``"5"``; an unclosed box or no box gives None.
    """
    start, tag = max((text.rfind(t), t) for t in _BOXED)
    if start < 0:
        return None
    after = text[start + len(tag) :]
    if after.startswith(" "):
        word = after.split("$")[0].split()
        return word[0] if word else None
    if not after.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(after):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return after[1:i]
    return None


def normalize_math(text: str) -> str:
    """A canonical string of a LaTeX answer (Hendrycks et al.'s MATH normalization, lightly).

    Drops spacing commands, ``\\left``/``\\right``, dollars, degrees, percent signs and a
    leading ``x =``; unwraps ``\\text{}``/``\\mbox{}``; unifies ``\\dfrac``/``\\tfrac`` into
    ``\\frac``; writes ``\\frac12`` as ``\\frac{1}{2}`` and ``\\sqrt2`` as ``\\sqrt{2}``;
    removes whitespace and thousands separators (``1,000``; a list ``1,2`` stays a list).
    """
    s = text.replace("\n", " ")
    for old, new in (
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\ ", ""),
        ("\\left", ""),
        ("\\right", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\$", ""),
        ("$", ""),
        ("\\%", ""),
        ("%", ""),
    ):
        s = s.replace(old, new)
    s = _WRAPPERS.sub(lambda m: m.group(1), s).strip()
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1]
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    s = re.sub(r"\s+", "", s)
    s = s[:-1] if s.endswith(".") else s  # a sentence's full stop
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")  # thousands separators only: "1,2" is a pair of answers
    if re.fullmatch(r"-?[0-9.]+", s) and parse_number(s) is not None:
        s = normalize_number(s)
    return "0" + s if s.startswith(".") else s


def math_value(text: str) -> float | None:
    """The number a normalized answer denotes: ``3``, ``-0.5``, ``\\frac{1}{2}``, ``3/4``."""
    plain = parse_number(text)
    if plain is not None and re.fullmatch(r"-?[0-9.]+", text):
        return plain
    frac, slash = _FRAC.match(text), _SLASH.match(text)
    if frac:
        sign, num, den = frac.group(1), parse_number(frac.group(2)), parse_number(frac.group(3))
    elif slash:
        sign, num, den = "", parse_number(slash.group(1)), parse_number(slash.group(2))
    else:
        return None
    if num is None or not den:
        return None
    return (-1.0 if sign else 1.0) * num / den


def math_equal(found: str | None, target: str | None, *, tol: float = 1e-6) -> bool:
    """True iff two LaTeX answers agree: equal after `normalize_math`, or equal numbers."""
    if found is None or target is None:
        return False
    a, b = normalize_math(found), normalize_math(target)
    if a == b:
        return True
    x, y = math_value(a), math_value(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=tol, abs_tol=tol)


def math_reward(responses: Sequence[str], answers: Sequence[str]) -> dict[str, np.ndarray]:
    """MATH-style check: the last ``\\boxed{}`` of each response against its answer.

    The answer is either a bare final answer (``"\\frac{1}{2}"``) or a worked solution whose
    last ``\\boxed{}`` holds it.

    Returns:
      ``{reward, correct, format}``, float32 ``[B]``: ``format`` is 1 iff the response has a
      boxed answer, ``correct`` iff it equals the reference (`math_equal`); reward = correct.
    """
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    found = [last_boxed(r) for r in responses]
    targets = [last_boxed(str(a)) or str(a) for a in answers]
    correct = np.array([math_equal(f, t) for f, t in zip(found, targets, strict=True)], np.float32)
    fmt = np.array([f is not None for f in found], np.float32)
    return {"reward": correct, "correct": correct, "format": fmt}


def detect_answer_format(answers: Sequence[str]) -> str:
    """``"gsm8k"`` if every reference answer is a number or ends in ``#### <number>``, else
    ``"math"`` (some answer is boxed or a LaTeX expression)."""

    def gsm8k_style(a: str) -> bool:
        if "\\boxed" in a:
            return False
        if _MARKER in a:
            return extract_final_number(a) is not None
        return parse_number(a) is not None

    return "gsm8k" if all(gsm8k_style(str(a)) for a in answers) else "math"


def reward_for(answer_format: str):
    """The text reward function of ``answer_format`` (``gsm8k`` or ``math``)."""
    rewards = {"gsm8k": gsm8k_reward, "math": math_reward}
    if answer_format not in rewards:
        raise ValueError(f"answer_format={answer_format!r}; accepted: {sorted(rewards)}")
    return rewards[answer_format]

"""Checks for the lessons' exercises, so a learner's own answer is checked, not only the hidden solution.

Each exercise in a lesson is three cells: a visible stub (``answer = None  # your code``), a visible check
(``check_exercise("03.2", answer)``), and a hidden solution that computes the answer and calls the same check —
which must pass, so running the lessons under nbval proves every solution right.

``check_exercise`` prints "not answered yet" for the placeholder ``None`` and never raises for it; for an answer it
prints "right" with what was checked, or raises ``AssertionError`` saying why the answer is wrong (so a wrong
answer stops the notebook, as a failed check does everywhere else in the lessons).

The checks of lesson NN live in ``mla_ref/exercises/lesson_NN.py``, registered with ``@exercise("NN.k")``.  A check
takes the learner's answer and returns a one-line description of what it verified; it raises ``AssertionError``
(with the reason) when the answer is wrong.  It computes the truth itself, from the package, never from a number
typed into it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

Check = Callable[[object], str]
_CHECKS: dict[str, Check] = {}


def exercise(key: str) -> Callable[[Check], Check]:
    """Register ``check`` as the check of exercise ``key`` ("NN.k": lesson NN, its k-th exercise)."""

    def register(check: Check) -> Check:
        if key in _CHECKS:
            raise ValueError(f"exercise {key!r} is registered twice")
        _CHECKS[key] = check
        return check

    return register


def _lesson_of(key: str) -> str:
    lesson, _, number = key.partition(".")
    if not (lesson.isdigit() and len(lesson) == 2 and number.isdigit()):
        raise ValueError(f"an exercise is named 'NN.k' (lesson NN, exercise k), got {key!r}")
    return lesson


def check_exercise(key: str, answer) -> bool:
    """Check the answer to exercise ``key``; True when it is right, False when not answered yet (``None``).

    A wrong answer raises ``AssertionError`` with the reason.
    """
    lesson = _lesson_of(key)
    importlib.import_module(f"mla_ref.exercises.lesson_{lesson}")  # registers that lesson's checks
    if key not in _CHECKS:
        known = ", ".join(sorted(k for k in _CHECKS if k.startswith(lesson + "."))) or "none"
        raise ValueError(f"no exercise {key!r}; lesson {lesson} has: {known}")
    if answer is None:
        print(f"exercise {key}: not answered yet — replace None with your answer and run this cell again")
        return False
    try:
        verified = _CHECKS[key](answer)
    except AssertionError as error:
        raise AssertionError(f"exercise {key}: not right yet: {error}") from None
    print(f"exercise {key}: right — {verified}")
    return True

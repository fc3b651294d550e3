"""Argument checks shared by every module: one clear ValueError per bad value."""

from __future__ import annotations


def require_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int > 0, else raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def require_non_negative_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int >= 0, else raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def require_even(name: str, value: int) -> int:
    """Rotary dimensions come in (cos, sin) pairs, so they must be even."""
    if value % 2 != 0:
        raise ValueError(f"{name} must be even (RoPE rotates pairs of dimensions), got {value}")
    return value


def require_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise ValueError listing them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value  # type: ignore[return-value]

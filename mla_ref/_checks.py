"""Argument checks shared by every module: one clear ValueError per bad value."""

from __future__ import annotations

import torch


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


def require_tokens(name: str, tokens, vocab_size: int, *, min_len: int) -> torch.Tensor:
    """``tokens`` as int64 if it is a non-empty (n, s) tensor of ids in [0, vocab_size) with s ≥ min_len."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[1] < min_len or not len(tokens):
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{name} must be a non-empty (n, s) tensor of token ids with s ≥ {min_len}, got {shape}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size:
        raise ValueError(
            f"{name} holds ids outside [0, {vocab_size}): min {int(tokens.min())}, max {int(tokens.max())}"
        )
    return tokens.long()

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


def require_number(name: str, value: object, allowed, what: str) -> float:
    """``value`` as a float if it is a real number (not a bool) for which ``allowed(value)`` holds, else a ValueError
    that says what ``name`` must be: ``require_number("lr", lr, lambda v: 0 < v < 1, "lie in (0, 1)")``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not allowed(value):
        raise ValueError(f"{name} must {what}, got {value!r}")
    return float(value)


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


def resolve_device(device: str | torch.device, name: str = "device") -> torch.device:
    """``device`` as a torch.device: "cpu", or "cuda" / "cuda:N" when torch sees that CUDA device."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}") from error
    if resolved.type == "cpu":
        return torch.device("cpu")
    if resolved.type != "cuda":
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(
            f"{name} {str(resolved)!r} asked for, but torch sees no CUDA device here "
            "(torch.cuda.is_available() is False); use 'cpu'"
        )
    index = torch.cuda.current_device() if resolved.index is None else resolved.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"{name} {str(resolved)!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)

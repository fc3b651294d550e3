"""Rotary position embedding (RoPE, Su et al. 2021).

A head vector of size d is read as d/2 rotary pairs. Pair j is rotated by the
angle ``position * ω_j`` with ``ω_j = θ^(-2j/d)``:

    [x_a', x_b'] = [x_a cos φ - x_b sin φ,  x_a sin φ + x_b cos φ],   φ = n ω_j

Two layouts say which coordinates form pair j, and they must never be mixed:

- ``"rotate_half"`` (Llama, Qwen2, Mistral): pair j is (x[j], x[j + d/2]).
- ``"interleaved"`` (DeepSeek's reference code): pair j is (x[2j], x[2j + 1]).

Because a rotation by nω followed by the transpose of a rotation by mω is a
rotation by (n - m)ω, the score q_m · k_n depends only on n - m.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from mla_ref._checks import require_choice, require_even, require_positive_int

RopeLayout = Literal["rotate_half", "interleaved"]
ROPE_LAYOUTS: tuple[str, ...] = ("rotate_half", "interleaved")


def inverse_frequencies(rotary_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """ω_j = θ^(-2j/d) for j = 0 … d/2 - 1.  Returns shape (rotary_dim / 2,), fp32."""
    require_positive_int("rotary_dim", rotary_dim)
    require_even("rotary_dim", rotary_dim)
    if theta <= 0:
        raise ValueError(f"theta must be positive, got {theta}")
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return (theta**-exponents).float()


def frequency_table(
    frequencies: Sequence[float] | None, rotary_dim: int, name: str = "rope_frequencies"
) -> tuple[float, ...] | None:
    """Check a per-pair frequency table (ω_0 … ω_{d/2-1}) for a rotary dimension; return it as a tuple.

    A custom table replaces θ^(-2j/d) when RoPE was scaled (e.g. Llama 3's scaling) or when a conversion
    assembled the rotary pairs of a key from several source heads.  A frequency of 0 leaves its pair
    position-free.  ``None`` (the default table) passes through.
    """
    if frequencies is None:
        return None
    table = tuple(float(f) for f in frequencies)
    if len(table) != rotary_dim // 2:
        raise ValueError(f"{name} must hold one frequency per rotary pair ({rotary_dim // 2}), got {len(table)}")
    if not all(math.isfinite(f) and f >= 0 for f in table):
        raise ValueError(f"{name} must be finite and non-negative, got {list(table)}")
    return table


def rope_inv_freq(frequencies: tuple[float, ...] | None) -> torch.Tensor | None:
    """A frequency table as the fp32 tensor ``apply_rope(inv_freq=…)`` takes (None stays None)."""
    return None if frequencies is None else torch.tensor(frequencies, dtype=torch.float32)


def pair_indices(rotary_dim: int, layout: RopeLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The coordinates (a_j, b_j) that form rotary pair j.  Each has shape (rotary_dim / 2,)."""
    require_choice("layout", layout, ROPE_LAYOUTS)
    require_even("rotary_dim", rotary_dim)
    half = rotary_dim // 2
    j = torch.arange(half)
    if layout == "rotate_half":
        return j, j + half
    return 2 * j, 2 * j + 1


def apply_rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    *,
    theta: float = 10000.0,
    layout: RopeLayout = "rotate_half",
    pairs: Sequence[int] | torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate the last dimension of ``x`` by the angles of ``positions``.

    Shapes: x (..., t, d) with d even; positions (t,) integer positions.
    Returns a new tensor of x's shape and dtype (angles computed in fp32).

    ``pairs`` keeps RoPE on a subset of the d/2 rotary pairs (the others get
    angle 0, i.e. stay position-free), as partial RoPE needs.  ``inv_freq``
    overrides the frequency table (shape (d/2,)), e.g. for scaled RoPE.
    """
    d = x.shape[-1]
    require_even("rotary dimension (x.shape[-1])", d)
    if d == 0:  # nothing to rotate (e.g. an MLA without a RoPE key)
        return x.clone()
    require_choice("layout", layout, ROPE_LAYOUTS)
    if positions.ndim != 1 or positions.shape[0] != x.shape[-2]:
        raise ValueError(f"positions must have shape (t,) = ({x.shape[-2]},), got {tuple(positions.shape)}")
    freqs = inverse_frequencies(d, theta) if inv_freq is None else inv_freq.float()
    if freqs.shape != (d // 2,):
        raise ValueError(f"inv_freq must have shape ({d // 2},), got {tuple(freqs.shape)}")
    angles = positions.to(torch.float32, copy=False)[:, None] * freqs.to(x.device)[None, :]  # (t, d/2)
    if pairs is not None:
        keep = torch.zeros(d // 2, dtype=torch.bool, device=x.device)
        pair_list = torch.as_tensor(pairs, dtype=torch.long, device=x.device)
        if pair_list.numel() and (pair_list.min() < 0 or pair_list.max() >= d // 2):
            raise ValueError(f"pairs must lie in [0, {d // 2}), got {pair_list.tolist()}")
        keep[pair_list] = True
        angles = angles * keep  # angle 0 = identity rotation for the position-free pairs
    cos, sin = angles.cos(), angles.sin()  # (t, d/2)
    # View the last dimension as (a, b) coordinates of the d/2 pairs, without gathering:
    # rotate-half stores [a_0 … a_{d/2-1}, b_0 … b_{d/2-1}], interleaved [a_0, b_0, a_1, b_1, …].
    pair_axis = -2 if layout == "rotate_half" else -1
    coordinates = x.float().unflatten(-1, (2, d // 2) if layout == "rotate_half" else (d // 2, 2))
    xa, xb = coordinates.unbind(pair_axis)  # (..., t, d/2) each
    rotated = torch.stack([xa * cos - xb * sin, xa * sin + xb * cos], dim=pair_axis)
    return rotated.flatten(-2).to(x.dtype)


def convert_layout(x: torch.Tensor, source: RopeLayout, target: RopeLayout) -> torch.Tensor:
    """Permute the last dimension from one RoPE layout to the other (a pure re-ordering).

    Shapes: x (..., d) -> (..., d).  apply_rope(convert_layout(x)) in the target layout
    equals convert_layout(apply_rope(x)) in the source layout.
    """
    require_choice("source", source, ROPE_LAYOUTS)
    require_choice("target", target, ROPE_LAYOUTS)
    d = x.shape[-1]
    src_a, src_b = pair_indices(d, source)
    dst_a, dst_b = pair_indices(d, target)
    order = torch.empty(d, dtype=torch.long)
    order[dst_a] = src_a
    order[dst_b] = src_b
    return x[..., order.to(x.device)]

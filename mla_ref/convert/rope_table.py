"""One RoPE table for the whole model: the single θ' of a DeepSeek-V3 config, fitted to the converted layers.

Stock RoPE turns slot s of the d_R/2 slots with ω'_s = θ'^(-2s/d_R), one θ' per model, pairs
interleaved.  The pairs of the converted key may be listed in any order (q and k move together), so they are
sorted by frequency and θ' is chosen to minimise the mean over gaps Δ < S of 1 − cos(Δ (ω_s − ω'_s)), the
score change of a unit pair turned by the wrong angle (``fit_rope_theta``).  When the sorted table *is* a
standard one the fit is exact: TransMLA with F = 1 keeps one component for each of the d_R/2 highest source
frequencies θ^(-2j/d_h), which is the standard table with θ' = θ^(d_R/d_h).  The exact conversion and MHA2MLA
repeat each frequency once per KV head, which no θ' reproduces: the nearest is used and reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mla_ref.mla import MultiHeadLatentAttention
from mla_ref.rope import inverse_frequencies, pair_indices


@dataclass(frozen=True)
class RopeFit:
    """The standard table chosen for the converted keys.

    theta: θ' of ω'_s = θ'^(-2s/d_R); exact: every layer's sorted table equals it (to 1e-5 relative);
    max_relative_change: max over layers and slots of |ω'_s − ω_s| / ω_s (0 where ω_s = 0 and ω'_s = 0);
    phase_error: mean over layers, slots and gaps Δ < context of 1 − cos(Δ (ω_s − ω'_s)).
    """

    theta: float
    exact: bool
    max_relative_change: float
    phase_error: float


def layer_table(module: MultiHeadLatentAttention) -> torch.Tensor:
    """The rotary frequencies of ``module``'s shared key, (d_R/2,) fp64."""
    if module.rope_frequencies is not None:
        return torch.tensor(module.rope_frequencies, dtype=torch.float64)
    return inverse_frequencies(module.qk_rope_head_dim, module.rope_theta).double()


def standard_table(theta: float | torch.Tensor, rope_dim: int) -> torch.Tensor:
    """ω'_s = θ'^(-2s/d_R): shape (d_R/2,) for a float θ', (G, d_R/2) for a (G,) tensor of them, fp64."""
    exponents = torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim  # (d_R/2,)
    theta = torch.as_tensor(theta, dtype=torch.float64)
    return theta[..., None] ** -exponents


def _phase_error(tables: torch.Tensor, candidates: torch.Tensor, context: int) -> torch.Tensor:
    """Mean over layers, slots and gaps of 1 − cos(Δ δ), δ = ω − ω'(θ').  tables (L, P) sorted; candidates (G,)."""
    delta = tables[None] - standard_table(candidates, 2 * tables.shape[1])[:, None]  # (G, L, P)
    half = delta / 2
    # mean_{Δ<S} cos(Δδ) = sin(Sδ/2) / (S sin(δ/2)) · cos((S−1)δ/2)   (the Dirichlet kernel)
    denominator = context * torch.sin(half)
    small = denominator.abs() < 1e-12
    ratio = torch.where(small, torch.ones_like(half), torch.sin(context * half) / torch.where(small, 1.0, denominator))
    return (1 - ratio * torch.cos((context - 1) * half)).mean(dim=(1, 2))  # (G,)


def fit_rope_theta(tables: list[torch.Tensor], context: int, hint: float | None = None) -> RopeFit:
    """The θ' whose standard table best matches every layer's sorted frequency table (see the module docstring).

    tables: one (d_R/2,) tensor per layer; context: the gap range S the phase error averages over;
    hint: a θ' to try first (e.g. θ^(d_R/d_h)), kept when it is exact.
    """
    sorted_tables = torch.stack([t.double().sort(descending=True).values for t in tables])  # (L, P)
    n_pairs = sorted_tables.shape[1]
    if n_pairs == 0:
        return RopeFit(theta=hint or 10000.0, exact=True, max_relative_change=0.0, phase_error=0.0)
    guesses = [hint] if hint else []
    if n_pairs > 1 and sorted_tables[0, 1] > 0:
        guesses.append(float(sorted_tables[0, 1] ** (-n_pairs)))  # ω_1 = θ'^(-1/P)
    for guess in guesses:
        if torch.allclose(
            standard_table(guess, 2 * n_pairs).expand_as(sorted_tables), sorted_tables, rtol=1e-5, atol=0
        ):
            return RopeFit(
                theta=guess, exact=True, max_relative_change=_relative_change(sorted_tables, guess), phase_error=0.0
            )
    # θ' keeps the standard table inside the source's range: its lowest frequency ≈ θ'^(-1) is at least a tenth
    # of the lowest non-zero one (beyond that, a falling phase error only means "turn nothing at all")
    positive = sorted_tables[sorted_tables > 0]
    largest = (10.0 / float(positive.min())) ** (n_pairs / max(n_pairs - 1, 1)) if positive.numel() else 1e4
    # coarse grid over log θ', then golden-section search around the best point
    grid = torch.logspace(0.001, math.log10(max(largest, 1.1)), 2000, dtype=torch.float64)
    errors = _phase_error(sorted_tables, grid, context)
    best = int(errors.argmin())
    low, high = math.log(grid[max(best - 1, 0)]), math.log(grid[min(best + 1, len(grid) - 1)])
    ratio = (math.sqrt(5) - 1) / 2

    def cost(log_theta: float) -> float:
        return float(_phase_error(sorted_tables, torch.tensor([math.exp(log_theta)]), context)[0])

    for _ in range(60):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if cost(a) < cost(b):
            high = b
        else:
            low = a
    theta = math.exp((low + high) / 2)
    return RopeFit(
        theta=theta,
        exact=False,
        max_relative_change=_relative_change(sorted_tables, theta),
        phase_error=cost(math.log(theta)),
    )


def _relative_change(sorted_tables: torch.Tensor, theta: float) -> float:
    standard = standard_table(theta, 2 * sorted_tables.shape[1])
    change = (standard - sorted_tables).abs() / sorted_tables.clamp_min(1e-30)
    return float(torch.where((sorted_tables == 0) & (standard == 0), 0.0, change).max())


def interleaved_rope_rows(module: MultiHeadLatentAttention) -> torch.Tensor:
    """Row order that lists the shared key's pairs by descending frequency, interleaved: (d_R,) long.

    New rows 2s and 2s + 1 are coordinates a and b of the pair with the s-th highest frequency.
    """
    order = layer_table(module).argsort(descending=True, stable=True)  # (d_R/2,)
    a_idx, b_idx = pair_indices(module.qk_rope_head_dim, module.rope_layout)
    return torch.stack([a_idx[order], b_idx[order]], dim=-1).flatten()

"""RoRoPE and FreqFold (TransMLA): gather the position information of all KV heads into d_R dimensions.

Start from the exact form (``exact.py``): the n_kv roped key heads together are the shared RoPE key.
Pair j of every KV head turns with the same frequency ω_j, so an orthogonal n_kv × n_kv matrix U_j that
mixes the heads' pairs j — the same matrix for coordinate a and coordinate b — commutes with RoPE:

    k'_{c,j} = Σ_κ U_j[κ, c] k_{κ,j}                  (component c of frequency j, a 2-vector; κ a KV head)
    RoPE_n(k'_{c,j}) = Σ_κ U_j[κ, c] RoPE_n(k_{κ,j})   (a rotation of the plane acts on each 2-vector alike)

Query head i, reading KV head g, meets the rotated key through q'_{i,c,j} = U_j[g, c] q_{i,j}:

    Σ_c q'_{i,c,j} · k'_{c,j} = Σ_κ' (Σ_c U_j[κ, c] U_j[κ', c]) q_{i,j} · k_{κ',j} = q_{i,j} · k_{κ,j}

so every score is unchanged, at every pair of positions (U_j orthogonal).  With U_j the eigenvectors of
the second moment of the calibration keys (the a- and b-coordinates of T tokens as 2T samples of an
n_kv-vector), sorted by eigenvalue, the first components carry most of the key energy.  RoRoPE keeps
d_R/2 rotated pairs roped — the new shared key k^R — and drops the rotation of all other components
(an approximation: they become position-free keys, which BKV-PCA then compresses with the values).

FreqFold: F adjacent frequencies share one PCA — the F · n_kv pairs of a group form one pool, so the
energy concentrates into fewer pairs.  Mixing pairs of different frequencies no longer commutes with
RoPE; a kept component turns with one frequency chosen from its group (``fold_frequency``).  F = 1 is
plain RoRoPE.

Which components stay roped (``rope_budget``):

- ``"uniform"`` (the paper): every frequency group keeps its top ⌊P/G⌋ components (P = d_R/2 pairs, G
  groups); the P mod G left over go to the highest-frequency groups.
- ``"energy"``: one global ranking of all components by key energy × mean query energy,
  E‖k'_c‖² · mean_i E‖q'_{i,c}‖², so the budget goes where the scores are largest.
- ``"rotation"``: the same ranking weighted by how much dropping the rotation costs: for a pair
  turning with ω, E[(q'ᵀ (R_Δω − I) k')²] = E‖q'‖² E‖k'‖² (1 − cos Δω) (isotropic pairs), averaged
  over the gaps Δ < s of the calibration sequences.  Low frequencies barely turn within s tokens, so
  their components can lose RoPE almost for free; the budget goes to the high ones.

Everything is computed in fp64 from the calibration hidden states x (b, s, d_model) that enter the
layer; keys and queries are W_K x and W_Q x before RoPE (RoPE commutes with the mixing, so pre-RoPE
statistics are the right ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange

from mla_ref._checks import require_choice, require_even, require_non_negative_int
from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert.activations import input_moment
from mla_ref.convert.parts import MLAParts, check_source, rotary_pairs, rotate_half_rows, source_frequencies

ROPE_BUDGETS: tuple[str, ...] = ("uniform", "energy", "rotation")
FOLD_FREQUENCIES: tuple[str, ...] = ("mean", "first", "loading")


@dataclass
class RotatedKeyBasis:
    """The per-group orthogonal mixing of RoRoPE / FreqFold and what it found (G = d_h / (2F) groups).

    mixing:       (G, C, C), C = F · n_kv.  Column c is component c; row p = f · n_kv + k is pair
                  j = G_index · F + f of KV head g.  Orthogonal; columns sorted by key energy.
    key_energy:   (G, C)  E‖k'_c‖² per token (the eigenvalues), descending within each group
    query_energy: (G, C)  mean over query heads i of E‖q'_{i,c}‖² per token
    frequencies:  (G, F)  the source frequencies ω_j of each group's pairs
    freqfold:     F
    context_length: the calibration sequence length s (the gaps "rotation" averages over)
    """

    mixing: torch.Tensor
    key_energy: torch.Tensor
    query_energy: torch.Tensor
    frequencies: torch.Tensor
    freqfold: int
    context_length: int

    @property
    def n_groups(self) -> int:
        return self.mixing.shape[0]

    @property
    def pool_size(self) -> int:
        return self.mixing.shape[1]


def check_freqfold(freqfold: int, head_dim: int) -> int:
    """F must divide the d_h/2 rotary frequencies."""
    half = head_dim // 2
    allowed = [f for f in range(1, half + 1) if half % f == 0]
    if isinstance(freqfold, bool) or not isinstance(freqfold, int) or freqfold not in allowed:
        raise ValueError(
            f"freqfold must divide the {half} rotary frequencies (d_h/2); allowed: {allowed}, got {freqfold!r}"
        )
    return freqfold


def check_rope_dim(rope_dim: int, source: GroupedQueryAttention) -> int:
    """0 ≤ d_R ≤ n_kv · d_h, even."""
    require_non_negative_int("rope_dim", rope_dim)
    require_even("rope_dim", rope_dim)
    most = source.n_kv_heads * source.head_dim
    if rope_dim > most:
        raise ValueError(f"rope_dim must be at most n_kv · d_h = {most} (all the source's key dims), got {rope_dim}")
    return rope_dim


def default_rope_dim(head_dim: int) -> int:
    """DeepSeek's 64, or d_h/2 (rounded down to even, at least 2) for heads smaller than 128."""
    return max(2, min(64, head_dim // 2 // 2 * 2))


def _key_pool(source: GroupedQueryAttention, freqfold: int) -> torch.Tensor:
    """The key weight rows grouped into pools: (G, F · n_kv, 2, D), pool row p = f · n_kv + k (KV head k), fp64."""
    k_pairs = rotary_pairs(source.k_proj.weight.double(), source.n_kv_heads, source.head_dim, source.rope_layout)
    return rearrange(k_pairs, "k (G f) e i -> G (f k) e i", f=freqfold)


def _query_groups(source: GroupedQueryAttention, freqfold: int) -> torch.Tensor:
    """The query weight rows grouped by frequency group: (n_h, G, F, 2, D), fp64."""
    q_pairs = rotary_pairs(source.q_proj.weight.double(), source.n_heads, source.head_dim, source.rope_layout)
    return rearrange(q_pairs, "h (G f) e i -> h G f e i", f=freqfold)


def _mixing_per_head(mixing: torch.Tensor, source: GroupedQueryAttention) -> torch.Tensor:
    """U_G[(f, g_i), c] for every query head i: (G, C, C) -> (n_h, G, F, C)."""
    by_head = rearrange(mixing, "G (f k) c -> k G f c", k=source.n_kv_heads)  # (n_kv, G, F, C)
    kv_head_of = torch.arange(source.n_heads, device=mixing.device) // source.group_size  # (n_h,)
    return by_head[kv_head_of]


@torch.no_grad()
def rorope_basis(
    source: GroupedQueryAttention,
    calibration_inputs: torch.Tensor,
    *,
    freqfold: int = 1,
    x_moment: torch.Tensor | None = None,
) -> RotatedKeyBasis:
    """PCA of the calibration keys per frequency group: the orthogonal mixing of RoRoPE (F = 1) or FreqFold.

    Shapes: calibration_inputs (b, s, d_model).  See ``RotatedKeyBasis`` for what comes back.  ``x_moment``:
    E[x xᵀ] of the calibration inputs (``input_moment``), when already computed.
    """
    check_source(source)
    freqfold = check_freqfold(freqfold, source.head_dim)
    if x_moment is None:
        x_moment = input_moment(calibration_inputs, source.d_model)
    x_moment = x_moment.to(source.k_proj.weight.device)  # E[x xᵀ], (D, D)
    key_pool = _key_pool(source, freqfold)  # (G, C, 2, D)
    # M_G[p, q] = E[Σ_e k_{p,e} k_{q,e}]: coordinates a and b of every token are samples of one pool vector
    key_moment = torch.einsum("Gpei,ij,Gqej->Gpq", key_pool, x_moment, key_pool)  # (G, C, C)
    eigenvalues, eigenvectors = torch.linalg.eigh(key_moment)  # ascending
    key_energy = eigenvalues.flip(-1).clamp_min(0.0)  # (G, C), descending
    mixing = eigenvectors.flip(-1)  # (G, C, C)
    # q'_{i,c} = Σ_f U[(f, g_i), c] q_{i,f}:  E‖q'_{i,c}‖² = u_cᵀ E[Σ_e q_e q_eᵀ] u_c over the group's F pairs
    query_groups = _query_groups(source, freqfold)  # (n_h, G, F, 2, D)
    query_moment = torch.einsum("hGfei,ij,hGuej->hGfu", query_groups, x_moment, query_groups)  # (n_h, G, F, F)
    head_mixing = _mixing_per_head(mixing, source)  # (n_h, G, F, C)
    query_energy = torch.einsum("hGfc,hGfu,hGuc->hGc", head_mixing, query_moment, head_mixing).mean(0)  # (G, C)
    frequencies = rearrange(source_frequencies(source).to(x_moment.device), "(G f) -> G f", f=freqfold)  # (G, F)
    context_length = calibration_inputs.shape[1]
    return RotatedKeyBasis(mixing, key_energy, query_energy.clamp_min(0.0), frequencies, freqfold, context_length)


def select_rope_components(
    basis: RotatedKeyBasis, rope_dim: int, rope_budget: str = "uniform", fold_frequency: str = "mean"
) -> torch.Tensor:
    """Which rotated components stay roped: a bool mask (G, C) with rope_dim / 2 entries set.

    ``"uniform"``: each group's top ⌊P/G⌋ components, one more for the P mod G highest-frequency groups.
    ``"energy"``: the P components with the largest key energy × mean query energy, wherever they lie.
    ``"rotation"``: the P largest of that energy × mean over gaps Δ < s of (1 − cos Δω_c), ω_c from
    ``component_frequencies(basis, fold_frequency)``.
    """
    require_choice("rope_budget", rope_budget, ROPE_BUDGETS)
    require_non_negative_int("rope_dim", rope_dim)
    require_even("rope_dim", rope_dim)
    n_groups, pool = basis.n_groups, basis.pool_size
    n_pairs = rope_dim // 2
    if n_pairs > n_groups * pool:
        raise ValueError(f"rope_dim must be at most {2 * n_groups * pool} (all rotated pairs), got {rope_dim}")
    keep = torch.zeros(n_groups, pool, dtype=torch.bool, device=basis.mixing.device)
    if rope_budget == "uniform":
        per_group = torch.full((n_groups,), n_pairs // n_groups, device=keep.device)
        highest_first = basis.frequencies.mean(-1).argsort(descending=True)  # (G,)
        per_group[highest_first[: n_pairs % n_groups]] += 1
        keep = torch.arange(pool, device=keep.device)[None, :] < per_group[:, None]  # components sorted by energy
    else:
        importance = basis.key_energy * basis.query_energy  # (G, C)
        if rope_budget == "rotation":
            # E[(q'ᵀ (R_Δω − I) k')²] = E‖q'‖² E‖k'‖² (1 − cos Δω) for isotropic pairs, averaged over the gaps Δ
            gaps = torch.arange(basis.context_length, dtype=torch.float64, device=keep.device)
            omega = component_frequencies(basis, fold_frequency)  # (G, C)
            importance = importance * (1 - torch.cos(gaps[:, None, None] * omega).mean(0))
        keep.view(-1)[importance.flatten().argsort(descending=True)[:n_pairs]] = True
    return keep


def component_frequencies(basis: RotatedKeyBasis, fold_frequency: str = "mean") -> torch.Tensor:
    """The frequency each rotated component turns with: (G, C), fp64.

    With F = 1 every component of group j turns with ω_j (exact).  With F > 1 (an approximation):
    ``"mean"`` the group's mean frequency, ``"first"`` its first (highest) frequency, ``"loading"`` each
    component's own mean, weighted by how much of it lies on each frequency (Σ_k U[(f, k), c]²).
    """
    require_choice("fold_frequency", fold_frequency, FOLD_FREQUENCIES)
    freqs = basis.frequencies  # (G, F)
    pool = basis.pool_size
    if fold_frequency == "mean":
        return freqs.mean(-1, keepdim=True).expand(-1, pool).clone()
    if fold_frequency == "first":
        return freqs[:, :1].expand(-1, pool).clone()
    # loading[G, f, c] = Σ_k U_G[(f, k), c]²  (Σ_f loading = 1: the columns are unit vectors)
    loading = rearrange(basis.mixing**2, "G (f k) c -> G f k c", f=basis.freqfold).sum(2)  # (G, F, C)
    return torch.einsum("Gfc,Gf->Gc", loading, freqs)


@torch.no_grad()
def rorope_parts(
    source: GroupedQueryAttention,
    calibration_inputs: torch.Tensor,
    *,
    rope_dim: int | None = None,
    freqfold: int = 1,
    rope_budget: str = "uniform",
    fold_frequency: str = "mean",
    basis: RotatedKeyBasis | None = None,
) -> MLAParts:
    """RoRoPE (F = 1) or FreqFold as MLA parts, still at the source's cache size.

    The shared key k^R holds the rope_dim/2 kept rotated pairs (d_R = rope_dim, default
    ``default_rope_dim(d_h)``); the latent is c = [k^N ; V_1 … V_nkv]: the other rotated key
    components, position-free now (d_N = n_kv · d_h − d_R), and the source's values unchanged.
    d_c + d_R = 2 · n_kv · d_h, the source's cache.  ``bkv_pca_parts`` compresses this latent.

    With F = 1 and rope_dim = n_kv · d_h nothing is dropped and the scores equal the source's.
    Shapes: calibration_inputs (b, s, d_model); pass a ``basis`` from ``rorope_basis`` to reuse it.
    """
    check_source(source)
    rope_dim = default_rope_dim(source.head_dim) if rope_dim is None else rope_dim
    check_rope_dim(rope_dim, source)
    require_choice("rope_budget", rope_budget, ROPE_BUDGETS)
    require_choice("fold_frequency", fold_frequency, FOLD_FREQUENCIES)
    if basis is None:
        basis = rorope_basis(source, calibration_inputs, freqfold=freqfold)
    elif basis.freqfold != check_freqfold(freqfold, source.head_dim):
        raise ValueError(f"the basis was computed with freqfold={basis.freqfold}, but freqfold={freqfold} was asked")
    n_h, d_h, m = source.n_heads, source.head_dim, source.group_size
    keep = select_rope_components(basis, rope_dim, rope_budget, fold_frequency)  # (G, C)
    frequencies = component_frequencies(basis, fold_frequency)[keep]  # (d_R/2,)
    # k'_c = Σ_p U[p, c] k_p and q'_{i,c} = Σ_f U[(f, g_i), c] q_{i,f}: weight rows as (2, D) pairs
    keys = torch.einsum("Gpc,Gpei->Gcei", basis.mixing, _key_pool(source, basis.freqfold))  # (G, C, 2, D)
    head_mixing = _mixing_per_head(basis.mixing, source)  # (n_h, G, F, C)
    queries = torch.einsum("hGfc,hGfei->hGcei", head_mixing, _query_groups(source, basis.freqfold))
    key_rope = rotate_half_rows(keys[keep])  # (d_R, D)
    query_rope = torch.stack([rotate_half_rows(q[keep]) for q in queries])  # (n_h, d_R, D)
    # the dropped components keep both coordinates, now without rotation
    key_nope = rearrange(keys[~keep], "n e i -> (n e) i")  # (d_N, D)
    query_nope = rearrange(queries[:, ~keep], "h n e i -> h (n e) i")  # (n_h, d_N, D)
    d_nope = key_nope.shape[0]
    latent_down = torch.cat([key_nope, source.v_proj.weight.double()], dim=0)  # (d_N + n_kv·d_h, D)
    d_latent = latent_down.shape[0]
    # W_UK^i reads the first d_N coordinates of c; W_UV^i reads block g = ⌊i/m⌋ of the values
    key_up = torch.eye(d_nope, d_latent, dtype=torch.float64, device=latent_down.device).expand(n_h, -1, -1)
    value_up = torch.zeros(n_h, d_h, d_latent, dtype=torch.float64, device=latent_down.device)
    for i in range(n_h):
        start = d_nope + (i // m) * d_h
        value_up[i, :, start : start + d_h] = torch.eye(d_h, dtype=torch.float64)
    return MLAParts(
        query_nope=query_nope.float(),
        query_rope=query_rope.float(),
        latent_down=latent_down.float(),
        key_rope=key_rope.float(),
        key_up=key_up.float().contiguous(),
        value_up=value_up.float(),
        output=source.o_proj.weight.detach().float().clone(),
        rope_frequencies=tuple(frequencies.tolist()),
        source_scale=1.0 / math.sqrt(d_h),
        rope_theta=source.rope_theta,
    )

"""MHA2MLA, step 1 — partial RoPE (Ji et al. 2025, §3.1): keep r rotary pairs per KV head, free the rest.

A source head's score is a sum over its d_h/2 rotary pairs j (2-vectors q_j, k_j, frequency ω_j):

    q_m · k_n = Σ_j q_j R((n − m) ω_j) k_j

Partial RoPE keeps the rotation on r pairs per KV head and drops it on the others, whose terms become
the position-free q_j · k_j.  That is the one approximation of this step (MHA2MLA fine-tunes it away);
it costs little on a pair whose angle (n − m) ω_j stays small over the context, or whose q_j, k_j are small.
Which r pairs (the paper's four strategies; ``select_rotary_pairs`` takes each by name):

- ``"high"``:    the r highest frequencies (largest ω_j; j = 0 … r − 1 for the default θ table);
- ``"low"``:     the r lowest frequencies;
- ``"uniform"``: r pairs evenly spaced over the frequency order, j = ⌊k · (d_h/2) / r⌋, k = 0 … r − 1;
- ``"2-norm"``:  for KV head g, the r pairs with the largest  s_{g,j} = Σ_{i ∈ g} E‖q_{i,j}‖ · E‖k_{g,j}‖
  over calibration inputs (``pair_norm_scores``; pre-RoPE pair norms √(a_j² + b_j²)).  The product of the
  two means is the mean of ‖q_{i,j}‖ ‖k_{g,j}‖ over all (query token, key token) pairs, an upper bound on
  the pair's share of the score (Cauchy–Schwarz).

Beyond the paper, for small models whose rotary budget is tight:

- ``"rotation-2-norm"`` (``pair_rotation_scores``): the 2-norm score times E_Δ |e^{iω_j Δ} − 1|, the mean over
  the calibration window's causal gaps Δ = n − m of how far pair j turns.  Dropping pair j's rotation moves
  the score by q_j · (R(Δ ω_j) − I) k_j, at most ‖q_j‖ ‖k_j‖ |e^{iω_j Δ} − 1|: a pair that barely turns
  within the context costs little to free however large its norms, which the 2-norm score does not see.
- ``allocation="global"`` (``keep_top_pairs``): the same budget, n_kv · r pairs, given to the best-scoring
  (head, pair) entries of the whole layer, so a head that needs position keeps more pairs than one that does
  not (d_R is unchanged; the shared key does not care which head a pair came from).

Any other (n_kv, d_h/2) table of pair scores plugs in through ``keep_top_pairs``.

In MLA form (``partial_rope_parts``), still at full rank:

- the shared RoPE key k^R holds the kept pairs of every KV head, head g's block after head g − 1's
  (d_R = 2 · r · n_kv), each pair keeping its source frequency ω_j; query head i places its own kept
  pairs on its group's block and zeros elsewhere (as in ``exact.py``), so q_i^R · k^R sums exactly the
  kept terms of head i's score;
- the position-free coordinates (d_N = d_h − 2r, in the source's row order) are the nope key k_g^N and
  the matching query rows q_i^N;
- the latent is c = [k_1^N … k_nkv^N, v_1 … v_nkv], and W_UK^i, W_UV^i are 0/1 matrices picking head i's
  group out of it.

Cache: d_c + d_R = n_kv (d_h − 2r) + n_kv d_h + 2 r n_kv = 2 n_kv d_h, the source's — nothing is compressed
yet; ``svd_low_rank`` does that.  With r = d_h/2 nothing is dropped and the outputs are the source's.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from mla_ref._checks import require_choice, require_non_negative_int
from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert.activations import check_calibration_inputs
from mla_ref.convert.parts import MLAParts, check_source, rotary_pairs, rotate_half_rows, source_frequencies
from mla_ref.rope import pair_indices

PARTIAL_ROPE_STRATEGIES: tuple[str, ...] = ("high", "low", "uniform", "2-norm", "rotation-2-norm")
SCORED_STRATEGIES: tuple[str, ...] = ("2-norm", "rotation-2-norm")  # ranked on calibration inputs
PAIR_ALLOCATIONS: tuple[str, ...] = ("per_head", "global")


def check_rope_pairs(source: GroupedQueryAttention, rope_pairs: int) -> int:
    """r must lie in [0, d_h/2]: 0 drops RoPE entirely, d_h/2 keeps all of it."""
    require_non_negative_int("rope_pairs", rope_pairs)
    half = source.head_dim // 2
    if rope_pairs > half:
        raise ValueError(
            f"rope_pairs must lie in [0, {half}] (head_dim {source.head_dim} has {half} rotary pairs), got {rope_pairs}"
        )
    return rope_pairs


@torch.no_grad()
def pair_norm_scores(source: GroupedQueryAttention, calibration_inputs: torch.Tensor) -> torch.Tensor:
    """S_2-norm's score of every (KV head g, rotary pair j): Σ_{i ∈ g} E‖q_{i,j}‖ · E‖k_{g,j}‖.

    Shapes: calibration_inputs (b, s, d_model), the hidden states entering the layer -> (n_kv, d_h/2), fp32.
    The pair norms are taken before RoPE (a rotation does not change them).
    """
    check_source(source)
    x = check_calibration_inputs(calibration_inputs, source.d_model).to(source.q_proj.weight)
    n_h, n_kv, d_h = source.n_heads, source.n_kv_heads, source.head_dim
    a_idx, b_idx = pair_indices(d_h, source.rope_layout)
    q = rearrange(source.q_proj(x).float(), "b s (h d) -> (b s) h d", h=n_h)  # (t, n_h, d_h), pre-RoPE
    k = rearrange(source.k_proj(x).float(), "b s (g d) -> (b s) g d", g=n_kv)  # (t, n_kv, d_h), pre-RoPE
    # ‖q_{i,j}‖ = √(a_j² + b_j²), averaged over tokens
    q_norm = torch.hypot(q[..., a_idx], q[..., b_idx]).mean(dim=0)  # (n_h, d_h/2)
    k_norm = torch.hypot(k[..., a_idx], k[..., b_idx]).mean(dim=0)  # (n_kv, d_h/2)
    # s_{g,j} = Σ_{i ∈ g} E‖q_{i,j}‖ · E‖k_{g,j}‖
    return rearrange(q_norm, "(g m) j -> g m j", g=n_kv).sum(dim=1) * k_norm  # (n_kv, d_h/2)


@torch.no_grad()
def pair_rotation_scores(source: GroupedQueryAttention, calibration_inputs: torch.Tensor) -> torch.Tensor:
    """The 2-norm score weighted by how far each pair turns: s_{g,j} · E_Δ |e^{iω_j Δ} − 1|.

    Shapes: calibration_inputs (b, s, d_model) -> (n_kv, d_h/2), fp32.  Δ runs over the causal gaps 0 … s − 1
    of a calibration window, each weighted by the number of (query, key) pairs at that gap (s − Δ);
    |e^{iθ} − 1| = 2 |sin(θ/2)|.  A pair with ω_j = 0 scores 0.
    """
    scores = pair_norm_scores(source, calibration_inputs)  # (n_kv, d_h/2)
    window = calibration_inputs.shape[1]
    gaps = torch.arange(window, dtype=torch.float64)  # Δ
    pairs_at_gap = window - gaps  # (query m, key n ≤ m) pairs with m − n = Δ in one window
    frequencies = source_frequencies(source)  # ω_j, (d_h/2,) fp64
    # E_Δ |e^{iω_j Δ} − 1| = Σ_Δ (s − Δ) · 2|sin(ω_j Δ / 2)| / Σ_Δ (s − Δ)
    turn = 2 * torch.sin(frequencies[None, :] * gaps[:, None] / 2).abs()  # (s, d_h/2)
    mean_turn = (pairs_at_gap[:, None] * turn).sum(dim=0) / pairs_at_gap.sum()  # (d_h/2,)
    return scores * mean_turn.float()


def keep_top_pairs(scores: torch.Tensor, rope_pairs: int, *, allocation: str = "per_head") -> torch.Tensor:
    """Keep the best-scoring rotary pairs: the top r of each KV head, or the top n_kv · r of the layer.

    Shapes: scores (n_kv, d_h/2) -> kept (n_kv, d_h/2) bool.  Ties go to the lower pair index j (the higher
    frequency under the default θ table); across heads (``"global"``), to the lower head first.
    ``allocation="global"`` spends the same budget (n_kv · r pairs, the same d_R) where the scores are
    largest, so heads may keep different numbers of pairs.
    """
    require_choice("allocation", allocation, PAIR_ALLOCATIONS)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (n_kv, d_h/2), got {tuple(scores.shape)}")
    n_kv, half = scores.shape
    require_non_negative_int("rope_pairs", rope_pairs)
    if rope_pairs > half:
        raise ValueError(f"rope_pairs must lie in [0, {half}], got {rope_pairs}")
    kept = torch.zeros(n_kv, half, dtype=torch.bool)
    if allocation == "per_head":
        order = torch.sort(scores.double().cpu(), dim=1, descending=True, stable=True).indices  # (n_kv, d_h/2)
        kept.scatter_(1, order[:, :rope_pairs], True)
    else:
        order = torch.sort(scores.double().cpu().flatten(), descending=True, stable=True).indices  # (n_kv·d_h/2,)
        kept.view(-1)[order[: n_kv * rope_pairs]] = True
    return kept


def select_rotary_pairs(
    source: GroupedQueryAttention,
    rope_pairs: int,
    strategy: str = "2-norm",
    *,
    calibration_inputs: torch.Tensor | None = None,
    allocation: str = "per_head",
) -> torch.Tensor:
    """The rotary pairs each KV head keeps under one of the strategies of the module docstring.

    Shapes: calibration_inputs (b, s, d_model), required for "2-norm" and "rotation-2-norm" -> kept
    (n_kv, d_h/2) bool, r True entries per row (n_kv · r in all with ``allocation="global"``, which only the
    scored strategies take).  "high", "low" and "uniform" rank pairs by the source's frequencies ω_j (stable,
    so equal frequencies keep their j order) and keep the same pairs in every head.
    """
    check_source(source)
    require_choice("strategy", strategy, PARTIAL_ROPE_STRATEGIES)
    require_choice("allocation", allocation, PAIR_ALLOCATIONS)
    check_rope_pairs(source, rope_pairs)
    n_kv, half = source.n_kv_heads, source.head_dim // 2
    if strategy in SCORED_STRATEGIES:
        if calibration_inputs is None:
            raise ValueError(
                f"strategy {strategy!r} ranks pairs by query/key norms on calibration data: pass calibration_inputs "
                f"(b, s, d_model={source.d_model}), or pick one of 'high', 'low', 'uniform'"
            )
        score = pair_norm_scores if strategy == "2-norm" else pair_rotation_scores
        return keep_top_pairs(score(source, calibration_inputs), rope_pairs, allocation=allocation)
    if allocation != "per_head":
        raise ValueError(
            f"allocation {allocation!r} needs pair scores; strategy {strategy!r} keeps the same pairs in every head "
            f"(use 'per_head', or a scored strategy: {', '.join(map(repr, SCORED_STRATEGIES))})"
        )
    by_frequency = torch.sort(source_frequencies(source), descending=True, stable=True).indices  # (d_h/2,)
    if strategy == "high":
        chosen = by_frequency[:rope_pairs]
    elif strategy == "low":
        chosen = by_frequency[half - rope_pairs :]
    else:  # uniform: j_k = ⌊k · (d_h/2) / r⌋ along the frequency order
        chosen = by_frequency[[k * half // rope_pairs for k in range(rope_pairs)]]
    kept = torch.zeros(n_kv, half, dtype=torch.bool)
    kept[:, chosen] = True
    return kept


def check_kept_pairs(source: GroupedQueryAttention, kept: object) -> torch.Tensor:
    """A kept-pair mask must be a (n_kv, d_h/2) bool tensor."""
    shape = (source.n_kv_heads, source.head_dim // 2)
    if not isinstance(kept, torch.Tensor) or kept.dtype != torch.bool or tuple(kept.shape) != shape:
        got = f"{kept.dtype} {tuple(kept.shape)}" if isinstance(kept, torch.Tensor) else type(kept).__name__
        raise ValueError(f"kept must be a bool tensor of shape (n_kv, d_h/2) = {shape}, got {got}")
    return kept.cpu()


@torch.no_grad()
def partial_rope_parts(source: GroupedQueryAttention, kept: torch.Tensor, *, nope_dim: int | None = None) -> MLAParts:
    """The MLA maps of partial RoPE at full rank (see the module docstring).  All in fp32, on the CPU.

    Shapes: kept (n_kv, d_h/2) bool, from ``select_rotary_pairs`` or ``keep_top_pairs``.  With r_g pairs kept
    by KV head g: d_R = 2 Σ_g r_g; d_N = d_h − 2 min_g r_g, or ``nope_dim`` if given (at least that, at most
    d_h: a fixed d_N lets every layer of a model share one shape); a head with fewer position-free coordinates
    than d_N pads them with zero rows, which change no score and no cache.  The latent is
    [k_1^N … k_nkv^N, v_1 … v_nkv], of Σ_g (d_h − 2 r_g) + n_kv d_h rows, the nope keys first
    (``svd_low_rank`` relies on that order).
    """
    check_source(source)
    kept = check_kept_pairs(source, kept)
    least_nope = source.head_dim - 2 * int(kept.sum(dim=1).min())
    if nope_dim is not None:
        require_non_negative_int("nope_dim", nope_dim)
        if not least_nope <= nope_dim <= source.head_dim:
            raise ValueError(
                f"nope_dim must lie in [{least_nope}, {source.head_dim}] (the most position-free coordinates of a "
                f"head, up to d_h), got {nope_dim}"
            )
    n_h, n_kv, d_h, m, d_model = source.n_heads, source.n_kv_heads, source.head_dim, source.group_size, source.d_model
    w_q, w_k, w_v, w_o = (
        p.weight.detach().float().cpu() for p in (source.q_proj, source.k_proj, source.v_proj, source.o_proj)
    )
    q_pairs = rotary_pairs(w_q, n_h, d_h, source.rope_layout)  # (n_h, d_h/2, 2, D)
    k_pairs = rotary_pairs(w_k, n_kv, d_h, source.rope_layout)  # (n_kv, d_h/2, 2, D)
    q_rows = rearrange(w_q, "(h d) i -> h d i", h=n_h)  # (n_h, d_h, D)
    k_rows = rearrange(w_k, "(g d) i -> g d i", g=n_kv)  # (n_kv, d_h, D)

    # The shared RoPE key: head g's kept pairs on block g (pairs offset[g] … offset[g+1] − 1).
    counts = kept.sum(dim=1).tolist()  # r_g
    offset = [0, *torch.tensor(counts).cumsum(0).tolist()]
    n_pairs = offset[-1]
    key_rope = rotate_half_rows(torch.cat([k_pairs[g, kept[g]] for g in range(n_kv)]))  # (d_R, D)
    query_rope_pairs = torch.zeros(n_h, n_pairs, 2, d_model)
    for i in range(n_h):
        g = i // m
        query_rope_pairs[i, offset[g] : offset[g + 1]] = q_pairs[i, kept[g]]
    query_rope = torch.stack([rotate_half_rows(query_rope_pairs[i]) for i in range(n_h)])  # (n_h, d_R, D)
    frequencies = source_frequencies(source)  # ω_j, (d_h/2,)
    rope_frequencies = torch.cat([frequencies[kept[g]] for g in range(n_kv)])  # (d_R/2,)

    # The position-free coordinates: head g's rows whose pair is not kept, in the source's row order.
    a_idx, b_idx = pair_indices(d_h, source.rope_layout)
    pair_of_row = torch.empty(d_h, dtype=torch.long)
    pair_of_row[a_idx], pair_of_row[b_idx] = torch.arange(d_h // 2), torch.arange(d_h // 2)
    nope_rows = [torch.nonzero(~kept[g][pair_of_row]).flatten() for g in range(n_kv)]  # d_h − 2 r_g each
    d_nope = least_nope if nope_dim is None else nope_dim
    key_start = [0, *torch.tensor([len(rows) for rows in nope_rows]).cumsum(0).tolist()]
    key_latent = key_start[-1]  # Σ_g (d_h − 2 r_g)
    d_latent = key_latent + n_kv * d_h
    latent_down = torch.cat([*(k_rows[g, nope_rows[g]] for g in range(n_kv)), w_v])  # (d_c, D)

    query_nope = torch.zeros(n_h, d_nope, d_model)
    key_up = torch.zeros(n_h, d_nope, d_latent)
    value_up = torch.zeros(n_h, d_h, d_latent)
    for i in range(n_h):
        g = i // m
        n_g = len(nope_rows[g])
        query_nope[i, :n_g] = q_rows[i, nope_rows[g]]
        # k_i^N = W_UK^i c picks head g's nope block of c; v_i = W_UV^i c picks its value block
        key_up[i, :n_g, key_start[g] : key_start[g] + n_g] = torch.eye(n_g)
        value_start = key_latent + g * d_h
        value_up[i, :, value_start : value_start + d_h] = torch.eye(d_h)
    return MLAParts(
        query_nope=query_nope,
        query_rope=query_rope,
        latent_down=latent_down,
        key_rope=key_rope,
        key_up=key_up,
        value_up=value_up,
        output=w_o.clone(),
        rope_frequencies=tuple(rope_frequencies.tolist()),
        source_scale=1.0 / math.sqrt(d_h),
        rope_theta=source.rope_theta,
    )

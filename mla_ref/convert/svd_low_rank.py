"""MHA2MLA, step 2 — low rank by SVD of the weights (Ji et al. 2025, §3.2), and the whole conversion.

After partial RoPE (``partial_rope.py``) the latent is c = W x with W = [W_K^N ; W_V]: the nope-key rows of
every KV head (n_kv (d_h − 2r) of them), then the value rows (n_kv d_h).  That is the source's cache again;
the low-rank step keeps d_c directions of it:

- SVD_joint: one truncated SVD of the stacked W ≈ U_c Σ_c V_cᵀ (rank d_c), one shared latent;
- SVD_split: W_K^N ≈ U_k Σ_k V_kᵀ and W_V ≈ U_v Σ_v V_vᵀ separately, rank d_c/2 each, c = [c_k ; c_v]
  (where one block has fewer rows than its half, the other takes the rest).

Either way the basis U (n × d_c, orthonormal columns; block-diagonal for split) gives

    W_DKV = Uᵀ W  (= Σ_c V_cᵀ),     W_UK^i = (head i's nope-key rows of U),     W_UV^i = (its value rows of U)

so k_i^N ≈ W_UK^i c and v_i ≈ W_UV^i c.  Σ goes into W_DKV, not split as √Σ on each side, because then
c = Uᵀ [k^N ; v] is the source's own cached vectors written in an orthonormal basis and truncated: the cache
holds numbers on the source cache's scale (a bf16 cache behaves as the source's did), W_UK and W_UV have
orthonormal columns (absorbing W_UK into the query keeps its norm), and ``latent_basis`` can swap in another
basis without touching the rest.  (MHA2MLA's reference code puts Σ on the up-projection; the outputs are the
same in exact arithmetic.)  At full rank U is orthogonal, U Uᵀ = I, and the weights come back exactly.

A choice beyond the paper: given C = E[x xᵀ] of calibration inputs (``covariance=input_moment(x, d_model)``, or
``svd_basis="activations"`` in ``mha2mla_convert``), U is the principal components of the cached vectors W x
themselves (top eigenvectors of W C Wᵀ), minimising E‖(W − U Uᵀ W) x‖² rather than ‖W − U Uᵀ W‖_F; the
weight SVD is the case C = I.

Cache per token per layer: d_c + d_R = d_c + 2 · r · n_kv (``mha2mla_ranks`` picks the pair for a target fraction).
"""

from __future__ import annotations

import dataclasses

import torch

from mla_ref._checks import require_choice, require_number, require_positive_int
from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert.activations import check_calibration_inputs, input_moment
from mla_ref.convert.partial_rope import (
    PARTIAL_ROPE_STRATEGIES,
    check_rope_pairs,
    partial_rope_parts,
    select_rotary_pairs,
)
from mla_ref.convert.parts import MLAParts, assemble_mla, check_source
from mla_ref.mla import MultiHeadLatentAttention

SVD_METHODS: tuple[str, ...] = ("joint", "split")
SVD_BASES: tuple[str, ...] = ("weights", "activations")


def latent_basis(weight: torch.Tensor, rank: int, covariance: torch.Tensor | None = None) -> torch.Tensor:
    """The d_c directions kept of the rows' space: (n, D) -> U (n, rank), orthonormal columns, fp64.

    Without ``covariance`` these are the top left singular vectors of ``weight`` (truncated SVD).  With it
    (D, D), the top eigenvectors of W C Wᵀ.  Past the matrix's rank the basis is completed with
    directions the weight does not reach (their latent rows are zero).
    """
    w = weight.double()
    if covariance is None:
        basis = torch.linalg.svd(w, full_matrices=True).U  # (n, n), by descending singular value
    else:
        # W C Wᵀ = U Λ Uᵀ: the covariance of the activations W x
        _, vectors = torch.linalg.eigh(w @ covariance.double().to(w.device) @ w.T)  # ascending
        basis = vectors.flip(-1)
    return basis[:, :rank]


def split_ranks(kv_lora_rank: int, key_rows: int, value_rows: int) -> tuple[int, int]:
    """SVD_split's ranks: d_c/2 each (keys get the smaller half of an odd d_c), capped by each block's rows."""
    key_rank = min(max(kv_lora_rank // 2, kv_lora_rank - value_rows), key_rows)
    return key_rank, kv_lora_rank - key_rank


@torch.no_grad()
def svd_low_rank_parts(
    parts: MLAParts,
    kv_lora_rank: int,
    *,
    method: str = "joint",
    key_rows: int | None = None,
    covariance: torch.Tensor | None = None,
) -> MLAParts:
    """Factorise the latent of full-rank ``parts`` (W_DKV = W, n rows) to rank d_c (see the module docstring).

    Shapes: parts.latent_down (n, D) -> (d_c, D); key_up / value_up (n_h, ·, n) -> (n_h, ·, d_c).
    ``key_rows``: how many leading rows of W are nope keys (the rest are values) — required for "split"
    (``partial_rope_parts`` stacks n_kv (d_h − 2r) key rows first).  ``covariance``: E[xxᵀ] (D, D) for the
    activation basis, or None for the paper's weight SVD.  Everything else is copied.
    """
    require_choice("method", method, SVD_METHODS)
    weight = parts.latent_down.double()  # (n, D)
    n_rows = weight.shape[0]
    require_positive_int("kv_lora_rank", kv_lora_rank)
    if kv_lora_rank > n_rows:
        raise ValueError(
            f"kv_lora_rank must lie in [1, {n_rows}] (the full-rank latent; more would cache more than it), "
            f"got {kv_lora_rank}"
        )
    if method == "joint":
        basis = latent_basis(weight, kv_lora_rank, covariance)  # (n, d_c)
    else:
        if (
            key_rows is None
            or isinstance(key_rows, bool)
            or not isinstance(key_rows, int)
            or not 0 <= key_rows <= n_rows
        ):
            raise ValueError(
                f"method 'split' needs key_rows, the number of key rows in [0, {n_rows}], got {key_rows!r}"
            )
        key_rank, value_rank = split_ranks(kv_lora_rank, key_rows, n_rows - key_rows)
        basis = torch.block_diag(
            latent_basis(weight[:key_rows], key_rank, covariance),
            latent_basis(weight[key_rows:], value_rank, covariance),
        )  # (n, d_c): c = [c_k ; c_v]
    # W_DKV = Uᵀ W;  W_UK^i = W_UK,full^i U;  W_UV^i = W_UV,full^i U
    return dataclasses.replace(
        parts,
        latent_down=(basis.T @ weight).float(),
        key_up=(parts.key_up.double() @ basis).float(),
        value_up=(parts.value_up.double() @ basis).float(),
    )


def mha2mla_ranks(
    source: GroupedQueryAttention, cache_fraction: float, *, rope_share: float = 1 / 2
) -> tuple[int, int]:
    """(rope_pairs r, kv_lora_rank d_c) for a cache of ``cache_fraction`` of the source's, per token per layer.

    The budget B = round(fraction · 2 n_kv d_h) elements is spent ``rope_share`` on the shared RoPE key
    (r = round(rope_share · B / (2 n_kv)), at least 1 pair when it fits, at most d_h/2) and the rest on the
    latent, d_c = B − 2 r n_kv.  E.g. 8 heads of 32 at 50%: B = 256, r = 8 (d_R = 128), d_c = 128.

    Why half: the latent [K^N ; V] of a trained layer is far more compressible than its rotary pairs, whose
    rotation cannot be recovered once dropped.  On the tiny MHA teacher (lesson 07), DeepSeek-V2's own
    proportion (d_R = 64 of 576, about 1/8) leaves r = 2 pairs per head and multiplies validation perplexity
    by about 5 at 50% of the cache, whatever the strategy; half the budget keeps r = 8 and costs under 1%.
    Large heads with many slow pairs may want less: pass ``rope_share``.
    """
    check_source(source)
    require_number("cache_fraction", cache_fraction, lambda f: 0 < f <= 1, "lie in (0, 1]")
    require_number("rope_share", rope_share, lambda f: 0 <= f < 1, "lie in [0, 1)")
    n_kv, d_h = source.n_kv_heads, source.head_dim
    budget = round(cache_fraction * source.cache_elements_per_token())
    rope_pairs = min(round(rope_share * budget / (2 * n_kv)), d_h // 2)
    if rope_share > 0 and rope_pairs == 0 and 2 * n_kv < budget:
        rope_pairs = 1
    kv_lora_rank = budget - 2 * rope_pairs * n_kv
    if kv_lora_rank < 1:
        raise ValueError(
            f"cache_fraction {cache_fraction} leaves {budget} elements per token: too few for a latent next to "
            f"{rope_pairs} rotary pairs per KV head; raise cache_fraction or lower rope_share"
        )
    return rope_pairs, kv_lora_rank


@torch.no_grad()
def mha2mla_convert(
    source: GroupedQueryAttention,
    *,
    rope_pairs: int,
    strategy: str = "2-norm",
    kv_lora_rank: int | None = None,
    svd: str = "joint",
    calibration_inputs: torch.Tensor | None = None,
    allocation: str = "per_head",
    svd_basis: str = "weights",
) -> MultiHeadLatentAttention:
    """MHA2MLA without the fine-tuning: partial RoPE, then SVD low rank, as an MLA module (fp32, on the CPU).

    Args:
        source: the MHA / GQA layer (bias-free); it is not modified.
        rope_pairs: r, rotary pairs kept per KV head, in [0, d_h/2].
        strategy: which pairs — the paper's "2-norm", "high", "low", "uniform", or "rotation-2-norm"
            (see ``partial_rope``); the two scored ones need calibration_inputs.
        kv_lora_rank: d_c, in [1, n_kv (d_h − 2r) + n_kv d_h]; None keeps the full-rank latent (no SVD).
        svd: "joint" or "split".
        calibration_inputs: (b, s, d_model) hidden states entering this layer.
        allocation: "per_head" (the paper: r pairs in every KV head) or "global" (n_kv · r pairs wherever
            the scores are largest; scored strategies only; d_N is then d_h, zero-padded).
        svd_basis: "weights" (the paper's SVD of [W_K^N ; W_V]) or "activations" (principal components of
            [k^N ; v] on calibration_inputs).

    Shapes: the result maps x (b, s, d_model) -> (b, s, d_model) and caches d_c + 2 r n_kv elements per token.
    """
    check_source(source)
    check_rope_pairs(source, rope_pairs)
    require_choice("strategy", strategy, PARTIAL_ROPE_STRATEGIES)
    require_choice("svd", svd, SVD_METHODS)
    require_choice("svd_basis", svd_basis, SVD_BASES)
    if calibration_inputs is not None:
        check_calibration_inputs(calibration_inputs, source.d_model)
    elif svd_basis == "activations" and kv_lora_rank is not None:
        raise ValueError(f"svd_basis 'activations' needs calibration_inputs (b, s, d_model={source.d_model})")
    n_kv, d_h = source.n_kv_heads, source.head_dim
    full_rank = n_kv * (d_h - 2 * rope_pairs) + n_kv * d_h  # [K^N ; V] rows, whichever heads keep the pairs
    if kv_lora_rank is not None:
        require_positive_int("kv_lora_rank", kv_lora_rank)
        if kv_lora_rank > full_rank:
            raise ValueError(
                f"kv_lora_rank must lie in [1, {full_rank}] at rope_pairs={rope_pairs}: d_c + d_R = "
                f"{kv_lora_rank} + {2 * rope_pairs * n_kv} would exceed the source's cache of {2 * n_kv * d_h} "
                f"elements per token"
            )
    kept = select_rotary_pairs(
        source, rope_pairs, strategy, calibration_inputs=calibration_inputs, allocation=allocation
    )
    # Per head, d_N = d_h − 2r; with a global allocation a head may keep no pair at all, so d_N = d_h in every
    # layer (zero-padded where a head keeps more), and layers converted alike share one shape.
    parts = partial_rope_parts(source, kept, nope_dim=d_h if allocation == "global" else None)
    if kv_lora_rank is not None:
        covariance = None if svd_basis == "weights" else input_moment(calibration_inputs, source.d_model)
        key_rows = parts.latent_down.shape[0] - n_kv * d_h  # the nope-key rows come first
        parts = svd_low_rank_parts(parts, kv_lora_rank, method=svd, key_rows=key_rows, covariance=covariance)
    return assemble_mla(parts, source.d_model)

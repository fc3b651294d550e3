"""MHA2MLA, step 2 — low rank by SVD of the weights (Ji et al. 2025, §3.2).

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
``svd_basis="activations"`` in ``mla_ref.convert.methods.mha2mla.mha2mla_convert``), U is the principal components of the cached vectors W x
themselves (top eigenvectors of W C Wᵀ), minimising E‖(W − U Uᵀ W) x‖² rather than ‖W − U Uᵀ W‖_F; the
weight SVD is the case C = I.

Cache per token per layer: d_c + d_R = d_c + 2 · r · n_kv.  The whole method, partial RoPE then this step, is
``mla_ref.convert.methods.mha2mla``.
"""

from __future__ import annotations

import dataclasses

import torch

from mla_ref._checks import require_choice, require_positive_int
from mla_ref.convert.parts import MLAParts

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

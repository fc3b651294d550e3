"""``mha2mla``: MHA2MLA as published, without its fine-tuning (Ji et al. 2025).

    1. partial RoPE: in every KV head the r rotary pairs with the largest mean ‖q_pair‖·‖k_pair‖ on the
       calibration text stay roped (S_2-norm); the others join the position-free part  — ``convert.partial_rope``
    2. SVD_joint: one truncated SVD of the stacked [W_K^N; W_V] weights gives the d_c-wide latent
                                                                                       — ``convert.svd_low_rank``

Sizes for a budget of B elements: r = B / (4 n_kv) pairs per KV head (d_R = 2 r n_kv, half of B), d_c = B − d_R
(``mha2mla_ranks``).  ``mha2mla_convert`` is the whole conversion with the paper's choices and this project's
alternatives (the strategy, split or joint SVD, a global allocation of pairs, an activation basis) as options; the
registered method runs it with the paper's.
"""

from __future__ import annotations

import torch

from mla_ref._checks import require_choice, require_number, require_positive_int
from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert.activations import check_calibration_inputs, input_moment
from mla_ref.convert.methods.base import Method
from mla_ref.convert.partial_rope import (
    PARTIAL_ROPE_STRATEGIES,
    check_rope_pairs,
    partial_rope_parts,
    select_rotary_pairs,
)
from mla_ref.convert.parts import assemble_mla, check_source
from mla_ref.convert.svd_low_rank import SVD_BASES, SVD_METHODS, svd_low_rank_parts
from mla_ref.mla import MultiHeadLatentAttention


def mha2mla_ranks(
    source: GroupedQueryAttention, cache_fraction: float, *, rope_share: float = 1 / 2
) -> tuple[int, int]:
    """(rope_pairs r, kv_lora_rank d_c) for a cache of ``cache_fraction`` of the source's, per token per layer.

    The budget B = round(fraction · 2 n_kv d_h) elements is spent ``rope_share`` on the shared RoPE key
    (r = round(rope_share · B / (2 n_kv)), at least 1 pair when it fits, at most d_h/2) and the rest on the
    latent, d_c = B − 2 r n_kv.  E.g. 8 heads of 32 at 50%: B = 256, r = 8 (d_R = 128), d_c = 128.

    Why half: the latent [K^N ; V] of a trained layer is far more compressible than its rotary pairs, whose
    rotation cannot be recovered once dropped.  On the tiny MHA teacher (lesson 08), DeepSeek-V2's own
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
    return assemble_mla(parts, source.d_model, kv_lora_rank=kv_lora_rank, rope_dim=2 * rope_pairs * n_kv)


class MHA2MLA(Method):
    name = "mha2mla"
    title = "MHA2MLA as published: partial RoPE by S_2-norm, then SVD_joint, no fine-tuning"
    steps = (
        "partial RoPE: in every KV head the r rotary pairs with the largest mean ‖q_pair‖·‖k_pair‖ on the "
        "calibration text stay roped (S_2-norm); the others join the no-RoPE part",
        "SVD_joint: one truncated SVD of the stacked [W_K^N; W_V] weights gives the d_c-wide latent",
    )

    def split(self, source: GroupedQueryAttention, elements: int) -> tuple[int, int]:
        rope_pairs, kv_lora_rank = mha2mla_ranks(source, elements / source.cache_elements_per_token())
        return 2 * rope_pairs * source.n_kv_heads, kv_lora_rank

    def named_sizes(self, source: GroupedQueryAttention, kv_lora_rank: int, rope_dim: int) -> dict:
        """MHA2MLA counts rotary pairs per KV head: d_R = 2 · r · n_kv."""
        n_kv = source.n_kv_heads
        if rope_dim % (2 * n_kv):
            raise ValueError(
                f"rope_dim for mha2mla must be a multiple of 2·n_kv = {2 * n_kv} (r pairs per KV head), got {rope_dim}"
            )
        return {"rope_pairs": rope_dim // (2 * n_kv), "kv_lora_rank": kv_lora_rank}

    def convert(
        self, source: GroupedQueryAttention, calibration_inputs: torch.Tensor, sizes: dict
    ) -> MultiHeadLatentAttention:
        return mha2mla_convert(source, calibration_inputs=calibration_inputs, **sizes)

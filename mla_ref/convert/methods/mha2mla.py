"""``mha2mla``: MHA2MLA as published, without its fine-tuning (Ji et al. 2025).

    1. partial RoPE: in every KV head the r rotary pairs with the largest mean ‖q_pair‖·‖k_pair‖ on the
       calibration text stay roped (S_2-norm); the others join the position-free part  — ``convert.partial_rope``
    2. SVD_joint: one truncated SVD of the stacked [W_K^N; W_V] weights gives the d_c-wide latent
                                                                                       — ``convert.svd_low_rank``

Sizes for a budget of B elements: r = B / (4 n_kv) pairs per KV head (d_R = 2 r n_kv, half of B), d_c = B − d_R.
"""

from __future__ import annotations

import torch

from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert.methods.base import Method
from mla_ref.convert.svd_low_rank import mha2mla_convert, mha2mla_ranks
from mla_ref.mla import MultiHeadLatentAttention


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

"""``exact``: TransMLA's identity.  GQA's cache [K_1..K_nkv, V_1..V_nkv] *is* a latent of size 2·n_kv·d_h, and
W_UK, W_UV are 0/1 replication matrices: the same cache, the same outputs (``mla_ref.convert.exact``).

Sizes: the source's own cache, d_c = d_R = n_kv·d_h; no budget below 1.
"""

from __future__ import annotations

import torch

from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert.exact import gqa_to_mla_exact
from mla_ref.convert.methods.base import Method
from mla_ref.mla import MultiHeadLatentAttention


class Exact(Method):
    name = "exact"
    title = "GQA -> MLA at the same cache, outputs unchanged (TransMLA's identity)"
    steps = ("the GQA cache [K; V] becomes the latent; W_UK and W_UV are 0/1 replication matrices",)
    lossy = False

    def split(self, source: GroupedQueryAttention, elements: int) -> None:
        return None  # the source's own cache: nothing to split

    def sizes(self, source, *, budget=None, kv_lora_rank=None, rope_dim=None, reserve=0, **options) -> dict:
        if kv_lora_rank is not None or rope_dim is not None or budget not in (None, 1, 1.0):
            raise ValueError(
                "method 'exact' keeps the source's cache (d_c = d_R = n_kv·d_h); sizes and budgets below 1 "
                "need a lossy method (transmla, mha2mla or recipe)"
            )
        return {}

    def candidate_sizes(self, source, **sizes) -> list[dict]:
        return [self.sizes(source, **sizes)]

    def convert(
        self, source: GroupedQueryAttention, calibration_inputs: torch.Tensor | None, sizes: dict
    ) -> MultiHeadLatentAttention:
        return gqa_to_mla_exact(source)

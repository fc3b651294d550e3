"""mla_ref: a readable, tested reference implementation of Multi-head Latent Attention.

The pieces, in the order the lessons meet them:

- ``rope``: rotary position embedding, both layouts, partial RoPE.
- ``cache``: KV caches that store exactly what each attention variant keeps.
- ``attention``: the GQA family (MHA and MQA as its two ends).
- ``mla``: Multi-head Latent Attention, naive and absorbed paths.
- ``convert``: turning one attention variant into another.
- ``calculator``: KV-cache sizes for real model configs.
"""

from mla_ref.attention import (
    GroupedQueryAttention,
    MultiHeadAttention,
    MultiQueryAttention,
    grouped_attention,
)
from mla_ref.cache import KVCache, LatentCache
from mla_ref.mla import MLA, MultiHeadLatentAttention
from mla_ref.norm import RMSNorm
from mla_ref.rope import apply_rope, inverse_frequencies

__all__ = [
    "GroupedQueryAttention",
    "KVCache",
    "LatentCache",
    "MLA",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "MultiQueryAttention",
    "RMSNorm",
    "apply_rope",
    "grouped_attention",
    "inverse_frequencies",
]

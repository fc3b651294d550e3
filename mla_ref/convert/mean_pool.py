"""MHA → GQA by mean-pooling KV heads (Ainslie et al. 2023, "GQA", §2.1).

Each new KV head g is the average of the n_kv / n_kv' old heads in its group:

    W_K'^g = (1/r) Σ_{j in group g} W_K^j,   W_V'^g likewise,   r = n_kv / n_kv'

Query and output projections are copied.  The result is an approximation (the
paper uptrains afterwards); it is exact only when the pooled heads were equal.
"""

from __future__ import annotations

import copy

import torch
from einops import reduce

from mla_ref.attention import GroupedQueryAttention


def mean_pool_kv_heads(attention: GroupedQueryAttention, n_kv_heads: int) -> GroupedQueryAttention:
    """Return a new GQA module with ``n_kv_heads`` KV heads, pooled from ``attention``'s.

    ``n_kv_heads`` must divide the source's n_kv (e.g. MHA with 8 heads → 4, 2 or 1).
    The source module is not modified.
    """
    source_kv = attention.n_kv_heads
    if isinstance(n_kv_heads, bool) or not isinstance(n_kv_heads, int) or n_kv_heads <= 0:
        raise ValueError(f"n_kv_heads must be a positive integer, got {n_kv_heads!r}")
    if source_kv % n_kv_heads != 0:
        allowed = [k for k in range(1, source_kv + 1) if source_kv % k == 0]
        raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide the source's {source_kv} KV heads; allowed: {allowed}")
    pooled = attention.like(n_kv_heads=n_kv_heads).to(
        device=attention.q_proj.weight.device, dtype=attention.q_proj.weight.dtype
    )
    pooled.q_proj = copy.deepcopy(attention.q_proj)
    pooled.o_proj = copy.deepcopy(attention.o_proj)
    pattern_w = "(g r d) i -> (g d) i"
    pattern_b = "(g r d) -> (g d)"
    with torch.no_grad():
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(attention, name), getattr(pooled, name)
            dst.weight.copy_(reduce(src.weight, pattern_w, "mean", g=n_kv_heads, d=attention.head_dim))
            if src.bias is not None:
                dst.bias.copy_(reduce(src.bias, pattern_b, "mean", g=n_kv_heads, d=attention.head_dim))
    return pooled

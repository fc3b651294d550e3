"""One decode step of absorbed MLA in plain PyTorch: the reference the Triton kernel must match, and its fallback.

Per sequence b and head h (d_c = kv_lora_rank; q = [q_c ; q_R], cache row t = [c_t ; k^R_t]):

    score[b,h,t] = scale · (q_c · c_t + q_R · k^R_t)          for t < lengths[b]
    lse[b,h]     = log Σ_t exp(score[b,h,t])                   natural log, fp32
    out[b,h]     = Σ_t exp(score[b,h,t] − lse[b,h]) · c_t      the latent columns are the values

The scale is the caller's: MLA uses 1/√(d_N + d_R), not 1/√d_c.  The softmax runs in fp32 whatever the
input dtype; ``out`` comes back in q's dtype.  Rows at or past lengths[b] may hold anything (a preallocated
cache holds uninitialised memory, NaN included) and never reach the result.
"""

from __future__ import annotations

import torch
from einops import rearrange


def gather_pages(pages: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Lay a paged cache out contiguously: block j of sequence b is page block_table[b, j].

    Shapes: pages (num_pages, page_size, d_c + d_R); block_table (b, max_blocks); lengths (b,).
    Returns (b, max_blocks · page_size, d_c + d_R).  Entries past a sequence's last block are never
    read by the kernel and may hold anything; they are replaced by page 0 here.
    """
    page_size = pages.shape[1]
    in_use = torch.arange(block_table.shape[1], device=block_table.device)[None, :] * page_size < lengths[:, None]
    table = torch.where(in_use, block_table, torch.zeros_like(block_table))
    return rearrange(pages[table], "b n p w -> b (n p) w")


def mla_decode_reference(
    q: torch.Tensor,
    cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    kv_lora_rank: int,
    softmax_scale: float,
    block_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA decode attention over the latent cache, masked by ``lengths``.

    Shapes: q (b, h, d_c + d_R); cache (b, t, d_c + d_R), or pages (num_pages, page_size, d_c + d_R)
    with block_table (b, max_blocks); lengths (b,).  Returns out (b, h, d_c) in q's dtype and
    lse (b, h) in fp32.  Inputs are not checked here: ``mla_decode`` checks them.
    """
    if block_table is not None:
        cache = gather_pages(cache, block_table, lengths)  # (b, t, d_c + d_R)
    d_c, d_r = kv_lora_rank, q.shape[-1] - kv_lora_rank
    q_latent, q_rope = q.float().split([d_c, d_r], dim=-1)  # (b, h, d_c), (b, h, d_R)
    latent, rope_key = cache.float().split([d_c, d_r], dim=-1)  # (b, t, d_c), (b, t, d_R)
    in_use = torch.arange(cache.shape[1], device=cache.device)[None, :] < lengths[:, None]  # (b, t)

    # score[b,h,t] = scale · (q_c · c_t + q_R · k^R_t)
    scores = torch.einsum("bhc,btc->bht", q_latent, latent) + torch.einsum("bhr,btr->bht", q_rope, rope_key)
    scores = (scores * softmax_scale).masked_fill(~in_use[:, None, :], float("-inf"))
    # lse[b,h] = log Σ_t exp(score[b,h,t])
    lse = torch.logsumexp(scores, dim=-1)  # (b, h)
    # p[b,h,t] = exp(score[b,h,t] − lse[b,h])
    probs = torch.exp(scores - lse[..., None])  # (b, h, t)
    # out[b,h] = Σ_t p[b,h,t] · c_t   (unused rows zeroed first, so 0 · NaN cannot leak in)
    values = latent.masked_fill(~in_use[..., None], 0.0)  # (b, t, d_c)
    out = torch.einsum("bht,btc->bhc", probs, values)  # (b, h, d_c)
    return out.to(q.dtype), lse

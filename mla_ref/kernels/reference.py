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
from einops import einsum, rearrange


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

    Letters as in DeepSeek's code: b sequence, h head, t cached token, c latent column, r rope column;
    "cr" is a whole cache row [c ; k^R], d_c + d_R columns.  The rows are read as they are stored: one
    product for the scores (over cr), one for the values (over the first d_c columns of the same rows), no
    copy of the cache in fp32 (bf16 / fp16 rows are widened to fp32 first).  Reading ``lengths`` costs one
    small device-to-host copy on a GPU.
    """
    if block_table is not None:
        cache = gather_pages(cache, block_table, lengths)  # (b, t, d_c + d_R)
    d_c = kv_lora_rank
    # no sequence reads past the longest one, so the rows after it are left out (a view, no copy)
    longest = int(lengths.max())
    rows = cache[:, :longest].float()  # (b, t, d_c + d_R): [c_t ; k^R_t]

    # score[b,h,t] = scale · Σ_cr q[b,h,cr] · row[b,t,cr]  =  scale · (q_c · c_t + q_R · k^R_t)
    scores = einsum(q.float() * softmax_scale, rows, "b h cr, b t cr -> b h t")
    if int(lengths.min()) < longest:  # some sequence leaves rows unused: only then is there anything to mask
        unused = torch.arange(longest, device=cache.device)[None, :] >= lengths[:, None]  # (b, t)
        # score[b,h,t] = −∞ for t ≥ lengths[b]
        scores = scores.masked_fill(unused[:, None, :], float("-inf"))
        # an unused row may hold NaN (uninitialised memory), and 0 · NaN = NaN: zero it before p · c
        rows = rows.masked_fill(unused[..., None], 0.0)
    # lse[b,h] = log Σ_t exp(score[b,h,t])
    lse = torch.logsumexp(scores, dim=-1)  # (b, h)
    # p[b,h,t] = exp(score[b,h,t] − lse[b,h])
    probs = torch.exp(scores - lse[..., None])  # (b, h, t)
    # out[b,h,c] = Σ_t p[b,h,t] · row[b,t,c]   the values are the first d_c columns of the same rows
    out = einsum(probs, rows[..., :d_c], "b h t, b t c -> b h c")  # (b, h, d_c)
    return out.to(q.dtype), lse

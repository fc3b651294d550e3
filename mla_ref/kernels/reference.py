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


# Rows per block of the cache on a CPU: 1024 rows of d_c + d_R = 576 fp32 columns are 2.4 MB, which stay in the
# CPU's caches between the two products of a block, so the values product reads them from cache rather than from
# memory; much smaller blocks spend more on Python and the merge than they save.  Other devices take every row in
# one block: a GPU gains nothing from the loop and would pay a kernel launch per operation per block.
CPU_BLOCK_ROWS = 1024


def mla_decode_reference(
    q: torch.Tensor,
    cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    kv_lora_rank: int,
    softmax_scale: float,
    block_table: torch.Tensor | None = None,
    block_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA decode attention over the latent cache, masked by ``lengths``.

    Shapes: q (b, h, d_c + d_R); cache (b, t, d_c + d_R), or pages (num_pages, page_size, d_c + d_R)
    with block_table (b, max_blocks); lengths (b,).  Returns out (b, h, d_c) in q's dtype and
    lse (b, h) in fp32.  Inputs are not checked here: ``mla_decode`` checks them.

    Letters as in DeepSeek's code: b sequence, h head, t cached token, c latent column, r rope column;
    "cr" is a whole cache row [c ; k^R], d_c + d_R columns.  The rows are read as they are stored, one block of
    ``block_rows`` rows at a time (default: ``CPU_BLOCK_ROWS`` on a CPU, every row at once elsewhere), the way
    flash-decoding splits them (the Triton kernel's steps (A)–(D)).  Per block: one product for the scores (over
    cr), the softmax's terms relative to the block's largest score, and one product for the values (over the
    first d_c columns of the same rows, still in the CPU's caches); then the blocks' sums are merged.  A mask
    only where a sequence leaves rows of a block unused; no copy of the cache in fp32 (bf16 / fp16 rows are
    widened to fp32 a block at a time).
    Reading ``lengths`` costs one small device-to-host copy on a GPU.
    """
    if block_table is not None:
        cache = gather_pages(cache, block_table, lengths)  # (b, t, d_c + d_R)
    d_c = kv_lora_rank
    # no sequence reads past the longest one, so the rows after it are never read
    shortest, longest = int(lengths.min()), int(lengths.max())
    if block_rows is None:
        block_rows = CPU_BLOCK_ROWS if cache.device.type == "cpu" else longest
    scaled_q = q.float() * softmax_scale  # (b, h, d_c + d_R)

    block_maxes, block_sums, block_accs = [], [], []
    for start in range(0, longest, block_rows):
        stop = min(start + block_rows, longest)
        rows = cache[:, start:stop].float()  # (b, n, d_c + d_R): [c_t ; k^R_t] for t = start … stop − 1
        # score[b,h,t] = scale · Σ_cr q[b,h,cr] · row[b,t,cr]  =  scale · (q_c · c_t + q_R · k^R_t)
        scores = scaled_q @ rows.mT  # (b, h, n)
        if stop > shortest:  # some sequence leaves rows of this block unused: only then is there anything to mask
            unused = torch.arange(start, stop, device=cache.device)[None, :] >= lengths[:, None]  # (b, n)
            # score[b,h,t] = −∞ for t ≥ lengths[b]
            scores = scores.masked_fill(unused[:, None, :], float("-inf"))
            # an unused row may hold NaN (uninitialised memory), and 0 · NaN = NaN: zero it before p · c
            rows = rows.masked_fill(unused[..., None], 0.0)
        # m_j[b,h] = max_{t in block j} score[b,h,t]   (−∞ where sequence b uses no row of block j)
        m_j = scores.amax(dim=-1, keepdim=True)  # (b, h, 1)
        # p[b,h,t] = exp(score[b,h,t] − m_j[b,h]) ≤ 1   (where m_j = −∞, subtract 0: p = exp(−∞) = 0, not NaN)
        probs = torch.exp(scores - m_j.nan_to_num(neginf=0.0))  # (b, h, n)
        # ℓ_j[b,h] = Σ_{t in block j} p[b,h,t]
        block_sums.append(probs.sum(dim=-1))  # (b, h)
        # acc_j[b,h,c] = Σ_{t in block j} p[b,h,t] · row[b,t,c]   the values are the first d_c columns of the rows
        block_accs.append(probs @ rows[..., :d_c])  # (b, h, d_c)
        block_maxes.append(m_j[..., 0])  # (b, h)

    m_j, l_j, acc_j = torch.stack(block_maxes), torch.stack(block_sums), torch.stack(block_accs)  # (blocks, b, h, …)
    # lse[b,h] = log Σ_j exp(m_j + log ℓ_j)  =  log Σ_t exp(score[b,h,t]) over every row in use
    lse = torch.logsumexp(m_j + torch.log(l_j), dim=0)  # (b, h)
    # out[b,h,c] = Σ_j exp(m_j[b,h] − lse[b,h]) · acc_j[b,h,c]  =  Σ_t exp(score[b,h,t] − lse[b,h]) · row[b,t,c]
    out = (torch.exp(m_j - lse)[..., None] * acc_j).sum(dim=0)  # (b, h, d_c)
    return out.to(q.dtype), lse

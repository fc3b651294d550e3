"""Flash-decoding for absorbed MLA in Triton: one decode step over the latent cache.

What it computes, for every sequence b and head h (d_c = kv_lora_rank, d_R = rope key size;
q = [q_c ; q_R], cache row t = [c_t ; k^R_t]):

    score[b,h,t] = scale · (q_c · c_t + q_R · k^R_t)          for t < lengths[b]
    lse[b,h]     = log Σ_t exp(score[b,h,t])
    out[b,h]     = Σ_t exp(score[b,h,t] − lse[b,h]) · c_t

This is MQA with one key head of size d_c + d_R and one value head of size d_c, where the value is
the first d_c columns of the key: a cache tile read once serves both products.

The algorithm, step by step (the code below is tagged with these letters)
-------------------------------------------------------------------------
(A) Split.  The lengths[b] tokens of sequence b are cut into NUM_SPLITS ranges, each a whole number
    of BLOCK_N-token tiles.  Program (b, head block, split) walks one range for BLOCK_H heads at
    once, so every cache tile it loads is used by all of those heads.  Decode reads the whole cache
    to produce one token, so reading it as few times as possible is the point; the splits are there
    so that a small batch still gives every SM work (flash-decoding).
(B) Online softmax.  Walking its range tile by tile, a program keeps, per head, a running max m,
    a running sum ℓ = Σ exp(score − m) and an unnormalised output acc = Σ exp(score − m) · c.
    For each tile with scores s_n:
        m_new = max(m, max_n s_n)
        α     = exp(m − m_new)                  rescales everything summed under the old max
        p_n   = exp(s_n − m_new)
        ℓ     = α · ℓ + Σ_n p_n
        acc   = α · acc + Σ_n p_n · c_n
        m     = m_new
    Subtracting the running max keeps every exp ≤ 1, so nothing overflows in fp32.
(C) Partial result.  The program writes o_s = acc / ℓ and lse_s = m + log ℓ.  A range that holds no
    token (a short sequence in a long batch) writes o_s = 0 and lse_s = −∞.
(D) Merge.  A second, small kernel (one program per (b, h)) combines the splits.  Since
    exp(lse_s) = Σ_{t in split s} exp(score_t):
        M   = max_s lse_s
        w_s = exp(lse_s − M)
        lse = M + log Σ_s w_s
        out = Σ_s w_s · o_s / Σ_s w_s
    which is the softmax over all the tokens; an empty split has w_s = 0.

Paged cache
-----------
Serving engines keep the cache in fixed-size pages, (num_pages, page_size, d_c + d_R), and a block
table (batch, max_blocks) naming the page that holds tokens [j·page_size, (j+1)·page_size) of
sequence b.  The only difference is where a tile's rows live (step (B0) below): row t is
row t % page_size of page block_table[b, t // page_size] instead of row t of sequence b.

Numerics
--------
Scores, the softmax and the accumulator are fp32 for every input dtype; p is rounded to the cache's
dtype before the p·c product (as flash attention does, so that product runs on tensor cores), and
fp32 products use IEEE precision (not TF32).  ``out`` is written in the input dtype, ``lse`` in fp32.

Triton only has power-of-two tile sizes, so d_c and d_R are padded up to BLOCK_C and BLOCK_R with
masked loads (zeros), which is how any d_c (not only 512) and d_R = 0 work.  ``tl.dot`` needs every
side ≥ 16, hence BLOCK_H ≥ 16 even for a single head (the unused head rows are masked out).

Under TRITON_INTERPRET=1 (set before this module is imported) the same kernels run on CPU tensors,
one program at a time, which is how the tests check them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

MAX_SPLITS = 64


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation.

    UPCAST widens both operands to fp32 first.  Only Triton's CPU interpreter needs it: it multiplies
    bf16 tiles as raw 16-bit integers.  A bf16 or fp16 product is exact in fp32, so widening changes
    nothing but the order of the fp32 additions.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _mla_decode_split_kernel(
    q_ptr,  # (batch, heads, d_c + d_R)
    cache_ptr,  # (batch, tokens, d_c + d_R), or (num_pages, PAGE_SIZE, d_c + d_R) when PAGED
    block_table_ptr,  # (batch, max_blocks) page indices; read only when PAGED
    lengths_ptr,  # (batch,)
    part_out_ptr,  # (batch, heads, NUM_SPLITS, d_c) fp32: o_s
    part_lse_ptr,  # (batch, heads, NUM_SPLITS) fp32: lse_s
    softmax_scale,
    n_heads,
    stride_q_b,
    stride_q_h,
    stride_cache_0,  # between sequences, or between pages when PAGED
    stride_cache_1,  # between rows
    stride_table_b,
    stride_po_b,
    stride_po_h,
    stride_po_s,
    stride_pl_b,
    stride_pl_h,
    D_C: tl.constexpr,
    D_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    UPCAST_DOTS: tl.constexpr,
):
    seq = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)

    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
    head_ok = heads < n_heads
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < D_C
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < D_R

    # The queries of this head block, loaded once: q_c (BLOCK_H, BLOCK_C) and q_R (BLOCK_H, BLOCK_R).
    q_rows = q_ptr + seq * stride_q_b + heads[:, None] * stride_q_h
    q_latent = tl.load(q_rows + offs_c[None, :], mask=head_ok[:, None] & c_ok[None, :], other=0.0)
    q_rope = tl.load(q_rows + D_C + offs_r[None, :], mask=head_ok[:, None] & r_ok[None, :], other=0.0)

    # (A) This program's token range [start, end): split `split` of NUM_SPLITS, whole tiles each.
    length = tl.load(lengths_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, length)

    # (B) Running max m, running sum ℓ and unnormalised output acc, per head, in fp32.
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_H], tl.float32)  # ℓ
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)

    for tile_start in range(start, end, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        token_ok = tokens < end

        # (B0) Where the tile's rows live: row t of sequence seq, or row t % PAGE_SIZE of page
        # block_table[seq, t // PAGE_SIZE].  64-bit offsets: a large cache has more than 2^31 elements.
        if PAGED:
            page = tl.load(block_table_ptr + seq * stride_table_b + tokens // PAGE_SIZE, mask=token_ok, other=0)
            rows = cache_ptr + page.to(tl.int64) * stride_cache_0 + (tokens % PAGE_SIZE) * stride_cache_1
        else:
            rows = cache_ptr + seq.to(tl.int64) * stride_cache_0 + tokens.to(tl.int64) * stride_cache_1

        # One read of the tile: the latent c (BLOCK_N, BLOCK_C), key and value at once, and k^R (BLOCK_N, BLOCK_R).
        latent = tl.load(rows[:, None] + offs_c[None, :], mask=token_ok[:, None] & c_ok[None, :], other=0.0)
        rope_key = tl.load(rows[:, None] + D_C + offs_r[None, :], mask=token_ok[:, None] & r_ok[None, :], other=0.0)

        # score[h, n] = scale · (q_c[h] · c_n + q_R[h] · k^R_n); tokens outside the range get −∞.
        scores = _dot(q_latent, tl.trans(latent), UPCAST_DOTS) + _dot(q_rope, tl.trans(rope_key), UPCAST_DOTS)
        scores = tl.where(token_ok[None, :], scores * softmax_scale, float("-inf"))  # (BLOCK_H, BLOCK_N)

        # (B) m_new = max(m, max_n s_n);  α = exp(m − m_new);  p_n = exp(s_n − m_new)
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        # (B) ℓ = α·ℓ + Σ_n p_n;  acc = α·acc + Σ_n p_n · c_n
        row_sum = alpha * row_sum + tl.sum(p, axis=1)
        acc = alpha[:, None] * acc + _dot(p.to(latent.dtype), latent, UPCAST_DOTS)
        m = m_new

    # (C) o_s = acc / ℓ and lse_s = m + log ℓ; an empty range (ℓ = 0) writes o_s = 0, lse_s = −∞.
    nonempty = row_sum > 0
    safe_sum = tl.where(nonempty, row_sum, 1.0)
    part_out = acc / safe_sum[:, None]
    part_lse = tl.where(nonempty, m + tl.log(safe_sum), float("-inf"))

    out_rows = part_out_ptr + seq * stride_po_b + heads[:, None] * stride_po_h + split * stride_po_s
    tl.store(out_rows + offs_c[None, :], part_out, mask=head_ok[:, None] & c_ok[None, :])
    tl.store(part_lse_ptr + seq * stride_pl_b + heads * stride_pl_h + split, part_lse, mask=head_ok)


@triton.jit
def _mla_decode_merge_kernel(
    part_out_ptr,  # (batch, heads, NUM_SPLITS, d_c) fp32
    part_lse_ptr,  # (batch, heads, NUM_SPLITS) fp32
    out_ptr,  # (batch, heads, d_c), the input dtype
    lse_ptr,  # (batch, heads) fp32
    stride_po_b,
    stride_po_h,
    stride_po_s,
    stride_pl_b,
    stride_pl_h,
    stride_o_b,
    stride_o_h,
    stride_lse_b,
    D_C: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < D_C
    splits = tl.arange(0, BLOCK_S)

    lse_row = part_lse_ptr + seq * stride_pl_b + head * stride_pl_h
    out_row = part_out_ptr + seq * stride_po_b + head * stride_po_h
    part_lse = tl.load(lse_row + splits, mask=splits < NUM_SPLITS, other=float("-inf"))  # (BLOCK_S,)

    # (D) M = max_s lse_s;  Σ_s w_s with w_s = exp(lse_s − M)   (split 0 is never empty, so M is finite)
    top = tl.max(part_lse, axis=0)
    weight_sum = tl.sum(tl.exp(part_lse - top), axis=0)

    # (D) out = Σ_s w_s · o_s / Σ_s w_s   (one split at a time: a (NUM_SPLITS, d_c) tile would not fit in registers)
    acc = tl.zeros([BLOCK_C], tl.float32)
    for s in range(NUM_SPLITS):
        weight = tl.exp(tl.load(lse_row + s) - top)
        acc += weight * tl.load(out_row + s * stride_po_s + offs_c, mask=c_ok, other=0.0)
    out = acc / weight_sum

    # (D) lse = M + log Σ_s w_s
    tl.store(out_ptr + seq * stride_o_b + head * stride_o_h + offs_c, out.to(out_ptr.dtype.element_ty), mask=c_ok)
    tl.store(lse_ptr + seq * stride_lse_b + head, top + tl.log(weight_sum))


# The kernels are interpreted when TRITON_INTERPRET=1 was set before this module was imported.
INTERPRETED: bool = isinstance(_mla_decode_split_kernel, InterpretedFunction)


def default_num_splits(batch: int, head_blocks: int, max_tokens: int, block_n: int, device: torch.device) -> int:
    """How many ranges (A) to cut each sequence into.

    Enough (b, head block, split) programs to give every SM about two, while keeping each split at
    least four tiles long (shorter ones spend more on the merge than they save).  The interpreter runs
    programs one at a time, so there it counts as a single SM.
    """
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    wanted = triton.cdiv(2 * sms, batch * head_blocks)
    worth_it = triton.cdiv(max_tokens, 4 * block_n)
    return max(1, min(wanted, worth_it, MAX_SPLITS))


def _require_power_of_two(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two ≥ {minimum}; got {value!r}")


def _buffers(q: torch.Tensor, num_splits: int, d_c: int) -> tuple[torch.Tensor, ...]:
    """The splits' partial outputs and log-sum-exps (fp32), then the merged out (q's dtype) and lse (fp32)."""
    batch, n_heads = q.shape[:2]
    part_out = torch.empty(batch, n_heads, num_splits, d_c, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, n_heads, num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, n_heads, d_c, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, n_heads, dtype=torch.float32, device=q.device)
    return part_out, part_lse, out, lse


def _merge_splits(part_out, part_lse, out, lse, *, d_c: int, block_c: int, num_splits: int) -> None:
    """Launch the merge kernel (D): each (sequence, head) combines its splits' partial sums into ``out`` and ``lse``."""
    batch, n_heads = out.shape[:2]
    _mla_decode_merge_kernel[(batch, n_heads)](
        part_out,
        part_lse,
        out,
        lse,
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        D_C=d_c,
        BLOCK_C=block_c,
        NUM_SPLITS=num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits),
        num_warps=4,
    )


def mla_decode_triton(
    q: torch.Tensor,
    cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    kv_lora_rank: int,
    softmax_scale: float,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    block_h: int = 16,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the split kernel (A–C) and the merge kernel (D).

    Shapes: q (b, h, d_c + d_R); cache (b, t, d_c + d_R), or pages (num_pages, page_size, d_c + d_R)
    with block_table (b, max_blocks); lengths (b,).  Returns out (b, h, d_c) in q's dtype and lse
    (b, h) fp32.  The tensors are not checked here (``mla_decode`` checks them); the tile sizes are.
    ``num_splits`` defaults to ``default_num_splits``; block_n, block_h, num_warps and num_stages are
    the GPU tuning knobs.  block_n defaults to 32 tokens for bf16/fp16 and 16 for fp32 (whose tiles are
    twice the bytes): for d_c + d_R = 512 + 64 on sm_90 both fit in registers without spilling.
    """
    if block_n is None:
        block_n = 32 if q.element_size() == 2 else 16
    _require_power_of_two("block_n", block_n, 16)
    _require_power_of_two("block_h", block_h, 16)
    batch, n_heads, width = q.shape
    d_c, d_r = kv_lora_rank, width - kv_lora_rank
    paged = block_table is not None
    max_tokens = block_table.shape[1] * cache.shape[1] if paged else cache.shape[1]
    head_blocks = triton.cdiv(n_heads, block_h)
    if num_splits is None:
        num_splits = default_num_splits(batch, head_blocks, max_tokens, block_n, q.device)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be an integer in [1, {MAX_SPLITS}]; got {num_splits!r}")

    # The kernels step along the last axis one element at a time.
    q = q if q.stride(-1) == 1 else q.contiguous()
    cache = cache if cache.stride(-1) == 1 else cache.contiguous()
    table = block_table if paged else lengths  # a placeholder pointer when not paged: never read

    part_out, part_lse, out, lse = _buffers(q, num_splits, d_c)
    block_c = max(16, triton.next_power_of_2(d_c))
    block_r = max(16, triton.next_power_of_2(d_r))

    _mla_decode_split_kernel[(batch, head_blocks, num_splits)](
        q,
        cache,
        table,
        lengths,
        part_out,
        part_lse,
        float(softmax_scale),
        n_heads,
        q.stride(0),
        q.stride(1),
        cache.stride(0),
        cache.stride(1),
        table.stride(0),
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        D_C=d_c,
        D_R=d_r,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_C=block_c,
        BLOCK_R=block_r,
        NUM_SPLITS=num_splits,
        PAGED=paged,
        PAGE_SIZE=cache.shape[1] if paged else 1,
        UPCAST_DOTS=INTERPRETED,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _merge_splits(part_out, part_lse, out, lse, d_c=d_c, block_c=block_c, num_splits=num_splits)
    return out, lse

"""The grouped-query attention family: MHA and MQA are GQA with n_kv = n_h and n_kv = 1.

For query head i (of n_h) reading KV head κ = ⌊i / g⌋ (of n_kv; group size g = n_h / n_kv):

    q_i = x W_Q^i,  k_κ = x W_K^κ,  v_κ = x W_V^κ                (RoPE on q_i and k_κ)
    o   = Σ_i softmax(q_i K_κᵀ / √d_h) V_κ W_O^i

The cache stores k_κ and v_κ for the n_kv heads: 2 · n_kv · d_h elements per token
per layer.  Query heads are grouped in the einsum, so the repeated K/V copies that
``repeat_kv`` would make are never built.

Weight names follow Hugging Face Llama (q_proj, k_proj, v_proj, o_proj).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from mla_ref._checks import require_choice, require_positive_int
from mla_ref.cache import KVCache
from mla_ref.rope import ROPE_LAYOUTS, RopeLayout, apply_rope, frequency_table, rope_inv_freq

SCORES_PER_BLOCK = 2**21  # attention scores computed at once on the CPU (8 MiB in fp32): a few sequences' worth


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_offset: int = 0,
    causal: bool = True,
) -> torch.Tensor:
    """Softmax attention where query heads share KV heads in groups.

    Shapes: q (b, h, s, d_qk); k (b, n_kv, t, d_qk); v (b, n_kv, t, d_v) with h divisible
    by n_kv: query head i reads KV head ⌊i/g⌋, g = h / n_kv the group size.  Returns (b, h, s, d_v) in q's dtype.

    Query j sits at absolute position ``q_offset + j`` and key n at position n, so
    with ``causal`` the mask keeps n ≤ q_offset + j — the same result whether a
    prompt arrives in one piece or in chunks.  The softmax runs in fp32 whatever
    the input dtype.  MLA's absorbed path calls this with n_kv = 1 (MQA over the latent).
    """
    b, h, s, _ = q.shape
    n_kv, t = k.shape[1], k.shape[2]
    if h % n_kv != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({n_kv})")
    sequences = max(1, SCORES_PER_BLOCK // (h * s * t))
    if q.device.type == "cpu" and b > sequences:
        # Many sequences at once (a conversion's calibration windows: 64 × 9 heads × 256² scores, 150 MB) run a few
        # at a time: their scores then stay in the CPU's cache instead of being written out and read back three
        # times (mask, softmax, values), about twice as fast.  Each sequence's products are the same matrix
        # products either way, so the result is the same to the bit.
        blocks = [slice(i, i + sequences) for i in range(0, b, sequences)]
        return torch.cat(
            [grouped_attention(q[r], k[r], v[r], scale=scale, q_offset=q_offset, causal=causal) for r in blocks]
        )
    half = s // 2
    if causal and q.device.type == "cpu" and half >= 128 and q_offset + half < t:
        # The first half of the queries reads no key past position q_offset + half − 1: the causal mask would zero
        # their scores against every later key, a quarter of all the scores of a prompt.  Each half is attention
        # over the keys it may read: the same arithmetic up to the order of the softmax's sums (bit for bit on
        # this project's CPUs at a conversion's windows of 256, within fp32 rounding elsewhere).
        seen = q_offset + half  # keys the first half may read
        first = _attend(q[:, :, :half], k[:, :, :seen], v[:, :, :seen], scale=scale, q_offset=q_offset)
        second = _attend(q[:, :, half:], k, v, scale=scale, q_offset=q_offset + half)
        return torch.cat([first, second], dim=2)  # (b, h, s, d_v)
    return _attend(q, k, v, scale=scale, q_offset=q_offset, causal=causal)


def _attend(q, k, v, *, scale: float, q_offset: int = 0, causal: bool = True) -> torch.Tensor:
    """``grouped_attention``'s arithmetic on one block of sequences: scores, mask, softmax, values."""
    n_kv, s, t = k.shape[1], q.shape[2], k.shape[2]
    # letters: k the KV head, g the query head's place within its group of g = h / n_kv
    q_grouped = rearrange(q, "b (k g) s d -> b k g s d", k=n_kv)  # (b, n_kv, g, s, d_qk)
    # score[b,k,g,s,t] = q · k / √d   (computed in fp32; the scores are a new tensor, so scaled and masked in place)
    scores = torch.einsum("bkgsd,bktd->bkgst", q_grouped.float(), k.float()).mul_(scale)
    if causal:
        query_pos = torch.arange(s, device=q.device)[:, None] + q_offset  # (s, 1)
        key_pos = torch.arange(t, device=q.device)[None, :]  # (1, t)
        scores.masked_fill_(key_pos > query_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (b, n_kv, g, s, t) fp32
    out = torch.einsum("bkgst,bktd->bkgsd", probs, v.float())  # (b, n_kv, g, s, d_v)
    return rearrange(out, "b k g s d -> b (k g) s d").to(q.dtype)


class GroupedQueryAttention(nn.Module):
    """GQA with RoPE and a KV cache holding the n_kv heads only.

    Args:
        d_model: width of the hidden state x.
        n_heads: query heads n_h.
        n_kv_heads: key/value heads n_kv; must divide n_heads.
        head_dim: d_h (default d_model // n_heads; set it explicitly when it differs).
        rope_theta: RoPE base θ.
        rope_layout: "rotate_half" (Llama) or "interleaved" (DeepSeek).
        rope_frequencies: optional table of the head_dim/2 rotary frequencies, replacing θ^(-2j/d_h)
            (scaled RoPE such as Llama 3's); kept as plain floats in the config, never cast to bf16.
        qkv_bias: biases on q/k/v projections (Qwen2 has them).
        o_bias: bias on the output projection.

    Shapes: forward x (b, s, d_model) -> (b, s, d_model).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int | None = None,
        *,
        rope_theta: float = 10000.0,
        rope_layout: RopeLayout = "rotate_half",
        rope_frequencies: Sequence[float] | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
    ):
        super().__init__()
        self.d_model = require_positive_int("d_model", d_model)
        self.n_heads = require_positive_int("n_heads", n_heads)
        self.n_kv_heads = require_positive_int("n_kv_heads", n_kv_heads)
        if n_heads % n_kv_heads != 0:
            raise ValueError(
                f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads}); "
                f"allowed n_kv_heads: {[k for k in range(1, n_heads + 1) if n_heads % k == 0]}"
            )
        if head_dim is None:
            if d_model % n_heads != 0:
                raise ValueError(f"d_model ({d_model}) is not divisible by n_heads ({n_heads}); pass head_dim")
            head_dim = d_model // n_heads
        self.head_dim = require_positive_int("head_dim", head_dim)
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs of dimensions), got {head_dim}")
        self.rope_theta = rope_theta
        self.rope_layout = require_choice("rope_layout", rope_layout, ROPE_LAYOUTS)
        self.rope_frequencies = frequency_table(rope_frequencies, head_dim)
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=o_bias)

    @property
    def group_size(self) -> int:
        """g = n_h / n_kv query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def like(self, **changes) -> GroupedQueryAttention:
        """A new module (fresh weights) with this one's sizes and settings, except ``changes`` (constructor keywords)."""
        settings = dict(
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            rope_theta=self.rope_theta,
            rope_layout=self.rope_layout,
            rope_frequencies=self.rope_frequencies,
            qkv_bias=self.k_proj.bias is not None,
            o_bias=self.o_proj.bias is not None,
        )
        return GroupedQueryAttention(**(settings | changes))

    def cache_elements_per_token(self) -> int:
        """2 · n_kv · d_h: what one token costs in this layer's cache."""
        return 2 * self.n_kv_heads * self.head_dim

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """An empty cache for this layer (``capacity`` tokens preallocated if given)."""
        return KVCache(capacity=capacity)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Causal attention over the cached tokens and the s new ones.

        Shapes: x (b, s, d_model) -> (b, s, d_model).  With a cache, the new keys and
        values are appended and the queries sit at positions t_cached … t_cached + s - 1.
        """
        offset = 0 if cache is None else cache.length
        positions = torch.arange(offset, offset + x.shape[1], device=x.device)
        rope = dict(theta=self.rope_theta, layout=self.rope_layout, inv_freq=rope_inv_freq(self.rope_frequencies))
        q = rearrange(self.q_proj(x), "b s (h d) -> b h s d", h=self.n_heads)  # (b, n_h, s, d_h)
        k = rearrange(self.k_proj(x), "b s (k d) -> b k s d", k=self.n_kv_heads)  # (b, n_kv, s, d_h)
        v = rearrange(self.v_proj(x), "b s (k d) -> b k s d", k=self.n_kv_heads)  # (b, n_kv, s, d_h)
        q, k = apply_rope(q, positions, **rope), apply_rope(k, positions, **rope)
        if cache is not None:
            k, v = cache.append(k, v)  # (b, n_kv, t, d_h) each
        out = grouped_attention(q, k, v, scale=1.0 / math.sqrt(self.head_dim), q_offset=offset)
        return self.o_proj(rearrange(out, "b h s d -> b s (h d)"))


class MultiHeadAttention(GroupedQueryAttention):
    """MHA: GQA with one KV head per query head (n_kv = n_h)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, **kwargs):
        super().__init__(d_model, n_heads, n_kv_heads=n_heads, head_dim=head_dim, **kwargs)


class MultiQueryAttention(GroupedQueryAttention):
    """MQA: GQA with a single KV head shared by all query heads (n_kv = 1)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, **kwargs):
        super().__init__(d_model, n_heads, n_kv_heads=1, head_dim=head_dim, **kwargs)

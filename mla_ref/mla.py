"""Multi-head Latent Attention (DeepSeek-V2 §2.1), with naive and absorbed paths.

Per token x (DeepSeek-V2 eqs. 9–19; d_N = qk_nope_head_dim, d_R =
qk_rope_head_dim, d_c = kv_lora_rank):

    c         = RMSNorm(x W_DKV)                     latent, d_c       (cached)
    k^R       = RoPE(x W_KR)                         shared key, d_R   (cached)
    k_i^N     = c W_UK^i,   v_i = c W_UV^i           per head, d_N and d_v
    q_i       = [q_i^N ; RoPE(q_i^R)]                from x W_Q, or x W_DQ → RMSNorm → W_UQ
    score_i   = q_i · [k_i^N ; k^R] / √(d_N + d_R)
    o         = Σ_i softmax(score_i) V_i W_O^i

The cache holds c and k^R only: d_c + d_R elements per token per layer.

Two paths, chosen per call (``path=``):

- ``"naive"`` up-projects every cached latent into per-head keys and values, then
  runs ordinary multi-head attention.
- ``"absorbed"`` uses  q_i^N · (c W_UK^i) = (q_i^N W_UK^iᵀ) · c  and
  Σ_t p_t (c_t W_UV^i) = (Σ_t p_t c_t) W_UV^i:  the query moves into latent space,
  attention runs over the cache as MQA with one K head of size d_c + d_R and one V
  head of size d_c (the first d_c columns of the same rows), and W_UV^i is applied
  after.  No per-head key or value is ever built for the cached tokens.  The scale
  stays 1/√(d_N + d_R): absorption changes where the product is taken, not its value.

Parameter names and shapes are DeepSeek-V3's (Hugging Face ``DeepseekV3Attention``),
so exporting is a renaming:

    q_proj              (n_h·(d_N+d_R), d_model)     when q_lora_rank is None
    q_a_proj            (q_lora_rank, d_model)       W_DQ, else
    q_a_layernorm       (q_lora_rank,)
    q_b_proj            (n_h·(d_N+d_R), q_lora_rank) W_UQ and W_QR, per head [nope ; rope]
    kv_a_proj_with_mqa  (d_c + d_R, d_model)         W_DKV and W_KR stacked
    kv_a_layernorm      (d_c,)                       when latent_norm
    kv_b_proj           (n_h·(d_N+d_v), d_c)         W_UK and W_UV, per head [nope ; v]
    o_proj              (d_model, n_h·d_v)           W_O
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from einops import rearrange
from torch import nn

from mla_ref._checks import (
    require_choice,
    require_even,
    require_non_negative_int,
    require_positive_int,
)
from mla_ref.attention import grouped_attention
from mla_ref.cache import LatentCache
from mla_ref.kernels.dispatch import BACKENDS, Backend, mla_decode
from mla_ref.norm import RMSNorm
from mla_ref.rope import ROPE_LAYOUTS, RopeLayout, apply_rope, frequency_table, rope_inv_freq

AttentionPath = Literal["naive", "absorbed"]
ATTENTION_PATHS: tuple[str, ...] = ("naive", "absorbed")


class MultiHeadLatentAttention(nn.Module):
    """MLA with a latent cache and a choice of naive or absorbed execution per call.

    Args:
        d_model: width of the hidden state x.
        n_heads: query heads n_h.
        kv_lora_rank: d_c, the latent's size.
        qk_nope_head_dim: d_N, per-head position-free query/key size (≥ 0).
        qk_rope_head_dim: d_R, size of the shared roped key (even, ≥ 0).
        v_head_dim: d_v, per-head value size.
        q_lora_rank: if set, queries go through a low-rank bottleneck with RMSNorm.
        latent_norm: RMS-normalise the latent c (DeepSeek does; exact conversions don't).
        bias: biases on q_proj / q_a_proj, kv_a_proj_with_mqa and o_proj.
        rope_theta, rope_layout: RoPE base and layout (DeepSeek uses "interleaved").
        rope_frequencies: optional table of the d_R/2 rotary frequencies of the shared key, replacing
            θ^(-2j/d_R) — a converted model's key keeps the frequencies its source heads had.
        norm_eps: epsilon of the RMSNorms.

    Shapes: forward x (b, s, d_model) -> (b, s, d_model).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        *,
        q_lora_rank: int | None = None,
        latent_norm: bool = True,
        bias: bool = False,
        rope_theta: float = 10000.0,
        rope_layout: RopeLayout = "interleaved",
        rope_frequencies: Sequence[float] | None = None,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.d_model = require_positive_int("d_model", d_model)
        self.n_heads = require_positive_int("n_heads", n_heads)
        self.kv_lora_rank = require_positive_int("kv_lora_rank", kv_lora_rank)
        self.qk_nope_head_dim = require_non_negative_int("qk_nope_head_dim", qk_nope_head_dim)
        self.qk_rope_head_dim = require_non_negative_int("qk_rope_head_dim", qk_rope_head_dim)
        require_even("qk_rope_head_dim", qk_rope_head_dim)
        if qk_nope_head_dim + qk_rope_head_dim == 0:
            raise ValueError("qk_nope_head_dim + qk_rope_head_dim must be positive, got 0 + 0")
        self.v_head_dim = require_positive_int("v_head_dim", v_head_dim)
        if q_lora_rank is not None:
            require_positive_int("q_lora_rank", q_lora_rank)
        self.q_lora_rank = q_lora_rank
        self.latent_norm = latent_norm
        self.norm_eps = norm_eps
        self.rope_theta = rope_theta
        self.rope_layout = require_choice("rope_layout", rope_layout, ROPE_LAYOUTS)
        self.rope_frequencies = frequency_table(rope_frequencies, qk_rope_head_dim)

        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, n_heads * qk_head_dim, bias=bias)
        else:
            self.q_a_proj = nn.Linear(d_model, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, eps=norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, n_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=bias)
        if latent_norm:
            self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps=norm_eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * v_head_dim, d_model, bias=bias)

    def like(self, **changes) -> MultiHeadLatentAttention:
        """A new module (fresh weights) with this one's sizes and settings, except ``changes`` (constructor keywords)."""
        settings = dict(
            d_model=self.d_model,
            n_heads=self.n_heads,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            q_lora_rank=self.q_lora_rank,
            latent_norm=self.latent_norm,
            bias=self.o_proj.bias is not None,
            rope_theta=self.rope_theta,
            rope_layout=self.rope_layout,
            rope_frequencies=self.rope_frequencies,
            norm_eps=self.norm_eps,
        )
        return MultiHeadLatentAttention(**(settings | changes))

    # ---- sizes -------------------------------------------------------------------------
    @property
    def softmax_scale(self) -> float:
        """1/√(d_N + d_R), on both paths."""
        return 1.0 / math.sqrt(self.qk_nope_head_dim + self.qk_rope_head_dim)

    def cache_elements_per_token(self) -> int:
        """d_c + d_R: what one token costs in this layer's cache."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def new_cache(self, capacity: int | None = None) -> LatentCache:
        """An empty latent cache for this layer (``capacity`` tokens preallocated if given)."""
        return LatentCache(self.kv_lora_rank, self.qk_rope_head_dim, capacity=capacity)

    # ---- the up-projections and their absorbed forms ------------------------------------
    def key_up_proj(self) -> torch.Tensor:
        """Entry i is W_UK^iᵀ, (n_h, d_N, d_c) in nn.Linear's orientation: k_i^N = c W_UK^i = (entry i) @ c."""
        w = rearrange(self.kv_b_proj.weight, "(h e) c -> h e c", h=self.n_heads)
        return w[:, : self.qk_nope_head_dim]

    def value_up_proj(self) -> torch.Tensor:
        """Entry i is W_UV^iᵀ, (n_h, d_v, d_c) in nn.Linear's orientation: v_i = c W_UV^i = (entry i) @ c."""
        w = rearrange(self.kv_b_proj.weight, "(h e) c -> h e c", h=self.n_heads)
        return w[:, self.qk_nope_head_dim :]

    def query_nope_proj(self) -> torch.Tensor:
        """The position-free part of the query projection as (n_h, d_N, d_in).

        d_in is d_model, or q_lora_rank with low-rank queries (applied after q_a_layernorm).
        """
        last = self.q_proj if self.q_lora_rank is None else self.q_b_proj
        w = rearrange(last.weight, "(h e) i -> h e i", h=self.n_heads)
        return w[:, : self.qk_nope_head_dim]

    def absorbed_query_proj(self) -> torch.Tensor:
        """W_UK absorbed into the query: (n_h, d_c, d_in) in nn.Linear's orientation, so q_i^latent = M[i] @ x.

        In row vectors: q_i^N · k_i^N = (x W_Q^{N,i}) · (c W_UK^i) = (x W_Q^{N,i} W_UK^iᵀ) · c, and entry i is
        (W_Q^{N,i} W_UK^iᵀ)ᵀ.
        (Ignores a query bias, which absorbs the same way.)
        """
        return torch.einsum("hdc,hdi->hci", self.key_up_proj(), self.query_nope_proj())

    def absorbed_output_proj(self) -> torch.Tensor:
        """W_UV absorbed into W_O: (n_h, d_model, d_c) in nn.Linear's orientation, so o = Σ_i M[i] @ ō_i^latent.

        In row vectors: o = Σ_i (ō_i^latent W_UV^i) W_O^i, and entry i is (W_UV^i W_O^i)ᵀ.
        """
        w_o = rearrange(self.o_proj.weight, "m (h d) -> h m d", h=self.n_heads)  # (n_h, d_model, d_v)
        return torch.einsum("hmd,hdc->hmc", w_o, self.value_up_proj())

    # ---- forward ---------------------------------------------------------------------------
    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        """(b, s, d_model) -> (b, n_h, s, d_N + d_R), before RoPE."""
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return rearrange(q, "b s (h e) -> b h s e", h=self.n_heads)

    def forward(
        self,
        x: torch.Tensor,
        cache: LatentCache | None = None,
        *,
        path: AttentionPath = "naive",
        backend: Backend = "auto",
    ) -> torch.Tensor:
        """Causal MLA over the cached tokens and the s new ones.

        Shapes: x (b, s, d_model) -> (b, s, d_model).  With a cache, the new latent rows are
        appended and the queries sit at positions t_cached … t_cached + s - 1.

        ``backend`` picks who runs an absorbed decode step (s = 1): "triton" the flash-decoding
        kernel, "torch" the PyTorch reference, "auto" Triton on CUDA tensors and PyTorch elsewhere —
        ``mla_ref.kernels.mla_decode`` decides.  Prefill (s > 1) and the naive path always run in PyTorch.
        """
        require_choice("path", path, ATTENTION_PATHS)
        require_choice("backend", backend, BACKENDS)
        if backend == "triton" and path != "absorbed":
            raise ValueError("backend 'triton' runs the absorbed path only; pass path='absorbed' or backend='torch'")
        d_n, d_r, d_c = self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        offset = 0 if cache is None else cache.length
        positions = torch.arange(offset, offset + x.shape[1], device=x.device)
        rope = dict(theta=self.rope_theta, layout=self.rope_layout, inv_freq=rope_inv_freq(self.rope_frequencies))

        q = self._queries(x)  # (b, h, s, d_N + d_R)
        q_nope, q_rope = q.split([d_n, d_r], dim=-1)
        latent, rope_key = self.kv_a_proj_with_mqa(x).split([d_c, d_r], dim=-1)  # (b, s, d_c), (b, s, d_R)
        if self.latent_norm:
            latent = self.kv_a_layernorm(latent)
        q_rope = apply_rope(q_rope, positions, **rope)  # (b, h, s, d_R)
        rope_key = apply_rope(rope_key, positions, **rope)  # (b, s, d_R)

        if cache is None:
            rows = torch.cat([latent, rope_key], dim=-1)  # (b, t, d_c + d_R)
        else:
            rows = cache.append(latent, rope_key)  # (b, t, d_c + d_R)

        if path == "naive":
            out = self._attend_naive(q_nope, q_rope, rows, offset)  # (b, h, s, d_v)
        else:
            out = self._attend_absorbed(q_nope, q_rope, rows, offset, backend)  # (b, h, s, d_v)
        return self.o_proj(rearrange(out, "b h s d -> b s (h d)"))

    def _attend_naive(self, q_nope, q_rope, rows, offset) -> torch.Tensor:
        """Up-project the cache into per-head K and V, then ordinary attention."""
        d_c = self.kv_lora_rank
        latent, rope_key = rows[..., :d_c], rows[..., d_c:]  # (b, t, d_c), (b, t, d_R)
        kv = rearrange(self.kv_b_proj(latent), "b t (h e) -> b h t e", h=self.n_heads)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)  # (b, h, t, d_N), (b, h, t, d_v)
        k_rope = rope_key[:, None].expand(-1, self.n_heads, -1, -1)  # (b, h, t, d_R), shared by all heads
        k = torch.cat([k_nope, k_rope], dim=-1)  # (b, h, t, d_N + d_R)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (b, h, s, d_N + d_R)
        return grouped_attention(q, k, v, scale=self.softmax_scale, q_offset=offset)

    def _attend_absorbed(self, q_nope, q_rope, rows, offset, backend: Backend) -> torch.Tensor:
        """Attend over the latent rows directly (MQA with one K and one V head).

        Letters as in DeepSeek's code: b sequence, h head, s new token, t cached token, d per-head size
        (d_N, then d_v), c latent column.  W_UK and W_UV are views of ``kv_b_proj.weight``
        (``key_up_proj`` / ``value_up_proj``): nothing is prepared ahead, so nothing can go stale when the
        weights change, and the rows are read as the cache stores them.
        """
        d_c = self.kv_lora_rank
        # q^latent[b,h,s,c] = Σ_d q^N[b,h,s,d] · W_UK[h,d,c]   (n_h small matmuls, once per new token)
        q_latent = torch.einsum("bhsd,hdc->bhsc", q_nope, self.key_up_proj())  # (b, h, s, d_c)
        q_absorbed = torch.cat([q_latent, q_rope], dim=-1)  # (b, h, s, d_c + d_R)
        if q_absorbed.shape[2] == 1:  # a decode step: mla_decode runs it on the backend asked for
            # A decode step sees every cached row, so each sequence's length is t.
            lengths = torch.full((rows.shape[0],), rows.shape[1], dtype=torch.int32, device=rows.device)
            out_latent, _ = mla_decode(
                q_absorbed[:, :, 0], rows, lengths, kv_lora_rank=d_c, softmax_scale=self.softmax_scale, backend=backend
            )  # (b, h, d_c)
            out_latent = out_latent[:, :, None]  # (b, h, 1, d_c)
        else:
            keys = rows[:, None]  # (b, 1, t, d_c + d_R): the cache rows themselves
            values = rows[:, None, :, :d_c]  # (b, 1, t, d_c): their latent columns
            out_latent = grouped_attention(
                q_absorbed, keys, values, scale=self.softmax_scale, q_offset=offset
            )  # (b, h, s, d_c)
        # o[b,h,s,d] = Σ_c ō^latent[b,h,s,c] · W_UV[h,d,c]   i.e. o_i = (Σ_t p_t c_t) W_UV^i
        return torch.einsum("bhsc,hdc->bhsd", out_latent, self.value_up_proj())  # (b, h, s, d_v)


MLA = MultiHeadLatentAttention

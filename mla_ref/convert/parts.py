"""The common target of every GQA → MLA conversion: an MLA layer described by its linear maps.

Each conversion (exact, RoRoPE + BKV-PCA, partial RoPE + SVD) decides what the shared RoPE key,
the latent and the per-head up-projections are; ``assemble_mla`` then writes those maps into a
``MultiHeadLatentAttention`` with DeepSeek-V3's weight layout.  Working with rotary *pairs* keeps
the layouts straight: ``rotary_pairs`` reads a source head's weight rows as (pair j, coordinate a/b),
and the assembled key is always laid out rotate-half, pair p = (row p, row p + d_R/2).

Softmax scale: the source scores with 1/√d_h, the MLA module with 1/√(d_N + d_R).  ``assemble_mla``
multiplies the queries by √(d_N + d_R) / √d_h, so the scores are the source's (TransMLA's query rescale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange

from mla_ref.attention import GroupedQueryAttention
from mla_ref.mla import MultiHeadLatentAttention
from mla_ref.rope import inverse_frequencies, pair_indices


@dataclass
class MLAParts:
    """The linear maps of one MLA layer (D = d_model; all weights act on x as ``W @ x``).

    query_nope:     (n_h, d_N, D)    q_i^N = query_nope[i] @ x
    query_rope:     (n_h, d_R, D)    q_i^R, in the rotate-half layout of the shared key
    latent_down:    (d_c, D)         c = latent_down @ x            (W_DKV)
    key_rope:       (d_R, D)         k^R = key_rope @ x, before RoPE (W_KR)
    key_up:         (n_h, d_N, d_c)  k_i^N = key_up[i] @ c          (W_UK)
    value_up:       (n_h, d_v, d_c)  v_i = value_up[i] @ c          (W_UV)
    output:         (D, n_h · d_v)   W_O
    rope_frequencies: d_R/2 floats, the frequency of each pair of the shared key
    source_scale:   the softmax scale the source used (1/√d_h)
    rope_theta:     the source's θ (kept for reference; the table above is what rotates)
    """

    query_nope: torch.Tensor
    query_rope: torch.Tensor
    latent_down: torch.Tensor
    key_rope: torch.Tensor
    key_up: torch.Tensor
    value_up: torch.Tensor
    output: torch.Tensor
    rope_frequencies: tuple[float, ...]
    source_scale: float
    rope_theta: float = 10000.0

    @property
    def cache_elements_per_token(self) -> int:
        """d_c + d_R."""
        return self.latent_down.shape[0] + self.key_rope.shape[0]


def check_source(source: GroupedQueryAttention) -> GroupedQueryAttention:
    """Refuse what the GQA → MLA conversions do not handle: anything but a bias-free GQA-family module."""
    if not isinstance(source, GroupedQueryAttention):
        raise ValueError(
            f"source must be a mla_ref GroupedQueryAttention (MHA, GQA or MQA), got {type(source).__name__}"
        )
    if source.q_proj.bias is not None or source.o_proj.bias is not None:
        raise ValueError(
            "converting a module with biases is not supported (a key bias would need a bias on the shared RoPE key "
            f"and the latent); got qkv_bias={source.q_proj.bias is not None}, o_bias={source.o_proj.bias is not None}"
        )
    return source


def rotary_pairs(weight: torch.Tensor, n_heads: int, head_dim: int, layout: str) -> torch.Tensor:
    """Read a projection's rows as (head, rotary pair j, coordinate a/b).

    Shapes: weight (n_heads · head_dim, D) -> (n_heads, head_dim/2, 2, D), where [..., 0, :] is the
    row of coordinate a_j and [..., 1, :] of b_j (see ``mla_ref.rope.pair_indices``).
    """
    per_head = rearrange(weight, "(h d) i -> h d i", h=n_heads)  # (h, d_h, D)
    a_idx, b_idx = pair_indices(head_dim, layout)
    return torch.stack([per_head[:, a_idx], per_head[:, b_idx]], dim=2)  # (h, d_h/2, 2, D)


def source_frequencies(source: GroupedQueryAttention) -> torch.Tensor:
    """The source's rotary frequencies ω_j, shape (d_h/2,), fp64."""
    if source.rope_frequencies is not None:
        return torch.tensor(source.rope_frequencies, dtype=torch.float64)
    return inverse_frequencies(source.head_dim, source.rope_theta).double()


def rotate_half_rows(pair_rows: torch.Tensor) -> torch.Tensor:
    """Lay out rotary pairs as a rotate-half key: (P, 2, D) -> (2P, D), pair p at rows p and p + P."""
    return torch.cat([pair_rows[:, 0], pair_rows[:, 1]], dim=0)


def assemble_mla(
    parts: MLAParts, d_model: int, *, kv_lora_rank: int | None = None, rope_dim: int | None = None
) -> MultiHeadLatentAttention:
    """Build the MLA module (no latent norm, rotate-half RoPE with the parts' frequency table).

    ``kv_lora_rank`` (d_c) and ``rope_dim`` (d_R): the sizes planned for the layer (``Method`` converters pass them
    down from ``plan_sizes``); the module is built at those, and parts of any other shape are refused.  A size left
    out (a lesson assembling parts by hand) is the parts' own.  Weights are written in fp32 on the parts' device;
    the caller casts as needed.
    """
    n_heads, d_nope, _ = parts.query_nope.shape
    d_value = parts.value_up.shape[1]
    d_latent = parts.latent_down.shape[0] if kv_lora_rank is None else kv_lora_rank
    d_rope = parts.key_rope.shape[0] if rope_dim is None else rope_dim
    if (parts.latent_down.shape[0], parts.key_rope.shape[0]) != (d_latent, d_rope):
        raise ValueError(
            f"the parts hold a latent of {parts.latent_down.shape[0]} and a roped key of {parts.key_rope.shape[0]} "
            f"rows, but the layer was planned at d_c = {d_latent}, d_R = {d_rope}"
        )
    module = MultiHeadLatentAttention(
        d_model,
        n_heads,
        kv_lora_rank=d_latent,
        qk_nope_head_dim=d_nope,
        qk_rope_head_dim=d_rope,
        v_head_dim=d_value,
        latent_norm=False,
        rope_theta=parts.rope_theta,
        rope_layout="rotate_half",
        rope_frequencies=parts.rope_frequencies,
    ).to(parts.latent_down.device)
    # The module scores with 1/√(d_N + d_R); the source with source_scale: fold the ratio into q.
    query_scale = parts.source_scale * math.sqrt(d_nope + d_rope)
    query = torch.cat([parts.query_nope, parts.query_rope], dim=1) * query_scale  # (h, d_N + d_R, D)
    with torch.no_grad():
        module.q_proj.weight.copy_(rearrange(query, "h e i -> (h e) i"))
        module.kv_a_proj_with_mqa.weight.copy_(torch.cat([parts.latent_down, parts.key_rope], dim=0))
        module.kv_b_proj.weight.copy_(rearrange(torch.cat([parts.key_up, parts.value_up], dim=1), "h e c -> (h e) c"))
        module.o_proj.weight.copy_(parts.output)
    return module

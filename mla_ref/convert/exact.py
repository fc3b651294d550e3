"""GQA → MLA with nothing lost (TransMLA §3: GQA is a special case of MLA at the same cache).

The GQA cache [K_1 … K_nkv, V_1 … V_nkv] is read as MLA's cache:

- the values V_1 … V_nkv are the latent c (d_c = n_kv · d_h), and W_UV^i is the 0/1 matrix that
  picks head i's group g = ⌊i/m⌋ out of it;
- the keys K_1 … K_nkv, still roped, are the shared RoPE key k^R (d_R = n_kv · d_h): pair j of KV
  head g becomes pair p = g · d_h/2 + j of k^R, rotated by the same frequency ω_j;
- query head i puts its own pairs at its group's block of k^R and zeros elsewhere, so
  q_i^R · k^R = q_i · k_g, the GQA score.  There is no position-free part (d_N = 0).

Cache per token: d_c + d_R = 2 · n_kv · d_h, exactly GQA's.  TransMLA's paper draws the same identity
with the keys inside the latent and RoPE after the up-projection; here the keys sit in DeepSeek's
roped slot instead, which keeps the layer absorbable (lesson 06).

The converse fails: an MLA's per-head keys c W_UK^i span up to d_c directions, while a GQA layer at
the same cache has only n_kv distinct key heads (lesson 07 checks the rank numerically).
"""

from __future__ import annotations

import math

import torch

from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert.parts import (
    MLAParts,
    assemble_mla,
    check_source,
    rotary_pairs,
    rotate_half_rows,
    source_frequencies,
)
from mla_ref.mla import MultiHeadLatentAttention


def exact_parts(source: GroupedQueryAttention) -> MLAParts:
    """The maps of the exact conversion (see the module docstring).  All in fp32."""
    check_source(source)
    n_h, n_kv, d_h, m = source.n_heads, source.n_kv_heads, source.head_dim, source.group_size
    half = d_h // 2
    d_model = source.d_model
    on = dict(device=source.q_proj.weight.device)  # the source's device: the parts are built beside it
    q_pairs = rotary_pairs(source.q_proj.weight.float(), n_h, d_h, source.rope_layout)  # (n_h, d_h/2, 2, D)
    k_pairs = rotary_pairs(source.k_proj.weight.float(), n_kv, d_h, source.rope_layout)  # (n_kv, d_h/2, 2, D)
    # k^R: pair p = g·d_h/2 + j is pair j of KV head g
    key_rope = rotate_half_rows(k_pairs.reshape(n_kv * half, 2, d_model))  # (n_kv·d_h, D)
    # q_i^R: head i's pairs in its group's block, zeros elsewhere
    query_rope_pairs = torch.zeros(n_h, n_kv, half, 2, d_model, **on)
    for i in range(n_h):
        query_rope_pairs[i, i // m] = q_pairs[i]
    query_rope = torch.stack(
        [rotate_half_rows(query_rope_pairs[i].reshape(n_kv * half, 2, d_model)) for i in range(n_h)]
    )  # (n_h, n_kv·d_h, D)
    # v_i = W_UV^i c picks block g of c = [V_1 … V_nkv]
    value_up = torch.zeros(n_h, d_h, n_kv * d_h, **on)
    for i in range(n_h):
        g = i // m
        value_up[i, :, g * d_h : (g + 1) * d_h] = torch.eye(d_h, **on)
    frequencies = source_frequencies(source).repeat(n_kv)  # pair p = g·d_h/2 + j has ω_j
    return MLAParts(
        query_nope=torch.zeros(n_h, 0, d_model, **on),
        query_rope=query_rope,
        latent_down=source.v_proj.weight.float().clone(),
        key_rope=key_rope,
        key_up=torch.zeros(n_h, 0, n_kv * d_h, **on),
        value_up=value_up,
        output=source.o_proj.weight.float().clone(),
        rope_frequencies=tuple(frequencies.tolist()),
        source_scale=1.0 / math.sqrt(d_h),
        rope_theta=source.rope_theta,
    )


def gqa_to_mla_exact(source: GroupedQueryAttention) -> MultiHeadLatentAttention:
    """An MLA module whose outputs and cache size equal ``source``'s (fp32 weights).

    Shapes: the result maps x (b, s, d_model) -> (b, s, d_model) like ``source``; its cache holds
    d_c + d_R = 2 · n_kv · d_h elements per token.  ``source`` is not modified.
    """
    with torch.no_grad():
        return assemble_mla(exact_parts(source), source.d_model)

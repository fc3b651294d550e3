"""Biased q/k/v layers as bias-free ones: the converters take bias-free layers.

A layer with q/k/v biases (Qwen2) is converted as the bias-free layer acting on
[x; 1] — each bias is the weight of a constant input, W x + b = [W | b] [x; 1] — with calibration inputs
extended by a column of ones, and the result's last input column becomes the MLA's biases again (exact):
``q_proj`` for the query and ``kv_a_proj_with_mqa`` for the latent and the shared RoPE key.
"""

from __future__ import annotations

import torch

from mla_ref.attention import GroupedQueryAttention
from mla_ref.mla import MultiHeadLatentAttention


def augmented(attention: GroupedQueryAttention) -> GroupedQueryAttention:
    """The layer acting on [x; 1] without biases: each q/k/v bias becomes the weight of the constant input.

    W x + b = [W | b] [x; 1];  W_O gains a zero output row (dropped again by ``split_augmented``).
    """
    result = attention.like(d_model=attention.d_model + 1, qkv_bias=False, o_bias=False)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            source = getattr(attention, name)
            getattr(result, name).weight.copy_(torch.cat([source.weight, source.bias[:, None]], dim=1))
        result.o_proj.weight.copy_(torch.cat([attention.o_proj.weight, torch.zeros_like(attention.o_proj.weight[:1])]))
    return result


def split_augmented(module: MultiHeadLatentAttention, d_model: int) -> MultiHeadLatentAttention:
    """An MLA on [x; 1] (from ``augmented``) as an MLA on x with biases: the last input column is the bias."""
    result = module.like(d_model=d_model, latent_norm=False, bias=True)
    state = {}
    for name in ("q_proj", "kv_a_proj_with_mqa"):
        weight = getattr(module, name).weight
        state[f"{name}.weight"], state[f"{name}.bias"] = weight[:, :d_model], weight[:, d_model]
    state["kv_b_proj.weight"] = module.kv_b_proj.weight
    state["o_proj.weight"] = module.o_proj.weight[:d_model]
    state["o_proj.bias"] = torch.zeros(d_model)
    result.load_state_dict(state)
    return result

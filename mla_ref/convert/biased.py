"""One GQA-family layer to an exact-form MLA layer, by any of the conversion methods, biases included.

``convert_layer`` calls the converter of the method's entry in ``mla_ref.convert.methods``.  The converters
take bias-free layers.  A layer with q/k/v biases (Qwen2) is converted as the bias-free layer acting on
[x; 1] — each bias is the weight of a constant input, W x + b = [W | b] [x; 1] — with calibration inputs
extended by a column of ones, and the result's last input column becomes the MLA's biases again (exact):
``q_proj`` for the query and ``kv_a_proj_with_mqa`` for the latent and the shared RoPE key.
"""

from __future__ import annotations

import torch

from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert.methods import get_method
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


@torch.no_grad()
def convert_layer(
    attention: GroupedQueryAttention, calibration_inputs: torch.Tensor, method: str, sizes: dict
) -> MultiHeadLatentAttention:
    """One GQA-family layer as an exact-form MLA layer (fp32) by ``method`` with ``sizes`` (``Method.sizes``).

    Biases are handled on [x; 1].  Shapes: calibration_inputs (b, s, d_model), the hidden states entering the
    layer's attention (exact ignores them).
    """
    return convert_layer_candidates(attention, calibration_inputs, method, [sizes])[0]


@torch.no_grad()
def convert_layer_candidates(
    attention: GroupedQueryAttention,
    calibration_inputs: torch.Tensor,
    method: str,
    candidates: list[dict],
    *,
    source_output: torch.Tensor | None = None,
) -> list[MultiHeadLatentAttention]:
    """``convert_layer`` at each of ``candidates`` (``Method.candidate_sizes``), in order; the method does what the
    candidates share once (``Method.convert_candidates``).  ``source_output``: ``attention``'s output on the
    calibration inputs (b, s, d_model), when already computed."""
    source, inputs = attention, calibration_inputs.float()
    has_bias = attention.q_proj.bias is not None
    if has_bias:
        source = augmented(attention)
        inputs = torch.cat([inputs, torch.ones_like(inputs[..., :1])], dim=-1)  # [x; 1]
        source_output = None  # the layer on [x; 1] has one more output coordinate, and rounds its own way
    results = get_method(method).convert_candidates(source, inputs, candidates, source_output)
    return [split_augmented(result, attention.d_model) if has_bias else result for result in results]

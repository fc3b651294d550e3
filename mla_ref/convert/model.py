"""Convert every attention layer of a tiny-lab model, keeping everything else as it is.

``convert_model(model, convert_layer, calibration_tokens)`` calls ``convert_layer(attention, inputs)``
for each layer — ``attention`` the source module, ``inputs`` (b, s, d_model) the hidden states that
entered it on the calibration tokens (None without them) — and builds an MLA model from the results.
Embeddings, norms, MLPs and the head are copied; the source model is not modified.  All layers must
come out with the same MLA sizes (d_c, d_N, d_R, d_v); each keeps its own RoPE frequency table.

``convert_model_by_method(model, name, calibration_tokens, budget=F)`` converts with a registered method
(``mla_ref.convert.methods``) and, where the method tries more than one split of the budget, keeps the split whose
converted model is closest to the source on the calibration tokens (``mla_ref.convert.split_choice``) — as
``python -m mla_ref convert`` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from mla_ref.convert.exact import gqa_to_mla_exact
from mla_ref.convert.methods import get_method
from mla_ref.convert.methods.base import plan_sizes
from mla_ref.convert.split_choice import SplitSearch, kl_to_source
from mla_ref.mla import MultiHeadLatentAttention
from mla_ref.model import ModelConfig, TinyLM
from mla_ref.rope import inverse_frequencies

LayerConverter = Callable[[nn.Module, "torch.Tensor | None"], MultiHeadLatentAttention]


def mla_config(source: ModelConfig, layers: list[MultiHeadLatentAttention], *, rope_tables: bool = True) -> ModelConfig:
    """The config of ``source`` with ``layers`` (converted MLA attention, one per block) in place of its attention.

    Every layer must share the MLA sizes and flags.  ``rope_tables``: keep each layer's own rotary frequencies
    (a layer without a table turns with the standard one of its θ); False: one standard table for the model,
    θ of the first layer (a stock DeepSeek-V3 config).
    """
    sizes = {(m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) for m in layers}
    if len(sizes) != 1:
        raise ValueError(f"every layer must convert to the same MLA sizes (d_c, d_N, d_R, d_v); got {sorted(sizes)}")
    (d_c, d_n, d_r, d_v) = sizes.pop()
    flags = {(m.q_lora_rank, m.latent_norm, m.rope_layout, m.o_proj.bias is not None) for m in layers}
    if len(flags) != 1:
        raise ValueError(
            f"every layer must share q_lora_rank, latent_norm, rope_layout and biases; got {sorted(flags)}"
        )
    q_lora_rank, latent_norm, rope_layout, bias = flags.pop()
    first = layers[0]
    rope_frequencies = None
    if rope_tables and any(m.rope_frequencies is not None for m in layers):
        rope_frequencies = [
            list(m.rope_frequencies)
            if m.rope_frequencies is not None
            else (inverse_frequencies(d_r, m.rope_theta).tolist() if d_r else [])
            for m in layers
        ]
    return dataclasses.replace(
        source,
        attention="mla",
        n_kv_heads=None,
        kv_lora_rank=d_c,
        qk_nope_head_dim=d_n,
        qk_rope_head_dim=d_r,
        v_head_dim=d_v,
        q_lora_rank=q_lora_rank,
        latent_norm=latent_norm,
        rope_layout=rope_layout,
        rope_theta=first.rope_theta,
        rope_frequencies=rope_frequencies,
        attention_bias=bias,
    )


@torch.no_grad()
def convert_model(
    model: TinyLM,
    convert_layer: LayerConverter = lambda attention, _inputs: gqa_to_mla_exact(attention),
    calibration_tokens: torch.Tensor | None = None,
) -> TinyLM:
    """A new MLA model whose attention layers are ``convert_layer``'s results (default: exact).

    Shapes: calibration_tokens (b, s) int64, or None for conversions that need no activations.
    """
    if model.config.attention == "mla":
        raise ValueError("the model's attention is already 'mla'; convert a model of the GQA family (mha/gqa/mqa)")
    inputs = model.attention_inputs(calibration_tokens) if calibration_tokens is not None else None
    converted = [
        convert_layer(layer.self_attn, None if inputs is None else inputs[i]) for i, layer in enumerate(model.layers)
    ]
    target = TinyLM(mla_config(model.config, converted)).to(model.lm_head.weight.device)
    state = {k: v for k, v in model.state_dict().items() if ".self_attn." not in k}
    for i, attention in enumerate(converted):
        state.update({f"layers.{i}.self_attn.{k}": v for k, v in attention.state_dict().items()})
    target.load_state_dict(state)
    return target.to(model.lm_head.weight.dtype)


@torch.no_grad()
def convert_model_by_method(
    model: TinyLM,
    method: str,
    calibration_tokens: torch.Tensor | None = None,
    *,
    budget: float | None = None,
    kv_lora_rank: int | None = None,
    rope_dim: int | None = None,
    reserve: int = 0,
    **options,
) -> TinyLM:
    """``model`` converted by the method called ``method`` at the sizes ``Method.candidate_sizes`` gives.

    With several candidate splits (the recipe with a budget), every layer is converted at each and the split whose
    whole model is closest to the source on the calibration tokens (KL) is kept (``SplitSearch``).  Shapes: calibration_tokens
    (b, s) int64 (None only for ``exact``).
    """
    if model.config.attention == "mla":
        raise ValueError("the model's attention is already 'mla'; convert a model of the GQA family (mha/gqa/mqa)")
    chosen = get_method(method)
    first = model.layers[0].self_attn
    sizes = plan_sizes(
        chosen, first, budget=budget, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, reserve=reserve, **options
    )
    search = SplitSearch(sizes)
    if calibration_tokens is None and chosen.lossy:
        raise ValueError(f"method {method!r} needs calibration_tokens (b, s)")
    inputs = (
        model.attention_inputs(calibration_tokens) if calibration_tokens is not None else [None] * len(model.layers)
    )
    for layer, layer_inputs in zip(model.layers, inputs, strict=True):
        target = search.target(layer.self_attn, layer_inputs)  # y_l, when there is a split to choose
        search.add_layer(chosen.convert_layer(layer.self_attn, layer_inputs, sizes, target), layer_inputs, target)
    if not search.choosing():
        return _with_layers(model, search.chosen())
    # the whole model at each split, against the source on the calibration tokens; the closest one is returned
    source_logits = model(calibration_tokens)
    candidates = [_with_layers(model, layers) for layers in search.kept]
    best = search.choose(lambda k, _layers: kl_to_source(source_logits, candidates[k](calibration_tokens)))
    return candidates[best]


def _with_layers(model: TinyLM, layers: list[MultiHeadLatentAttention]) -> TinyLM:
    """``model`` with ``layers`` (one converted attention per block, in order) in place of its attention."""
    remaining = iter(layers)
    return convert_model(model, lambda _attention, _inputs: next(remaining))

"""Assemble a TinyLM (or one of its blocks) from tensors that are already there, without initialising weights.

The modules are created on PyTorch's ``meta`` device (no memory, no random init) and the given tensors are
assigned in place of their parameters, so reading a checkpoint costs one copy of it, not two.

Two things a ``ModelConfig`` does not say are set here:

- MLA layers with biases (``mla_bias``): DeepSeek-V3 with ``attention_bias`` has biases on
  ``kv_a_proj_with_mqa``, ``o_proj`` (and ``q_a_proj``), and a conversion of a source with q/k/v biases
  (Qwen2) needs them.
- the epsilon of MLA's latent and query norms (``latent_norm_eps``): Hugging Face's ``DeepseekV3Attention``
  builds ``kv_a_layernorm`` and ``q_a_layernorm`` with its default 1e-6, whatever ``rms_norm_eps`` says.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from mla_ref.mla import MultiHeadLatentAttention
from mla_ref.model import Block, ModelConfig, TinyLM


@contextlib.contextmanager
def unallocated() -> Iterator[None]:
    """Build modules on the meta device, skipping ``normal_`` initialisation (the weights are assigned next;
    a meta ``normal_`` would also pull in a slow one-time import)."""
    original = nn.init.normal_
    nn.init.normal_ = lambda tensor, *args, **kwargs: tensor
    try:
        with torch.device("meta"):
            yield
    finally:
        nn.init.normal_ = original


def mla_module(config: ModelConfig, layer: int, *, bias: bool) -> MultiHeadLatentAttention:
    """The MLA module of ``config``'s layer ``layer``, with or without biases (on the current device)."""
    c = config
    return MultiHeadLatentAttention(
        c.d_model,
        c.n_heads,
        c.kv_lora_rank,
        c.qk_nope_head_dim,
        c.qk_rope_head_dim,
        c.v_head_dim,
        q_lora_rank=c.q_lora_rank,
        latent_norm=c.latent_norm,
        bias=bias,
        rope_theta=c.rope_theta,
        rope_layout=c.rope_layout,
        rope_frequencies=None if c.rope_frequencies is None else c.rope_frequencies[layer],
        norm_eps=c.norm_eps,
    )


def _set_latent_eps(attention: nn.Module, eps: float | None) -> None:
    if eps is None or not isinstance(attention, MultiHeadLatentAttention):
        return
    for name in ("kv_a_layernorm", "q_a_layernorm"):
        if hasattr(attention, name):
            getattr(attention, name).eps = eps


def block_from_state(
    config: ModelConfig,
    layer: int,
    state: dict[str, torch.Tensor],
    *,
    mla_bias: bool = False,
    latent_norm_eps: float | None = None,
) -> Block:
    """Block ``layer`` of ``config`` holding ``state`` (its own names: ``self_attn.q_proj.weight`` …), eval mode."""
    with unallocated():
        block = Block(config, layer)
        if mla_bias and config.attention == "mla":
            block.self_attn = mla_module(config, layer, bias=True)
    block.load_state_dict(state, strict=True, assign=True)
    _set_latent_eps(block.self_attn, latent_norm_eps)
    return block.eval()


def tinylm_from_state(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    *,
    mla_bias: bool = False,
    latent_norm_eps: float | None = None,
) -> TinyLM:
    """A TinyLM holding ``state`` (TinyLM names; a tied head may be absent), eval mode, no weight copied twice."""
    with unallocated():
        model = TinyLM(config)
        if mla_bias and config.attention == "mla":
            for i, layer in enumerate(model.layers):
                layer.self_attn = mla_module(config, i, bias=True)
    state = dict(state)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    for layer in model.layers:
        _set_latent_eps(layer.self_attn, latent_norm_eps)
    return model.eval()


def mla_has_bias(model: TinyLM) -> bool:
    """Whether any MLA layer of ``model`` carries biases."""
    return any(
        isinstance(layer.self_attn, MultiHeadLatentAttention) and layer.self_attn.o_proj.bias is not None
        for layer in model.layers
    )


def config_builds_mla_bias(config: ModelConfig) -> bool:
    """Whether ``TinyLM(config)`` itself builds biased MLA layers (so ``checkpoint.load`` can restore them)."""
    if config.attention != "mla" or not config.attention_bias:
        return False
    with unallocated():
        return Block(config, 0).self_attn.o_proj.bias is not None

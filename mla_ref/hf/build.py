"""Assemble a TinyLM (or one of its blocks) from tensors that are already there, without initialising weights.

The modules are created on PyTorch's ``meta`` device (no memory, no random init) and the given tensors are
assigned in place of their parameters, so reading a checkpoint costs one copy of it, not two.

One thing a ``ModelConfig`` does not say is set here: the epsilon of MLA's latent and query norms
(``latent_norm_eps``), since Hugging Face's ``DeepseekV3Attention`` builds ``kv_a_layernorm`` and
``q_a_layernorm`` with its default 1e-6, whatever ``rms_norm_eps`` says.
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
    latent_norm_eps: float | None = None,
) -> Block:
    """Block ``layer`` of ``config`` holding ``state`` (its own names: ``self_attn.q_proj.weight`` …), eval mode."""
    with unallocated():
        block = Block(config, layer)
    block.load_state_dict(state, strict=True, assign=True)
    _set_latent_eps(block.self_attn, latent_norm_eps)
    return block.eval()


def tinylm_from_state(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    *,
    latent_norm_eps: float | None = None,
) -> TinyLM:
    """A TinyLM holding ``state`` (TinyLM names; a tied head may be absent), eval mode, no weight copied twice."""
    with unallocated():
        model = TinyLM(config)
    state = dict(state)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    for layer in model.layers:
        _set_latent_eps(layer.self_attn, latent_norm_eps)
    return model.eval()

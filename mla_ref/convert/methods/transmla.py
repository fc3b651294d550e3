"""``transmla``: TransMLA as published, without training (Meng et al. 2025).

    1. RoRoPE: per rotary frequency, one PCA of the keys across KV heads; the d_R/2 leading components, spread
       evenly over the frequencies, stay roped (FreqFold F pools F adjacent frequencies)  — ``convert.rorope``
    2. BKV-PCA: K^N and V balanced by their norms, one joint PCA of [K^N; V] on the calibration activations
       gives the d_c-wide latent                                                       — ``convert.bkv_pca``
    3. the query rescaled by √((d_h + d_R)/d_h) for the changed softmax scale

Sizes for a budget of B elements: d_R = min(DeepSeek's 64 or d_h/2, B/2), d_c = B − d_R.
"""

from __future__ import annotations

import torch

from mla_ref._checks import require_choice, require_positive_int
from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert.bkv_pca import LATENT_METRICS, bkv_pca_parts
from mla_ref.convert.methods.base import Method, even
from mla_ref.convert.parts import MLAParts, assemble_mla, check_source
from mla_ref.convert.rorope import (
    FOLD_FREQUENCIES,
    ROPE_BUDGETS,
    check_freqfold,
    check_rope_dim,
    default_rope_dim,
    rorope_parts,
)
from mla_ref.mla import MultiHeadLatentAttention


def transmla_parts(
    source: GroupedQueryAttention,
    calibration_inputs: torch.Tensor,
    *,
    kv_lora_rank: int,
    rope_dim: int | None = None,
    freqfold: int = 1,
    rope_budget: str = "uniform",
    fold_frequency: str = "mean",
    balance: bool = True,
    metric: str = "norm",
    fold_query: bool = True,
) -> MLAParts:
    """RoRoPE / FreqFold then BKV-PCA: MLA parts with a cache of kv_lora_rank + rope_dim per token.

    Shapes: calibration_inputs (b, s, d_model), the hidden states entering this layer.
    rope_dim defaults to ``default_rope_dim(d_h)``.  See ``rorope_parts`` and ``bkv_pca_parts``.
    """
    check_source(source)
    rope_dim = default_rope_dim(source.head_dim) if rope_dim is None else rope_dim
    check_rope_dim(rope_dim, source)
    require_positive_int("kv_lora_rank", kv_lora_rank)
    check_freqfold(freqfold, source.head_dim)
    require_choice("rope_budget", rope_budget, ROPE_BUDGETS)
    require_choice("fold_frequency", fold_frequency, FOLD_FREQUENCIES)
    require_choice("metric", metric, LATENT_METRICS)
    cache = source.cache_elements_per_token()
    if kv_lora_rank + rope_dim > cache:
        raise ValueError(
            f"kv_lora_rank + rope_dim = {kv_lora_rank} + {rope_dim} exceeds the source's cache of 2·n_kv·d_h = "
            f"{cache} elements per token; allowed kv_lora_rank: 1 … {cache - rope_dim}"
        )
    rotated = rorope_parts(
        source,
        calibration_inputs,
        rope_dim=rope_dim,
        freqfold=freqfold,
        rope_budget=rope_budget,
        fold_frequency=fold_frequency,
    )
    return bkv_pca_parts(
        rotated, calibration_inputs, kv_lora_rank=kv_lora_rank, balance=balance, metric=metric, fold_query=fold_query
    )


def transmla_convert(
    source: GroupedQueryAttention,
    calibration_inputs: torch.Tensor,
    *,
    kv_lora_rank: int,
    rope_dim: int | None = None,
    freqfold: int = 1,
    rope_budget: str = "uniform",
    fold_frequency: str = "mean",
    balance: bool = True,
    metric: str = "norm",
    fold_query: bool = True,
) -> MultiHeadLatentAttention:
    """A training-free MLA module (fp32) with a cache of kv_lora_rank + rope_dim elements per token.

    Shapes: calibration_inputs (b, s, d_model); the result maps x (b, s, d_model) -> (b, s, d_model).
    ``source`` is not modified.
    """
    parts = transmla_parts(
        source,
        calibration_inputs,
        kv_lora_rank=kv_lora_rank,
        rope_dim=rope_dim,
        freqfold=freqfold,
        rope_budget=rope_budget,
        fold_frequency=fold_frequency,
        balance=balance,
        metric=metric,
        fold_query=fold_query,
    )
    return assemble_mla(parts, source.d_model, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim)


class TransMLA(Method):
    name = "transmla"
    title = "TransMLA as published: RoRoPE (+ FreqFold) and BKV-PCA, no training"
    steps = (
        "RoRoPE: per rotary frequency, one PCA across KV heads; the d_R/2 leading components, spread "
        "evenly over the frequencies, stay roped (FreqFold F pools F adjacent frequencies)",
        "BKV-PCA: K^N and V balanced by their norms, one joint PCA of [K^N; V] on the calibration "
        "activations gives the d_c-wide latent",
        "the query rescaled by √((d_h + d_R)/d_h) for the changed softmax scale",
    )
    options = ("freqfold",)

    def split(self, source: GroupedQueryAttention, elements: int) -> tuple[int, int]:
        rope_dim = min(default_rope_dim(source.head_dim), even(elements // 2))
        return rope_dim, elements - rope_dim

    def convert(
        self, source: GroupedQueryAttention, calibration_inputs: torch.Tensor, sizes: dict
    ) -> MultiHeadLatentAttention:
        return transmla_convert(source, calibration_inputs, **sizes)

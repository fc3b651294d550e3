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

from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert.bkv_pca import transmla_convert
from mla_ref.convert.methods.base import Method
from mla_ref.convert.rorope import default_rope_dim
from mla_ref.convert.sizes import even
from mla_ref.mla import MultiHeadLatentAttention


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

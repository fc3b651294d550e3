"""The calibration activations every conversion algorithm reads: checked once, flattened, and their second moment.

``calibration_inputs`` (b, s, d_model) are the hidden states entering a layer's attention on calibration text.
RoRoPE, BKV-PCA, the output refit and MHA2MLA's scores and SVD all read them; the only statistic of them most
need is E[x xᵀ] (``input_moment``), computed once per layer in fp64.
"""

from __future__ import annotations

import torch
from einops import rearrange


def check_calibration_inputs(calibration_inputs: object, d_model: int) -> torch.Tensor:
    """``calibration_inputs`` if it is a finite (b, s, d_model) tensor with at least one token, else a ValueError."""
    if not isinstance(calibration_inputs, torch.Tensor):
        raise ValueError(
            f"calibration_inputs must be a tensor (b, s, d_model={d_model}) of the hidden states entering the "
            f"attention layer, got {type(calibration_inputs).__name__}"
        )
    shape = tuple(calibration_inputs.shape)
    if calibration_inputs.ndim != 3 or shape[-1] != d_model or shape[0] * shape[1] == 0:
        raise ValueError(f"calibration_inputs must have shape (b, s, d_model={d_model}) with b·s ≥ 1, got {shape}")
    if not torch.isfinite(calibration_inputs).all():
        raise ValueError("calibration_inputs must be finite (found NaN or infinite values)")
    return calibration_inputs


def calibration_tokens(calibration_inputs: torch.Tensor, d_model: int) -> torch.Tensor:
    """Check the calibration hidden states and flatten them: (b, s, d_model) -> (b · s, d_model), fp64."""
    check_calibration_inputs(calibration_inputs, d_model)
    return rearrange(calibration_inputs.detach().double(), "b s i -> (b s) i")


def input_moment(calibration_inputs: torch.Tensor, d_model: int) -> torch.Tensor:
    """E[x xᵀ] over the calibration tokens: (b, s, d_model) -> (d_model, d_model), fp64."""
    x = calibration_tokens(calibration_inputs, d_model)  # (T, D)
    return x.T @ x / x.shape[0]

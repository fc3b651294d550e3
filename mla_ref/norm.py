"""RMSNorm (Zhang & Sennrich, 2019), as used by Llama and by DeepSeek on the MLA latents."""

from __future__ import annotations

import torch
from torch import nn

from mla_ref._checks import require_positive_int


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) * weight, computed in fp32 and cast back.

    Shapes: x (..., dim) -> (..., dim).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = require_positive_int("dim", dim)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)

"""How far a decode step is from its roofline: the least it must move and compute, and the device's rates.

A step must read its weights and its cache (bytes) and run its matrix products (FLOPs), so it takes at least

    floor = max(bytes / copy rate, FLOPs / matmul rate)

with both rates measured on the device in the same run as the step (``copy_bandwidth``, ``matmul_rate``).
``decode_step_cost`` counts a step's bytes and FLOPs for GQA and both MLA paths; ``decode_bytes_read`` the bytes
a step reads from a real cache; ``achieved_bandwidth`` what a measured time makes of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mla_ref._checks import require_choice, require_positive_int, resolve_device
from mla_ref.dtypes import DTYPES, dtype_short_name
from mla_ref.mla import MultiHeadLatentAttention
from mla_ref.profile import Cache, require_attention, time_call


def decode_bytes_read(module: nn.Module, cache: Cache) -> int:
    """The least one decode step must read: every parameter once and every cached byte once.

    bytes = Σ parameter bytes + cache bytes.  Anything a path builds on the way (MLA's naive path writes and
    reads n_h · (d_N + d_v) up-projected elements per cached token) comes on top, so dividing this figure
    by a step's time gives the bandwidth of useful traffic.
    """
    module = require_attention(module)
    parameter_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    return parameter_bytes + cache.nbytes


def achieved_bandwidth(bytes_moved: float, seconds: float) -> float:
    """Bytes per second: bytes_moved / seconds."""
    if isinstance(bytes_moved, bool) or not isinstance(bytes_moved, int | float) or not bytes_moved >= 0:
        raise ValueError(f"bytes_moved must be a non-negative number, got {bytes_moved!r}")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not (0 < seconds < math.inf):
        raise ValueError(f"seconds must be a finite positive number, got {seconds!r}")
    # bandwidth = bytes / s
    return bytes_moved / seconds


def copy_bandwidth(nbytes: int, device: str | torch.device = "cpu", *, warmup: int = 2, repeats: int = 5) -> float:
    """Bytes per second of a plain copy of ``nbytes`` bytes into another buffer on ``device``.

    A copy reads nbytes and writes nbytes, so the figure counts both: 2 · nbytes / seconds (the way
    STREAM's copy is counted).  Use buffers much larger than the CPU's caches (tens of MiB or more) to
    measure memory and not cache.
    """
    require_positive_int("nbytes", nbytes)
    device = resolve_device(device)
    source = torch.full((nbytes,), 7, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = time_call(lambda: target.copy_(source), device, warmup=warmup, repeats=repeats)
    # bandwidth = (bytes read + bytes written) / s
    return achieved_bandwidth(2 * nbytes, seconds)


def matmul_rate(
    n: int = 1024,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    *,
    warmup: int = 2,
    repeats: int = 5,
) -> float:
    """Floating-point operations per second of one large matrix product, (n × n) @ (n × n), on ``device``.

    The product does n³ multiply-adds, counted as 2 n³ operations.  n = 1024 or more keeps the product at the
    multiplier's full speed: the most arithmetic a step's own (smaller, thinner) products can hope for.
    """
    require_positive_int("n", n)
    device = resolve_device(device)
    dtype = DTYPES[dtype_short_name(dtype)]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = time_call(lambda: a @ b, device, warmup=warmup, repeats=repeats)
    # rate = 2 n³ / s
    return 2 * n**3 / seconds


@dataclass(frozen=True)
class DecodeStepCost:
    """The least one decode step must do: the bytes it must read and the arithmetic it must run.

    ``weight_bytes``: every parameter once; ``cache_bytes``: every cached row once.  FLOPs count 2 per
    multiply-add of the step's matrix products: ``projection_flops`` those of the weight matrices (each element
    once per new token), ``attention_flops`` those that grow with the context (scores and values, and on MLA's
    naive path the up-projection of the cache).  The softmax, norms and RoPE are O(n_h · T) and left out.
    """

    weight_bytes: int
    cache_bytes: int
    projection_flops: int
    attention_flops: int

    @property
    def bytes(self) -> int:
        """Bytes the step must read: weights + cache."""
        return self.weight_bytes + self.cache_bytes

    @property
    def flops(self) -> int:
        """FLOPs the step must run: projections + attention."""
        return self.projection_flops + self.attention_flops

    def floor_seconds(self, copy_rate: float, matmul_rate: float) -> float:
        """The roofline: the step cannot beat reading its bytes at ``copy_rate`` (bytes/s, as ``copy_bandwidth``
        counts it) nor running its FLOPs at ``matmul_rate`` (FLOP/s, ``matmul_rate``), so the floor is the larger.
        """
        for name, rate in (("copy_rate", copy_rate), ("matmul_rate", matmul_rate)):
            if isinstance(rate, bool) or not isinstance(rate, int | float) or not (0 < rate < math.inf):
                raise ValueError(f"{name} must be a finite positive number, got {rate!r}")
        # floor = max(bytes / copy rate, FLOPs / matmul rate)
        return max(self.bytes / copy_rate, self.flops / matmul_rate)


def decode_step_cost(
    module: nn.Module,
    batch: int,
    tokens: int,
    dtype: torch.dtype | str = torch.float32,
    *,
    path: str = "absorbed",
) -> DecodeStepCost:
    """Bytes and FLOPs of one decode step of ``module`` for ``batch`` sequences attending over ``tokens`` rows each.

    ``tokens`` counts the rows the new token attends over, its own included; weights and cache are in ``dtype``.
    The module's weights are only counted, never read, so a module on the meta device works.  With P the
    multiply-adds of the weight matrices for one token (each matrix element once) and, per sequence:

        GQA / MHA / MQA     P + n_h · T · (d_h + d_h)                       scores q·k, values p·v
        MLA "absorbed"      P + n_h · T · ((d_c + d_R) + d_c)               scores q·[c ; k^R], values p·c
        MLA "naive"         P + (T − 1) · |W_UKV| + n_h · T · ((d_N + d_R) + d_v)
                                                                            every cached latent up-projected

    FLOPs = 2 · b · (multiply-adds); bytes = parameter bytes + b · T · (cache elements per token) · bytes per
    element.  The naive path's up-projected keys and values are written and read on top of these bytes.
    """
    module = require_attention(module)
    require_positive_int("batch", batch)
    require_positive_int("tokens", tokens)
    element = DTYPES[dtype_short_name(dtype)].itemsize
    weight_bytes = sum(p.numel() for p in module.parameters()) * element
    cache_bytes = batch * tokens * module.cache_elements_per_token() * element
    # P: each element of each weight matrix multiplies once per new token
    matrix_macs = sum(p.numel() for p in module.parameters() if p.ndim == 2)
    n_h = module.n_heads
    if isinstance(module, MultiHeadLatentAttention):
        require_choice("path", path, ("absorbed", "naive"))
        d_c, d_r, d_n, d_v = module.kv_lora_rank, module.qk_rope_head_dim, module.qk_nope_head_dim, module.v_head_dim
        if path == "absorbed":
            # scores over the whole row [c ; k^R], values over its first d_c columns
            attention_macs = n_h * tokens * ((d_c + d_r) + d_c)
        else:
            # W_UK and W_UV applied to the T − 1 cached latents as well as to the new one
            attention_macs = (tokens - 1) * module.kv_b_proj.weight.numel() + n_h * tokens * ((d_n + d_r) + d_v)
    else:
        attention_macs = n_h * tokens * 2 * module.head_dim
    # FLOPs = 2 · b · P  +  2 · b · (attention multiply-adds)
    return DecodeStepCost(weight_bytes, cache_bytes, 2 * batch * matrix_macs, 2 * batch * attention_macs)

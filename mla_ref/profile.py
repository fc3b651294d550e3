"""KV-cache memory as measured on a real device, how many tokens fit, and what a decode step achieves.

The calculator (``mla_ref.calculator``) says what a cache *should* cost:

    total_bytes = elements_per_token_per_layer · L · bytes_per_element · T · b

This module measures what it *does* cost, by filling a real cache from an attention module's own
``new_cache()`` with T random rows (no forward pass: the size of a row does not depend on its values):

- on CUDA, the change in ``torch.cuda.memory_allocated()`` around filling caches preallocated for exactly
  T tokens (``capacity=T``), with the device synchronised before and after;
- on the CPU, the bytes of the tensors the caches hold (their ``nbytes``), next to the bytes of the
  buffers allocated (``reserved_nbytes``; equal, since the capacity is exact).

Then it asks two questions of a device:

- how many tokens fit:  tokens = ⌊free_bytes / bytes_per_token⌋, with the free bytes from
  ``torch.cuda.mem_get_info`` on CUDA and, on the CPU, the machine's available physical pages
  (``os.sysconf``) or a budget you state;
- how fast a decode step runs, and what bandwidth that is:  bandwidth = bytes_moved / seconds, next to the
  bandwidth of a plain device-to-device (CPU: memory-to-memory) copy, the most the device can move;
- how far a decode step is from its roofline: ``mla_ref.roofline``.

Timings are medians of several repeats after a warm-up: CUDA events on CUDA, ``time.perf_counter`` on the CPU.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mla_ref._checks import require_non_negative_int, require_positive_int, resolve_device
from mla_ref.attention import GroupedQueryAttention
from mla_ref.cache import KVCache, LatentCache
from mla_ref.calculator import report
from mla_ref.dtypes import DTYPES, dtype_short_name
from mla_ref.mla import MultiHeadLatentAttention
from mla_ref.model_shapes import ModelShape

MEASURED_BY_CUDA = "cuda memory_allocated delta"
MEASURED_BY_TENSORS = "tensor bytes"

Cache = KVCache | LatentCache


# ---- argument checks ----------------------------------------------------------------------------
def require_attention(module: object) -> nn.Module:
    if not isinstance(module, GroupedQueryAttention | MultiHeadLatentAttention):
        raise ValueError(
            "module must be a GroupedQueryAttention (MHA / GQA / MQA) or a MultiHeadLatentAttention; "
            f"got {type(module).__name__}"
        )
    return module


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- filling caches -------------------------------------------------------------------------------
def _random_rows(
    module: nn.Module, batch: int, context: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``module``'s cache.append takes for ``context`` tokens, filled with random numbers.

    GQA family: keys, values (b, n_kv, t, d_h).  MLA: latent (b, t, d_c), rope_key (b, t, d_R).
    """
    make = dict(dtype=dtype, device=device)
    if isinstance(module, MultiHeadLatentAttention):
        return (
            torch.randn(batch, context, module.kv_lora_rank, **make),
            torch.randn(batch, context, module.qk_rope_head_dim, **make),
        )
    kv_shape = (batch, module.n_kv_heads, context, module.head_dim)
    return torch.randn(kv_shape, **make), torch.randn(kv_shape, **make)


def fill_cache(
    module: nn.Module,
    batch: int,
    context: int,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    *,
    capacity: int | None = None,
) -> Cache:
    """A cache from ``module.new_cache(capacity)`` holding ``context`` random tokens for ``batch`` sequences.

    ``capacity`` (default: exactly ``context``) is how many tokens the buffers are allocated for; leave room
    for the tokens that decode steps will append (``time_decode_step`` checks).  Uses torch's global RNG.
    Shapes held: KVCache keys, values (b, n_kv, t, d_h); LatentCache rows (b, t, d_c + d_R).
    """
    module = require_attention(module)
    require_positive_int("batch", batch)
    require_positive_int("context", context)
    capacity = context if capacity is None else require_positive_int("capacity", capacity)
    if capacity < context:
        raise ValueError(f"capacity ({capacity}) must be at least the context ({context})")
    cache = module.new_cache(capacity=capacity)
    rows = _random_rows(module, batch, context, DTYPES[dtype_short_name(dtype)], resolve_device(device))
    cache.append(*rows)
    return cache


# ---- measured cache memory ------------------------------------------------------------------------
@dataclass(frozen=True)
class MeasuredCache:
    """The measured size of ``layers`` layers of cache for ``batch`` sequences of ``context`` tokens.

    ``bytes`` is the measured figure, taken as ``method`` says ("cuda memory_allocated delta" or
    "tensor bytes"); ``tensor_bytes`` and ``reserved_bytes`` are the caches' own accounting of the
    tokens held and of the buffers allocated.  ``shape`` is the calculator's view of the module, with
    ``layers`` layers; ``elements_per_token_per_layer`` is read off the tensors the cache holds.
    """

    shape: ModelShape
    batch: int
    context: int
    dtype: str
    device: str
    method: str
    bytes: int
    tensor_bytes: int
    reserved_bytes: int
    elements_per_token_per_layer: int

    @property
    def layers(self) -> int:
        return self.shape.layers

    @property
    def bytes_per_token(self) -> float:
        """Measured bytes per cached token, over the layers measured: bytes / (b · T)."""
        return self.bytes / (self.batch * self.context)

    def bytes_for_layers(self, layers: int) -> float:
        """The measured bytes scaled to ``layers`` layers (every layer's cache is the same size)."""
        require_positive_int("layers", layers)
        return self.bytes * layers / self.layers


def measure_cache_bytes(
    module: nn.Module,
    batch: int,
    context: int,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cpu",
    *,
    layers: int = 1,
) -> MeasuredCache:
    """Fill ``layers`` caches of ``module`` (its own ``new_cache(capacity=context)``) and measure their bytes.

    Each cache gets ``context`` random tokens for ``batch`` sequences (no forward pass; the module's weights
    are never touched, so a module built on the meta device works).  On CUDA the figure is the change in
    ``torch.cuda.memory_allocated`` across the appends, synchronised before and after; the random rows are
    made and the allocator's cached free blocks released before the first reading, and the temporaries the
    appends make are freed before the second.  On the CPU it is the caches' tensor bytes.
    """
    module = require_attention(module)
    require_positive_int("batch", batch)
    require_positive_int("context", context)
    require_positive_int("layers", layers)
    dtype_name = dtype_short_name(dtype)
    device = resolve_device(device)
    rows = _random_rows(module, batch, context, DTYPES[dtype_name], device)
    caches = [module.new_cache(capacity=context) for _ in range(layers)]

    if device.type == "cuda":
        # Return cached free blocks first, so each buffer gets a block of its own (rounded) size rather
        # than a larger cached one, which memory_allocated would count whole.
        torch.cuda.empty_cache()
        _synchronize(device)
        before = torch.cuda.memory_allocated(device)
        for cache in caches:
            cache.append(*rows)
        _synchronize(device)
        measured, method = torch.cuda.memory_allocated(device) - before, MEASURED_BY_CUDA
    else:
        for cache in caches:
            cache.append(*rows)
        measured, method = sum(cache.nbytes for cache in caches), MEASURED_BY_TENSORS

    tensor_bytes = sum(cache.nbytes for cache in caches)
    element_size = DTYPES[dtype_name].itemsize
    return MeasuredCache(
        shape=ModelShape.from_module(module, layers=layers),
        batch=batch,
        context=context,
        dtype=dtype_name,
        device=str(device),
        method=method,
        bytes=measured,
        tensor_bytes=tensor_bytes,
        reserved_bytes=sum(cache.reserved_nbytes for cache in caches),
        # elements per token per layer = tensor bytes / (L · b · T · bytes per element)
        elements_per_token_per_layer=tensor_bytes // (layers * batch * context * element_size),
    )


def calculator_bytes(measured: MeasuredCache, shape: ModelShape | None = None) -> int:
    """The calculator's total bytes for ``shape`` (default: the measured module's) at the measured b, T, dtype."""
    shape = measured.shape if shape is None else shape
    return report(shape, context=measured.context, batch=measured.batch, dtype=measured.dtype)["variants"][0][
        "total_bytes"
    ]


def relative_difference(actual: float, expected: float) -> float:
    """|actual − expected| / expected, for a positive ``expected``."""
    if isinstance(expected, bool) or not isinstance(expected, int | float) or not expected > 0:
        raise ValueError(f"expected must be a positive number, got {expected!r}")
    return abs(actual - expected) / expected


def calculator_relative_difference(measured: MeasuredCache, shape: ModelShape | None = None) -> float:
    """How far the measurement is from the calculator: |measured − calculated| / calculated.

    With ``shape`` (a preset, say, with all of a model's layers), the measurement is first scaled from the
    layers measured to ``shape.layers``; ``shape`` must describe the same attention for the figures to agree.
    On the CPU the two agree exactly; on CUDA to within the allocator's rounding of each buffer.
    """
    shape = measured.shape if shape is None else shape
    return relative_difference(measured.bytes_for_layers(shape.layers), calculator_bytes(measured, shape))


# ---- how many tokens fit ----------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryBudget:
    """Bytes available for a cache on a device, and where the figure comes from."""

    free_bytes: int
    source: str


def device_memory_budget(device: str | torch.device = "cpu", *, stated_bytes: int | None = None) -> MemoryBudget:
    """The bytes a cache could use on ``device``.

    - ``stated_bytes`` given: that figure, on any device.
    - CUDA: the free bytes of ``torch.cuda.mem_get_info`` (free device memory, after everything allocated).
    - CPU: available physical pages × page size from ``os.sysconf`` (SC_AVPHYS_PAGES; total physical pages,
      SC_PHYS_PAGES, where the system does not report available ones).  This is the machine's figure: it
      ignores container memory limits, so state a budget where one applies.
    """
    device = resolve_device(device)
    if stated_bytes is not None:
        return MemoryBudget(require_non_negative_int("stated_bytes", stated_bytes), "stated budget")
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return MemoryBudget(int(free), f"torch.cuda.mem_get_info free bytes on {device}")
    page_size = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else -1
    for key, what in (("SC_AVPHYS_PAGES", "available"), ("SC_PHYS_PAGES", "total")):
        try:
            pages = os.sysconf(key)
        except (AttributeError, ValueError, OSError):
            continue
        if pages > 0 and page_size > 0:
            return MemoryBudget(pages * page_size, f"os.sysconf {key} × SC_PAGE_SIZE ({what} physical memory)")
    raise ValueError("this system reports no physical memory through os.sysconf; pass stated_bytes")


def tokens_that_fit(free_bytes: int, bytes_per_token: float) -> int:
    """How many tokens of cache fit in ``free_bytes``: ⌊free_bytes / bytes_per_token⌋.

    ``bytes_per_token`` is the cost of one token over all layers and sequences counted (e.g.
    ``report(...)["variants"][0]["bytes_per_token"]`` for one sequence of a whole model).
    """
    require_non_negative_int("free_bytes", free_bytes)
    if (
        isinstance(bytes_per_token, bool)
        or not isinstance(bytes_per_token, int | float)
        or not math.isfinite(bytes_per_token)
        or bytes_per_token <= 0
    ):
        raise ValueError(f"bytes_per_token must be a finite positive number, got {bytes_per_token!r}")
    if isinstance(bytes_per_token, int):
        return free_bytes // bytes_per_token
    # tokens = ⌊F / bytes_per_token⌋
    return math.floor(free_bytes / bytes_per_token)


# ---- timing and bandwidth -----------------------------------------------------------------------------
def time_call(
    step: Callable[[], object], device: str | torch.device = "cpu", *, warmup: int = 2, repeats: int = 5
) -> float:
    """Median seconds of one ``step()``, after ``warmup`` untimed calls.

    CUDA: each repeat is bracketed by CUDA events on the current stream and read after synchronising.
    CPU: ``time.perf_counter`` around each call.
    """
    if not callable(step):
        raise ValueError(f"step must be callable, got {type(step).__name__}")
    device = resolve_device(device)
    require_non_negative_int("warmup", warmup)
    require_positive_int("repeats", repeats)
    for _ in range(warmup):
        step()
    seconds = []
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                seconds.append(start.elapsed_time(end) / 1e3)  # elapsed_time is in ms
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _cache_batch(cache: Cache) -> int:
    held = cache.keys if isinstance(cache, KVCache) else cache.latent_and_rope_key
    return held.shape[0]


def time_decode_step(
    module: nn.Module, cache: Cache, x: torch.Tensor, *, warmup: int = 2, repeats: int = 5, **kwargs
) -> float:
    """Median seconds of one decode step ``module(x, cache, **kwargs)`` (e.g. ``path="absorbed"`` for MLA).

    Shapes: x (b, 1, d_model), on the module's device and in its dtype; ``cache`` a filled cache of the
    module's kind for the same b.  Every call appends one token, so the cache grows by warmup + repeats
    tokens: it must have been allocated with room for them (``fill_cache(..., capacity=T + warmup +
    repeats)``), or a step would time a buffer being regrown.  Runs under ``torch.no_grad()``.
    """
    module = require_attention(module)
    expected_cache = LatentCache if isinstance(module, MultiHeadLatentAttention) else KVCache
    if not isinstance(cache, expected_cache):
        raise ValueError(f"cache must be a {expected_cache.__name__} for {type(module).__name__}, got {type(cache)}")
    if cache.length == 0:
        raise ValueError("cache holds no tokens; fill it first (fill_cache) to time a step over a context")
    require_non_negative_int("warmup", warmup)
    require_positive_int("repeats", repeats)
    batch = _cache_batch(cache)
    if not isinstance(x, torch.Tensor) or x.shape != (batch, 1, module.d_model):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (b, 1, d_model) = {(batch, 1, module.d_model)}; got {got}")
    weight = next(module.parameters())
    if x.device != weight.device or x.dtype != weight.dtype:
        raise ValueError(
            f"x must be on the module's device and in its dtype ({weight.device}, {weight.dtype}); "
            f"got {x.device}, {x.dtype}"
        )
    steps = warmup + repeats
    # room left = reserved − held; one step appends b · elements_per_token · element_size bytes
    room = cache.reserved_nbytes - cache.nbytes
    if room < steps * batch * module.cache_elements_per_token() * x.element_size():
        raise ValueError(
            f"the cache has no room for the {steps} tokens that timing appends (it holds {cache.length}); "
            f"allocate it with capacity >= {cache.length + steps}"
        )
    with torch.no_grad():
        return time_call(lambda: module(x, cache, **kwargs), weight.device, warmup=warmup, repeats=repeats)

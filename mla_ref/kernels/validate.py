"""What a valid MLA decode call looks like: one ValueError per bad value, naming it and what is allowed.

Shapes (d_c = kv_lora_rank, d_R = the rope key's size, possibly 0):

    q            (batch, heads, d_c + d_R)          the queries, already moved into latent space
    cache        (batch, tokens, d_c + d_R)         contiguous: one row [c ; k^R] per token
                 (num_pages, page_size, d_c + d_R)  paged: rows live in pages named by block_table
    block_table  (batch, max_blocks)                integer page indices (paged layout only)
    lengths      (batch,)                           integer; sequence b uses its first lengths[b] rows

Checking ``lengths`` (and the block-table entries in use) reads their values, which on a GPU
is one small device-to-host copy per call.
"""

from __future__ import annotations

import math

import torch

from mla_ref._checks import require_positive_int

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)


def _require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)


def check_decode_inputs(
    q: torch.Tensor,
    cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    kv_lora_rank: int,
    softmax_scale: float,
    block_table: torch.Tensor | None = None,
) -> None:
    """Raise ValueError unless the arguments describe one valid decode step (shapes in the module docstring)."""
    q = _require_tensor("q", q)
    cache = _require_tensor("cache", cache)
    lengths = _require_tensor("lengths", lengths)
    paged = block_table is not None
    cache_layout = "(num_pages, page_size, d_c + d_R)" if paged else "(batch, tokens, d_c + d_R)"

    if q.ndim != 3 or 0 in q.shape:
        raise ValueError(f"q must have shape (batch, heads, d_c + d_R) with no empty axis, got {tuple(q.shape)}")
    if cache.ndim != 3 or 0 in cache.shape:
        raise ValueError(f"cache must have shape {cache_layout} with no empty axis, got {tuple(cache.shape)}")
    batch, _, width = q.shape
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q.dtype must be one of {_names(SUPPORTED_DTYPES)}; got {q.dtype}")
    if cache.dtype != q.dtype:
        raise ValueError(f"cache.dtype must equal q.dtype ({q.dtype}); got {cache.dtype}")
    if cache.shape[-1] != width:
        raise ValueError(f"cache rows must be as wide as q (d_c + d_R = {width}); got cache shape {tuple(cache.shape)}")
    require_positive_int("kv_lora_rank", kv_lora_rank)
    if kv_lora_rank > width:
        raise ValueError(f"kv_lora_rank must be at most the row width d_c + d_R = {width}; got {kv_lora_rank}")
    if (
        isinstance(softmax_scale, bool)
        or not isinstance(softmax_scale, int | float)
        or not math.isfinite(softmax_scale)
        or softmax_scale <= 0
    ):
        raise ValueError(
            f"softmax_scale must be a finite positive number (MLA uses 1/sqrt(d_N + d_R)); got {softmax_scale!r}"
        )
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape (batch,) = ({batch},); got {tuple(lengths.shape)}")
    if lengths.dtype not in INDEX_DTYPES:
        raise ValueError(f"lengths.dtype must be one of {_names(INDEX_DTYPES)}; got {lengths.dtype}")
    tensors = {"q": q, "cache": cache, "lengths": lengths}

    if paged:
        block_table = _require_tensor("block_table", block_table)
        if block_table.ndim != 2 or block_table.shape[0] != batch or block_table.shape[1] == 0:
            raise ValueError(
                f"block_table must have shape (batch, max_blocks) = ({batch}, ≥1); got {tuple(block_table.shape)}"
            )
        if block_table.dtype not in INDEX_DTYPES:
            raise ValueError(f"block_table.dtype must be one of {_names(INDEX_DTYPES)}; got {block_table.dtype}")
        tensors["block_table"] = block_table
        capacity = block_table.shape[1] * cache.shape[1]  # max_blocks · page_size
    else:
        if cache.shape[0] != batch:
            raise ValueError(f"cache batch size must equal q's ({batch}); got cache shape {tuple(cache.shape)}")
        capacity = cache.shape[1]

    devices = {name: tensor.device for name, tensor in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"q, cache, lengths (and block_table) must be on one device; got {devices}")

    shortest, longest = int(lengths.min()), int(lengths.max())
    if shortest < 1 or longest > capacity:
        raise ValueError(
            f"lengths must lie in [1, {capacity}] (the cache holds {capacity} rows per sequence); "
            f"got values from {shortest} to {longest}"
        )
    if paged:
        page_size, num_pages = cache.shape[1], cache.shape[0]
        # block j of sequence b is in use when it holds a token below lengths[b]
        in_use = torch.arange(block_table.shape[1], device=lengths.device)[None, :] * page_size < lengths[:, None]
        used_pages = block_table[in_use]
        if int(used_pages.min()) < 0 or int(used_pages.max()) >= num_pages:
            raise ValueError(
                f"block_table entries in use must be page indices in [0, {num_pages}); "
                f"got values from {int(used_pages.min())} to {int(used_pages.max())}"
            )

"""``mla_decode``: one decode step of absorbed MLA, on the backend asked for.

Backends, chosen per call (never a global, so one process can compare them):

- ``"torch"``: ``mla_decode_reference``, plain PyTorch, any device.
- ``"triton"``: the flash-decoding kernel in ``triton_decode``.  It runs on CUDA tensors, and on CPU
  tensors only under Triton's interpreter (TRITON_INTERPRET=1 set before that module is first imported).
- ``"auto"``: Triton on CUDA tensors when triton is installed, PyTorch everywhere else.

The Triton module is imported only when it is used, so mla_ref works without triton installed.
"""

from __future__ import annotations

from types import ModuleType
from typing import Literal

import torch

from mla_ref._checks import require_choice
from mla_ref.kernels.reference import mla_decode_reference
from mla_ref.kernels.validate import check_decode_inputs

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


def _triton_kernels(device: torch.device) -> ModuleType:
    """The Triton module, if it can run on ``device``; else a RuntimeError saying why and what to do."""
    try:
        from mla_ref.kernels import triton_decode
    except ImportError as error:
        raise RuntimeError(
            f"backend='triton' needs the triton package, which could not be imported ({error}); "
            "install triton or use backend='torch'"
        ) from error
    if device.type == "cuda":
        return triton_decode
    if device.type == "cpu":
        if triton_decode.INTERPRETED:
            return triton_decode
        raise RuntimeError(
            "backend='triton' got CPU tensors, which only Triton's interpreter can run: set TRITON_INTERPRET=1 "
            "before mla_ref.kernels.triton_decode is first imported, or use backend='torch'"
        )
    raise RuntimeError(
        f"backend='triton' runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); got device {device}"
    )


def _auto_backend(device: torch.device) -> str:
    if device.type != "cuda":
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"


def mla_decode(
    q: torch.Tensor,
    cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    kv_lora_rank: int,
    softmax_scale: float,
    block_table: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA decode attention over the latent cache, one new token per sequence.

    Shapes: q (b, h, d_c + d_R), the queries already in latent space; cache (b, t, d_c + d_R), rows
    [c ; k^R] whose first d_c columns are also the values, or, with block_table (b, max_blocks),
    pages (num_pages, page_size, d_c + d_R); lengths (b,), sequence b using its first lengths[b] rows.
    Returns out (b, h, d_c) in q's dtype and lse (b, h) fp32, lse = log Σ_t exp(scale · score_t).

    ``kv_lora_rank`` is d_c; ``softmax_scale`` is the caller's (MLA: 1/√(d_N + d_R), not 1/√d_c).
    Every argument is checked (a ValueError names the bad one); reading ``lengths`` for the check
    costs one small device-to-host copy on a GPU.
    """
    require_choice("backend", backend, BACKENDS)
    check_decode_inputs(
        q, cache, lengths, kv_lora_rank=kv_lora_rank, softmax_scale=softmax_scale, block_table=block_table
    )
    if backend == "auto":
        backend = _auto_backend(q.device)
    arguments = dict(kv_lora_rank=kv_lora_rank, softmax_scale=softmax_scale, block_table=block_table)
    if backend == "torch":
        return mla_decode_reference(q, cache, lengths, **arguments)
    return _triton_kernels(q.device).mla_decode_triton(q, cache, lengths, **arguments)

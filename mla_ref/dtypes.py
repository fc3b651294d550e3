"""The floating-point types mla_ref stores and computes in, named once.

``DTYPES`` maps the command line's short names (``--dtype bf16``) to torch; ``dtype_name`` gives torch's own name
(``"bfloat16"``), which config.json files, CONVERSION.md and mla_ref checkpoints record.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of ``dtype`` without its module: torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def dtype_short_name(dtype: torch.dtype | str) -> str:
    """The calculator's name of a cache dtype ("bf16", "fp16" or "fp32"), from a name or a torch.dtype."""
    for name, torch_dtype in DTYPES.items():
        if dtype == name or dtype == torch_dtype:
            return name
    allowed = ", ".join(f"{name!r} / {torch_dtype}" for name, torch_dtype in DTYPES.items())
    raise ValueError(f"dtype must be one of {allowed}; got {dtype!r}")

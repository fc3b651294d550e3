"""Writing a safetensors file one tensor at a time, so saving a model never holds a second copy of it.

``safetensors.torch.save_file`` first turns every tensor of the file into a ``bytes`` object, so writing a
model costs its size again in memory.  The format is simple enough to write as a stream instead:

    8 bytes     N, the header's length (unsigned little-endian)
    N bytes     JSON: {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
                padded with spaces to a multiple of 8
    the data    each tensor's bytes, row-major little-endian, in the order of the header's offsets

The header is known from shapes and dtypes alone; each tensor is then converted to the storage dtype (if
asked), written, and dropped, so the most this adds is one tensor.  Files read back with ``safe_open`` /
``load_file`` and with ``transformers``.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import torch

# torch dtype -> the safetensors dtype name
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> int:
    """Write ``tensors`` (floating ones converted to ``dtype`` when given) to the safetensors file ``path``.

    Returns the bytes of tensor data written.  Tensors sharing memory are written as separate copies
    (safetensors has no aliasing); drop a tied duplicate before calling.
    """
    if sys.byteorder != "little":  # the format is little-endian; torch's bytes are the machine's
        raise RuntimeError("writing safetensors needs a little-endian machine")

    def stored_dtype(tensor: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype

    header: dict[str, dict] = {}
    offset = 0
    for name, tensor in tensors.items():
        target = stored_dtype(tensor)
        if target not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {target}, which safetensors cannot store here")
        n_bytes = tensor.numel() * target.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[target],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + n_bytes],
        }
        offset += n_bytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned

    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for tensor in tensors.values():
            stored = tensor.detach().to(device="cpu", dtype=stored_dtype(tensor)).contiguous()
            # the tensor's own bytes, viewed (not copied) as a flat uint8 array
            file.write(stored.reshape(-1).view(torch.uint8).numpy().data)
            del stored
    return offset

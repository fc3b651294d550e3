"""The streaming safetensors writer: what it writes is what safetensors itself reads back, bit for bit."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mla_ref.hf.files import INDEX_FILE, WeightFiles, save_weights
from mla_ref.tensor_files import SAFETENSORS_DTYPES, write_safetensors


def _mixed_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(3, 5, generator=generator),
        "w.bf16": torch.randn(7, generator=generator).to(torch.bfloat16),
        "w.f16": torch.randn(2, 2, 2, generator=generator).to(torch.float16),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "strided": torch.randn(4, 6, generator=generator)[:, ::2],  # not contiguous
    }


def test_written_file_reads_back_exactly(tmp_path):
    tensors = _mixed_tensors()
    n_bytes = write_safetensors(tmp_path / "a.safetensors", tensors, metadata={"format": "pt"})
    assert n_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = load_file(str(tmp_path / "a.safetensors"))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as file:
        assert file.metadata() == {"format": "pt"}


def test_same_tensors_as_safetensors_own_writer(tmp_path):
    tensors = {k: v.contiguous() for k, v in _mixed_tensors().items()}
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    save_file(tensors, str(tmp_path / "theirs.safetensors"))
    ours, theirs = load_file(str(tmp_path / "ours.safetensors")), load_file(str(tmp_path / "theirs.safetensors"))
    for name in tensors:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)


def test_header_is_aligned_and_offsets_tile_the_data(tmp_path):
    path = tmp_path / "a.safetensors"
    write_safetensors(path, _mixed_tensors())
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert header_len % 8 == 0
    header = json.loads(raw[8 : 8 + header_len])
    spans = sorted(entry["data_offsets"] for entry in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - header_len
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))  # no holes, no overlaps


def test_floating_tensors_are_stored_at_the_requested_dtype(tmp_path):
    tensors = {"w": torch.randn(4, 4), "ids": torch.arange(3)}
    write_safetensors(tmp_path / "a.safetensors", tensors, dtype=torch.bfloat16)
    loaded = load_file(str(tmp_path / "a.safetensors"))
    assert loaded["w"].dtype == torch.bfloat16 and loaded["ids"].dtype == torch.int64
    torch.testing.assert_close(loaded["w"], tensors["w"].to(torch.bfloat16), rtol=0, atol=0)


def test_unsupported_dtype_is_refused_before_writing(tmp_path):
    assert torch.complex64 not in SAFETENSORS_DTYPES
    with pytest.raises(ValueError, match="'z' has dtype torch.complex64"):
        write_safetensors(tmp_path / "a.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})
    assert not (tmp_path / "a.safetensors").exists()


def test_sharded_weights_carry_an_index_and_read_back(tmp_path):
    tensors = {f"layer.{i}.weight": torch.full((64,), float(i)) for i in range(5)}  # 256 bytes each
    names = save_weights(tensors, tmp_path, max_shard_bytes=600)
    assert names[-1] == INDEX_FILE and len(names) == 4  # 2 + 2 + 1 tensors per shard
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 5 * 256 and set(index["weight_map"]) == set(tensors)
    weights = WeightFiles(tmp_path)
    for name, tensor in tensors.items():
        torch.testing.assert_close(weights.get(name), tensor, rtol=0, atol=0)

"""Checkpoint directories on disk: config.json, safetensors shards, tokenizer files, atomic writes.

A Hugging Face checkpoint directory holds ``config.json`` and the weights as one ``model.safetensors`` or as
shards listed in ``model.safetensors.index.json``.  ``WeightFiles`` reads one tensor at a time through
safetensors' ``safe_open``, opening the file for each read (an open handle keeps the file mapped), so a
conversion never holds more of the source than one layer.
Pickle files (``pytorch_model.bin``, ``*.pt`` …) are never opened: a directory holding only those is refused.

Outputs are written through ``mla_ref.outputs`` (a staging folder beside the target, renamed into place only
when complete), so an interrupted write leaves nothing at the target.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mla_ref.tensor_files import SAFETENSORS_DTYPES, write_safetensors

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
BYTE_VOCAB = 256  # a model without a tokenizer reads one token per byte
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files a conversion carries from source to output byte for byte: the tokenizer and generation defaults.
CARRIED_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# the safetensors dtype name -> torch dtype (the inverse of tensor_files.SAFETENSORS_DTYPES)
TORCH_DTYPE_OF_NAME: dict[str, torch.dtype] = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
FLOAT_DTYPE_NAMES: tuple[str, ...] = ("F64", "F32", "BF16", "F16")  # what a weight may be stored as


def read_config(directory: str | os.PathLike) -> dict:
    """``directory/config.json`` as a dict; ValueError when the directory or the file is missing or not JSON."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"checkpoint directory {str(root)!r} does not exist or is not a directory")
    path = root / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"checkpoint directory {str(root)!r} has no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(config).__name__}")
    return config


class WeightFiles:
    """The tensors of a checkpoint directory, read lazily by name from its safetensors file(s).

    ``names`` lists every stored tensor; ``shape(name)`` reads only the header; ``get(name)`` returns one
    tensor (in its stored dtype).  Refuses a directory without safetensors, naming any pickle files found.
    """

    def __init__(self, directory: str | os.PathLike):
        self.root = Path(directory)
        self._headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}  # shard -> name -> (dtype, shape)
        self._where = self._weight_map()  # tensor name -> file name

    def _weight_map(self) -> dict[str, str]:
        index = self.root / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{str(index)!r} is not a safetensors index (no 'weight_map'): {error}") from None
            missing = sorted({f for f in weight_map.values() if not (self.root / f).is_file()})
            if missing:
                raise ValueError(f"{str(index)!r} lists shard files that are not in the directory: {missing}")
            return dict(weight_map)
        shards = sorted(p.name for p in self.root.glob("*.safetensors"))
        if not shards:
            pickles = sorted(p.name for p in self.root.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise ValueError(
                    f"{str(self.root)!r} holds only pickle checkpoints {pickles}; mla_ref reads safetensors only and "
                    "never unpickles a file (convert the weights to safetensors first)"
                )
            raise ValueError(f"{str(self.root)!r} holds no *.safetensors weights")
        where: dict[str, str] = {}
        for shard in shards:
            for name in self._header(shard):
                if name in where:
                    raise ValueError(f"tensor {name!r} is stored twice: in {where[name]!r} and {shard!r}")
                where[name] = shard
        return where

    def _open(self, shard: str):
        """A safetensors handle on one shard.  Handles are not kept: an open handle keeps the file mapped, and
        every page read through it would stay in this process's resident memory."""
        try:
            return safe_open(str(self.root / shard), framework="pt")
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{str(self.root / shard)!r} is not a readable safetensors file: {error}") from None

    def _header(self, shard: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        if shard not in self._headers:
            with self._open(shard) as handle:
                self._headers[shard] = {
                    name: (handle.get_slice(name).get_dtype(), tuple(handle.get_slice(name).get_shape()))
                    for name in handle.keys()
                }
        return self._headers[shard]

    @property
    def names(self) -> set[str]:
        return set(self._where)

    def _entry(self, name: str) -> tuple[str, tuple[int, ...]]:
        if name not in self._where:
            raise ValueError(f"{str(self.root)!r} has no tensor {name!r}")
        header = self._header(self._where[name])
        if name not in header:
            raise ValueError(f"{INDEX_FILE} puts tensor {name!r} in {self._where[name]!r}, which does not hold it")
        return header[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def stored_dtype_name(self, name: str) -> str:
        """The safetensors dtype name of one tensor (``F32``, ``BF16``, ``I16`` …), read from the header only."""
        return self._entry(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of one tensor, read from the header only."""
        return TORCH_DTYPE_OF_NAME.get(self._entry(name)[0], torch.float32)

    def get(self, name: str) -> torch.Tensor:
        """One tensor as stored; a ValueError naming it when it holds NaN or infinite values."""
        self._entry(name)
        with self._open(self._where[name]) as handle:
            tensor = handle.get_tensor(name)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{str(self.root)!r}: tensor {name!r} holds NaN or infinite values")
        return tensor


def check_tensors(weights: WeightFiles, expected: dict[str, tuple[int, ...]], ignored: tuple[str, ...] = ()) -> None:
    """Refuse missing tensors, tensors the config does not describe, and shapes that disagree with it.

    ``ignored``: name suffixes that may be present and are skipped (e.g. stale ``rotary_emb.inv_freq`` buffers).
    """
    present = {name for name in weights.names if not name.endswith(ignored)}
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected))
    if missing:
        raise ValueError(f"{str(weights.root)!r} is missing tensors the config needs: {missing[:8]}")
    if extra:
        raise ValueError(f"{str(weights.root)!r} has tensors the config does not describe: {extra[:8]}")
    for name, shape in expected.items():
        if weights.shape(name) != tuple(shape):
            raise ValueError(
                f"{str(weights.root)!r}: tensor {name!r} has shape {weights.shape(name)}, the config needs {tuple(shape)}"
            )
        stored = weights.stored_dtype_name(name)
        if stored not in FLOAT_DTYPE_NAMES:
            raise ValueError(
                f"{str(weights.root)!r}: tensor {name!r} is stored as {stored}; weights must be floating point "
                f"({', '.join(FLOAT_DTYPE_NAMES)})"
            )


def carried_files(directory: str | os.PathLike) -> list[Path]:
    """The tokenizer and generation files of ``directory`` that an export or conversion copies untouched."""
    root = Path(directory)
    return [root / name for name in CARRIED_FILES if (root / name).is_file()]


@functools.lru_cache(maxsize=4)
def _read_tokenizer(path: str, _mtime_ns: int, _size: int):
    """The ``tokenizers`` Tokenizer of ``path``, read once per version of the file (a conversion tokenizes dozens of
    calibration files with it; reading SmolLM2's 3.5 MB tokenizer.json each time took 0.1 s)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError(
            f"{str(Path(path).parent)!r} has a tokenizer.json; reading it needs the 'tokenizers' package "
            "(pip install 'mla_ref[hf]')"
        ) from None
    try:
        return Tokenizer.from_file(path)
    except Exception as error:  # the tokenizers package raises a bare Exception for a file it cannot parse
        raise ValueError(f"{path!r} is not a tokenizer the 'tokenizers' package reads: {error}") from None


def text_tokens(directory: str | os.PathLike, data: torch.Tensor | bytes, vocab_size: int) -> torch.Tensor:
    """Token ids of ``data`` (bytes, or a uint8 tensor of them) for the model in ``directory``.

    With a ``tokenizer.json`` the text (UTF-8) is tokenized by the ``tokenizers`` package, without special
    tokens; otherwise every byte is one token, as the lab's byte-level teachers read text.  Returns (n,) int64.
    """
    raw = bytes(data.numpy().tobytes()) if isinstance(data, torch.Tensor) else bytes(data)
    tokenizer_file = Path(directory) / "tokenizer.json"
    if tokenizer_file.is_file():
        stat = tokenizer_file.stat()
        tokenizer = _read_tokenizer(str(tokenizer_file.resolve()), stat.st_mtime_ns, stat.st_size)
        ids = tokenizer.encode(raw.decode("utf-8", errors="replace"), add_special_tokens=False).ids
        tokens = torch.tensor(ids, dtype=torch.long)
    else:
        # without a tokenizer every byte is a token, which is right only for a byte-level model: a real model's
        # ids read as bytes would give a perplexity (and a calibration) of nonsense without any error
        if vocab_size != BYTE_VOCAB:
            raise ValueError(
                f"{str(directory)!r} has no tokenizer.json and a vocabulary of {vocab_size} tokens; only a byte-level "
                f"model (a vocabulary of exactly {BYTE_VOCAB}) reads text without one: copy the model's "
                "tokenizer.json into the directory"
            )
        tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    if tokens.numel() and int(tokens.max()) >= vocab_size:
        raise ValueError(
            f"the tokenizer of {str(directory)!r} produced id {int(tokens.max())} ≥ vocab_size {vocab_size}"
        )
    return tokens


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_weights(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = 2**31) -> list[str]:
    """Write ``tensors`` as ``model.safetensors``, or as shards with ``model.safetensors.index.json`` when they
    exceed ``max_shard_bytes`` (files stay a size that tools copy and upload comfortably; memory does not
    depend on it, since each tensor is streamed to disk on its own).  Returns the file names written."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        write_safetensors(directory / "model.safetensors", tensors, metadata={"format": "pt"})
        return ["model.safetensors"]
    groups, size = [[]], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, names = {}, []
    for index, group in enumerate(groups):
        file_name = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(directory / file_name, {name: tensors[name] for name in group}, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file_name))
        names.append(file_name)
    write_json(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*names, INDEX_FILE]


def copy_carried_files(source: str | os.PathLike, destination: Path) -> list[str]:
    """Copy the tokenizer and generation files of ``source`` into ``destination``; return their names."""
    copied = []
    for path in carried_files(source):
        shutil.copyfile(path, destination / path.name)
        copied.append(path.name)
    return copied

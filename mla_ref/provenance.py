"""Which model a converted directory was made from: the source's absolute path and fingerprint, recorded and checked.

``convert`` records both in CONVERSION.md; ``recover`` and ``kv-cache --compare`` find the source by the recorded
absolute path (never by a path relative to wherever they are run) and check any source they are given or find
against the fingerprint, so neither trains towards, nor compares with, a different model that happens to share a
name.

The fingerprint is the SHA-256 of ``config.json`` and of the bytes of two tensors that any change of model
changes: the token embedding and the first layer's MLP (found by name in any layout mla_ref reads: a Hugging Face
``model.embed_tokens.weight`` and an mla_ref ``embed_tokens.weight`` alike).  Reading them costs a fraction of a
second on SmolLM2-135M.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import safe_open

from mla_ref.records import CONVERSION_RECORD, read_record

FINGERPRINTED = ("embed_tokens.weight", "layers.0.mlp.")  # name parts of the tensors hashed besides config.json


def _safetensors_names(root: Path) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for path in sorted(root.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            names.update(dict.fromkeys(handle.keys(), path))
    return names


def fingerprint(directory: str | os.PathLike) -> str:
    """SHA-256 (hex) of ``directory``'s config.json and its embedding and first-MLP tensors."""
    root = Path(directory)
    digest = hashlib.sha256((root / "config.json").read_bytes())
    names = _safetensors_names(root)
    for part in FINGERPRINTED:
        for name in sorted(n for n in names if part in n):
            with safe_open(str(names[name]), framework="pt") as handle:
                tensor = handle.get_tensor(name)
            digest.update(name.encode())
            digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def source_facts(source: str | os.PathLike) -> dict:
    """What CONVERSION.md records of a source: its absolute path and its fingerprint."""
    return {"source_path": str(Path(source).resolve()), "source_fingerprint": fingerprint(source)}


def recorded_source(converted: str | os.PathLike) -> tuple[Path | None, str | None]:
    """The source named by ``converted``'s CONVERSION.md (absolute path, fingerprint); ``(None, None)`` for none.

    Records written before the absolute path was kept name the source as it was typed: such a relative path
    cannot be trusted from another directory, so it is not returned.
    """
    record = Path(converted) / CONVERSION_RECORD
    if not record.is_file():
        return None, None
    facts = read_record(record)
    path = facts.get("source_path")
    if not isinstance(path, str):
        typed = facts.get("source")
        path = typed if isinstance(typed, str) and Path(typed).is_absolute() else None
    recorded = facts.get("source_fingerprint")
    return (Path(path) if path else None), (recorded if isinstance(recorded, str) else None)


def check_source(converted: str | os.PathLike, source: str | os.PathLike, expected: str | None) -> None:
    """Refuse a ``source`` whose fingerprint differs from the one ``converted``'s record holds (when it holds one)."""
    if expected is None:
        return
    found = fingerprint(source)
    if found != expected:
        raise ValueError(
            f"{str(source)!r} is not the model {str(converted)!r} was converted from: its fingerprint "
            f"{found[:16]}… differs from the {expected[:16]}… its {CONVERSION_RECORD} records (config.json, "
            "embedding and first MLP); pass the source it was converted from"
        )

"""What a conversion reads: a Llama-layout directory or an mla_ref checkpoint of the GQA family.

Both offer the same few things, so the conversion does not care which it reads: ``config`` (the TinyLM
config), ``hf_config`` (the raw config.json of a Hugging Face source, else empty), ``max_positions``,
``storage_dtype()``, ``stored(name)`` / ``tensor(name)`` (one tensor by its TinyLM name, as stored / as
fp32) and ``block(i)`` (layer i as an fp32 module).  A Hugging Face source is read one tensor at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mla_ref import checkpoint
from mla_ref.hf.files import read_config
from mla_ref.hf.llama import DEFAULT_MAX_POSITIONS, GQA_MODEL_TYPES, LlamaCheckpoint
from mla_ref.model import Block


class MlaRefSource:
    """An mla_ref checkpoint of the GQA family, read as a conversion source (it is small: loaded whole)."""

    def __init__(self, directory: str | os.PathLike):
        self.root = Path(directory)
        self.model = checkpoint.load(directory)
        self.config = self.model.config
        if self.config.attention == "mla":
            raise ValueError(f"{str(directory)!r} is already an MLA model; convert a model of the GQA family")
        self.hf_config: dict = {}
        self.max_positions = DEFAULT_MAX_POSITIONS

    def storage_dtype(self) -> torch.dtype:
        return checkpoint.read_config(self.root)[1]

    def stored(self, name: str) -> torch.Tensor:
        return self.model.state_dict()[name]

    def tensor(self, name: str) -> torch.Tensor:
        return self.stored(name).float()

    def block(self, layer: int) -> Block:
        return self.model.layers[layer]


def open_source(directory: str | os.PathLike) -> LlamaCheckpoint | MlaRefSource:
    """A conversion source: a llama / qwen2 / mistral directory, or an mla_ref checkpoint of the GQA family."""
    hf_config = read_config(directory)
    model_type = hf_config.get("model_type")
    if model_type in GQA_MODEL_TYPES:
        return LlamaCheckpoint(directory)
    if model_type is None and "attention" in hf_config:
        return MlaRefSource(directory)
    raise ValueError(
        f"{str(directory)!r}: unknown model_type {model_type!r}; a conversion reads {', '.join(GQA_MODEL_TYPES)} "
        "or an mla_ref checkpoint of the GQA family"
    )

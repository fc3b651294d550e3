"""Whole models in and out of any directory mla_ref reads: ``load_model`` and ``export_model``.

``load_model`` reads an mla_ref checkpoint, a llama / qwen2 / mistral directory or a dense DeepSeek-V3 one (as
``convert`` writes), so every command that takes a model directory works on all of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mla_ref import checkpoint
from mla_ref.hf.deepseek import MLA_MODEL_TYPE, deepseek_config, deepseek_tensors, load_deepseek
from mla_ref.hf.files import (
    WeightFiles,
    copy_carried_files,
    read_config,
    save_weights,
    write_json,
)
from mla_ref.hf.llama import DEFAULT_MAX_POSITIONS, GQA_MODEL_TYPES, llama_config, llama_tensors, load_llama
from mla_ref.model import TinyLM
from mla_ref.outputs import check_output, staged_output

EXPORT_FORMATS: tuple[str, ...] = ("llama", "qwen2", "deepseek-v3")


def load_model(directory: str | os.PathLike) -> TinyLM:
    """Any supported directory as an fp32 TinyLM in eval mode: an mla_ref checkpoint, a llama / qwen2 / mistral
    checkpoint, or a dense DeepSeek-V3 checkpoint (as ``convert`` writes)."""
    config = read_config(directory)
    model_type = config.get("model_type")
    if model_type in GQA_MODEL_TYPES:
        return load_llama(directory)
    if model_type == MLA_MODEL_TYPE:
        return load_deepseek(directory)
    if model_type is None and "attention" in config:
        return checkpoint.load(directory)
    raise ValueError(
        f"{str(directory)!r}: unknown model_type {model_type!r}; allowed: {', '.join((*GQA_MODEL_TYPES, MLA_MODEL_TYPE))} "
        "or an mla_ref checkpoint"
    )


def storage_dtype(directory: str | os.PathLike) -> torch.dtype:
    """The dtype the weights of ``directory`` are stored in."""
    config = read_config(directory)
    if config.get("model_type") is None:
        return checkpoint.read_config(directory)[1]
    weights = WeightFiles(directory)
    return weights.dtype(sorted(weights.names)[0])


def save_mla_weights(model: TinyLM, directory: Path, model_format: str, dtype: torch.dtype) -> None:
    """An MLA ``model``'s weights into ``directory`` at ``dtype``: model.safetensors in DeepSeek-V3 names
    ("deepseek-v3"; config.json is the caller's to write), or mla_ref's own checkpoint files ("mla-ref")."""
    if model_format == "deepseek-v3":
        save_weights(deepseek_tensors(model, dtype), directory)
        return
    saved = checkpoint.save(model, directory / "checkpoint", dtype=dtype)
    for path in saved.iterdir():  # its files sit in the directory itself
        path.rename(directory / path.name)
    saved.rmdir()


def export_model(
    source_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    model_format: str,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> TinyLM:
    """Write the model of ``source_dir`` in a Hugging Face layout (``model_format`` in EXPORT_FORMATS).

    llama / qwen2: a model of the GQA family (qwen2 for one with q/k/v biases); deepseek-v3: an MLA model
    already in stock form (``convert`` produces those from any source).  Tokenizer files are carried along.
    Returns the model that was written.
    """
    if model_format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}; got {model_format!r}")
    check_output(output_dir, inputs=[source_dir], overwrite=overwrite)
    model = load_model(source_dir)
    dtype = dtype or storage_dtype(source_dir)
    source_config = read_config(source_dir)
    max_positions = int(source_config.get("max_position_embeddings") or DEFAULT_MAX_POSITIONS)
    if model_format == "deepseek-v3":
        tensors = deepseek_tensors(model, dtype)
        config = deepseek_config(
            model.config, dtype=dtype, attention_bias=model.config.attention_bias, max_positions=max_positions
        )
    else:
        config = llama_config(model.config, model_format, dtype, max_positions)
        tensors = llama_tensors(model, dtype)
    with staged_output(output_dir, overwrite=overwrite) as staging:
        write_json(staging / "config.json", config)
        save_weights(tensors, staging)
        copy_carried_files(source_dir, staging)
    return model

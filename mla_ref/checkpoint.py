"""Save and load a TinyLM as ``config.json`` + ``model.safetensors`` (nothing is ever unpickled).

``save`` writes into a staging folder beside the target and renames it into place
(``mla_ref.outputs``), so a crash never leaves a half-written checkpoint.  ``load`` checks the tensors against
what the config says the model holds — names, shapes, finiteness — and refuses anything
else with a ValueError that names the problem.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mla_ref.dtypes import dtype_name
from mla_ref.model import ModelConfig, TinyLM
from mla_ref.outputs import check_output, staged_output
from mla_ref.tensor_files import write_safetensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STORAGE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _tensors_to_save(model: TinyLM) -> dict[str, torch.Tensor]:
    """The state dict with a tied head stored once (under embed_tokens)."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    return state


def save(
    model: TinyLM,
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` (at ``dtype``) and any ``extra_files`` (name -> text).

    Refuses an existing non-empty ``directory`` unless ``overwrite`` (``mla_ref.outputs.check_output``).  Returns the directory.
    """
    if dtype not in STORAGE_DTYPES.values():
        raise ValueError(f"dtype must be one of {list(STORAGE_DTYPES)}, got {dtype}")
    target = check_output(directory, overwrite=overwrite, name="checkpoint directory")
    for name in extra_files or {}:
        if name in (CONFIG_FILE, WEIGHTS_FILE) or Path(name).name != name:
            raise ValueError(f"extra file name {name!r} must be a plain file name other than the checkpoint's own")
    with staged_output(target, overwrite=overwrite) as staging:
        config = {**model.config.to_dict(), "storage_dtype": dtype_name(dtype)}
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors(staging / WEIGHTS_FILE, _tensors_to_save(model), dtype=dtype, metadata={"format": "pt"})
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
    return target


def read_config(directory: str | os.PathLike) -> tuple[ModelConfig, torch.dtype]:
    """The model config and storage dtype recorded in ``directory/config.json``."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise ValueError(f"checkpoint directory {str(directory)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"checkpoint {str(directory)!r} has no {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object")
    storage = data.pop("storage_dtype", "float32")
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"{str(path)!r}: storage_dtype must be one of {list(STORAGE_DTYPES)}, got {storage!r}")
    return ModelConfig.from_dict(data), STORAGE_DTYPES[storage]


def load(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> TinyLM:
    """Rebuild the model saved in ``directory``, its weights cast to ``dtype``; the model is in eval mode."""
    config, _ = read_config(directory)
    weights_path = Path(directory) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ValueError(f"checkpoint {str(directory)!r} has no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{str(weights_path)!r} is not a readable safetensors file: {error}") from None
    model = TinyLM(config)
    expected = {name: t.shape for name, t in _tensors_to_save(model).items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise ValueError(f"{str(weights_path)!r} is missing tensors {missing}")
    if extra:
        raise ValueError(f"{str(weights_path)!r} has tensors the config does not describe: {extra}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(
                f"{str(weights_path)!r}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"the config needs {tuple(shape)}"
            )
        if not tensors[name].is_floating_point():
            raise ValueError(
                f"{str(weights_path)!r}: tensor {name!r} is stored as {tensors[name].dtype}; weights must be floating point"
            )
        if not torch.isfinite(tensors[name]).all():
            raise ValueError(f"{str(weights_path)!r}: tensor {name!r} holds NaN or infinite values")
    model.load_state_dict(tensors, strict=not config.tie_embeddings)
    return model.to(dtype).eval()

"""A llama.cpp GGUF file as a Hugging Face Llama directory: config.json, model.safetensors and the tokenizer.

``convert_gguf`` reads the file with the ``gguf`` package (the format's own reader), dequantizes every tensor
(``gguf.quants.dequantize``), renames the tensors to Hugging Face's, undoing llama.cpp's q/k row permutation
(``unpermute_rows``), and rebuilds the tokenizer from the GGUF's vocabulary and merges.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from mla_ref.dtypes import dtype_name
from mla_ref.hf.files import CONFIG_FILE, save_weights, write_json
from mla_ref.hf.llama import expected_shapes, llama_config
from mla_ref.model import ModelConfig

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
GGUF_LAYER_TENSORS: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GGUF_MODEL_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# llama.cpp's pre-tokenizers that transformers' GGUF reader does not rebuild, as tokenizer.json writes them.
# "smollm" (like "starcoder") splits every digit off before GPT-2's byte-level regex.
DIGITS_THEN_BYTE_LEVEL: dict = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}
UNQUANTIZED_TYPES: tuple[str, ...] = ("F32", "F16", "BF16", "F64")
# What each GGUF storage type holds, for MODEL.md (a block of 32 weights shares its scale d and offset m).
GGUF_TYPES: dict[str, str] = {
    "F32": "fp32",
    "F16": "fp16",
    "BF16": "bf16",
    "Q8_0": "8-bit Q8_0: d·q, q an 8-bit integer, d fp16",
    "Q4_0": "4-bit Q4_0: d·(q − 8), q a 4-bit integer, d fp16",
    "Q4_1": "4-bit Q4_1: d·q + m, q a 4-bit integer, d and m fp16",
    "Q5_0": "5-bit Q5_0: d·(q − 16), q a 5-bit integer, d fp16",
    "Q5_1": "5-bit Q5_1: d·q + m, q a 5-bit integer, d and m fp16",
}
PRE_TOKENIZERS: dict[str, dict | None] = {
    "smollm": DIGITS_THEN_BYTE_LEVEL,
    "starcoder": DIGITS_THEN_BYTE_LEVEL,
    "gpt2": None,  # None: transformers' own rebuild (GPT-2's byte-level regex) is already right
}


# ---- GGUF -> Hugging Face Llama ------------------------------------------------------------------------------
def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_model_config(reader) -> ModelConfig:
    """The TinyLM config of a llama-architecture GGUF (``gguf.GGUFReader``); refuses what a Llama layout cannot
    hold: another architecture, partial rotary, RoPE scaling."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; allowed: 'llama'")
    d_model = int(_field(reader, "llama.embedding_length"))
    n_heads = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_heads))
    head_dim = int(_field(reader, "llama.attention.key_length", d_model // n_heads))
    rotary = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ValueError(f"GGUF rope.dimension_count {rotary} differs from head_dim {head_dim} (partial rotary)")
    names = {t.name for t in reader.tensors}
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in names:
        raise ValueError(f"GGUF RoPE scaling {scaling!r} (or a rope_freqs tensor) is not supported; allowed: 'none'")
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return ModelConfig(
        vocab_size=int(embedding.shape[1]),  # GGUF shapes list the fastest-varying dimension first
        d_model=d_model,
        n_layers=int(_field(reader, "llama.block_count")),
        n_heads=n_heads,
        head_dim=head_dim,
        mlp_hidden=int(_field(reader, "llama.feed_forward_length")),
        attention="mha" if n_kv == n_heads else "gqa",
        n_kv_heads=None if n_kv == n_heads else n_kv,
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        # GGUF stores ε as float32 (1e-5 reads 9.9999997e-06): keep the shortest decimal that is the same float32
        norm_eps=float(str(np.float32(_field(reader, "llama.attention.layer_norm_rms_epsilon")))),
        tie_embeddings="output.weight" not in names,
    )


def unpermute_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: GGUF layout -> Hugging Face (rotate-half) layout.

    llama.cpp rotates adjacent pairs (2j, 2j + 1) of a head; Hugging Face rotates (j, j + d_h/2).  Its converter
    therefore interleaves each head's two halves: GGUF row (h, j, t) holds Hugging Face row (h, t, j), for
    t ∈ {0, 1} and j < d_h/2.  Shapes: (n_heads · d_h, d_in) -> the same.
    """
    return rearrange(weight, "(h half two) c -> (h two half) c", h=n_heads, two=2)


def gguf_tensors(reader, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor of a llama GGUF, dequantized to fp32, under its Hugging Face name, q/k rows unpermuted.

    Shapes follow Hugging Face: (out, in) for projections, (vocab, d_model) for the embedding.  Any tensor
    the Llama layout does not name is refused, as is a set that disagrees with ``config``.
    """
    from gguf.quants import dequantize  # the format's own reader; imported on use (extra "real")

    tensors: dict[str, torch.Tensor] = {}
    for item in reader.tensors:
        if item.name in GGUF_MODEL_TENSORS:
            name = GGUF_MODEL_TENSORS[item.name]
        else:
            parts = item.name.split(".", 2)  # "blk", layer, e.g. "attn_q.weight"
            if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit() or parts[2] not in GGUF_LAYER_TENSORS:
                raise ValueError(f"GGUF tensor {item.name!r} has no place in the Llama layout")
            name = f"model.layers.{int(parts[1])}.{GGUF_LAYER_TENSORS[parts[2]]}"
        # (…, in) numpy, dims reversed from GGUF's listing; copied out of the memory-mapped file
        values = torch.from_numpy(np.array(dequantize(item.data, item.tensor_type), dtype=np.float32))
        if name.endswith("q_proj.weight"):
            values = unpermute_rows(values, config.n_heads)
        elif name.endswith("k_proj.weight"):
            values = unpermute_rows(values, config.kv_heads)
        tensors[name] = values
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"the GGUF lacks tensors a Llama of its config needs: {missing[:8]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"GGUF tensor for {name!r} has shape {tuple(tensors[name].shape)}; expected {shape}")
    return tensors


def gguf_hf_config(reader, config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json of the GGUF in Llama layout: the repository's writer, with the special tokens and the
    context length the GGUF records."""
    data = llama_config(config, "llama", dtype, int(_field(reader, "llama.context_length", 2048)))
    for key in ("bos", "eos", "padding"):
        value = _field(reader, f"tokenizer.ggml.{key}_token_id")
        data["pad_token_id" if key == "padding" else f"{key}_token_id"] = None if value is None else int(value)
    data["torch_dtype"] = dtype_name(dtype)  # transformers < 5 reads this name; ≥ 5 reads "dtype"
    return data


def write_tokenizer(gguf_path: Path, reader, directory: Path) -> list[str]:
    """The GGUF's tokenizer as Hugging Face files (tokenizer.json, tokenizer_config.json, chat template).

    transformers rebuilds the vocabulary, merges and special tokens from the GGUF; the pre-tokenizer, which
    llama.cpp records only by name, is set here from ``PRE_TOKENIZERS`` (an unknown name is refused rather
    than tokenized differently from training).  Returns the names written.
    """
    from transformers import AutoTokenizer

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported; allowed: 'gpt2' (byte-level BPE)")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; allowed: {', '.join(PRE_TOKENIZERS)}")
    before = set(os.listdir(directory))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(directory))
    if PRE_TOKENIZERS[pre] is not None:
        _update_json(directory / "tokenizer.json", pre_tokenizer=PRE_TOKENIZERS[pre])
    # transformers ≥ 5 names its generic class here, which earlier versions do not know; GPT-2's class loads
    # this tokenizer.json unchanged in both (and is what the original checkpoints name)
    _update_json(directory / "tokenizer_config.json", tokenizer_class="GPT2Tokenizer")
    return sorted(set(os.listdir(directory)) - before)


def _update_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def convert_gguf(
    gguf_path: str | os.PathLike, directory: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> dict:
    """Write the llama GGUF at ``gguf_path`` into the existing folder ``directory`` as a Hugging Face Llama
    checkpoint: config.json, model.safetensors (at ``dtype``), generation_config.json, tokenizer files.

    Returns a summary: the config, the GGUF's name and pre-tokenizer, and per GGUF storage type the number of
    tensors and their kinds (e.g. {"Q8_0": {"tensors": 1, "kinds": ["token_embd"]}}).
    """
    from gguf import GGUFReader

    gguf_path, directory = Path(gguf_path), Path(directory)
    reader = GGUFReader(str(gguf_path))
    config = gguf_model_config(reader)
    tensors = gguf_tensors(reader, config)
    stored: dict[str, dict] = {}  # GGUF storage type -> {"tensors": count, "kinds": names without "blk.N."}
    for item in reader.tensors:
        kind = item.name.split(".", 2)[2] if item.name.startswith("blk.") else item.name
        entry = stored.setdefault(item.tensor_type.name, {"tensors": 0, "kinds": []})
        entry["tensors"] += 1
        if kind.removesuffix(".weight") not in entry["kinds"]:
            entry["kinds"].append(kind.removesuffix(".weight"))
    hf_config = gguf_hf_config(reader, config, dtype)
    write_json(directory / CONFIG_FILE, hf_config)
    save_weights({name: t.to(dtype) for name, t in tensors.items()}, directory)
    del tensors
    generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config[k] is not None}
    write_json(directory / "generation_config.json", generation)
    write_tokenizer(gguf_path, reader, directory)
    return {
        "config": config,
        "stored_types": stored,
        "name": _field(reader, "general.name"),
        "pre_tokenizer": _field(reader, "tokenizer.ggml.pre", "default"),
    }


# ---- measuring and recording --------------------------------------------------------------------------------

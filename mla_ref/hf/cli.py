"""The command line of checkpoint conversion: ``python -m mla_ref convert …`` and ``python -m mla_ref export …``.

Both print one ``error: …`` line and return 2 on bad input, and 0 on success.  ``load_model`` reads any
directory they (or ``train-teacher``) write, so ``eval`` and ``kv-cache`` work on all of them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import torch

from mla_ref import checkpoint
from mla_ref.hf.convert import FORMATS, METHODS, ConvertOptions, convert_checkpoint
from mla_ref.hf.deepseek import MLA_MODEL_TYPE, deepseek_config, deepseek_tensors, load_deepseek
from mla_ref.hf.files import (
    TORCH_DTYPES,
    WeightFiles,
    copy_carried_files,
    read_config,
    save_weights,
    staged_directory,
    write_json,
)
from mla_ref.hf.llama import DEFAULT_MAX_POSITIONS, GQA_MODEL_TYPES, llama_config, llama_tensors, load_llama
from mla_ref.hf.stock import NORM_MODES
from mla_ref.model import TinyLM

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
    with staged_directory(output_dir, overwrite=overwrite) as staging:
        write_json(staging / "config.json", config)
        save_weights(tensors, staging)
        copy_carried_files(source_dir, staging)
    return model


class _UsageError(Exception):
    """An argument argparse rejected; the command prints it on one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise _UsageError(message)


def _run(parser: argparse.ArgumentParser, argv: list[str] | None, action) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
        action(args, argv)
    except (_UsageError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    return 0


def convert_command(argv: list[str] | None = None) -> int:
    """``python -m mla_ref convert SRC OUT [--method …] …``"""
    parser = _Parser(
        prog="python -m mla_ref convert",
        description="Convert a llama / qwen2 / mistral checkpoint (or an mla_ref GQA-family checkpoint) to MLA, "
        "layer by layer, and report what it costs against the source.",
    )
    parser.add_argument("source", metavar="SRC", help="Hugging Face checkpoint directory, or an mla_ref checkpoint")
    parser.add_argument("output", metavar="OUT", help="output directory (written only when complete)")
    parser.add_argument("--method", choices=METHODS, default="exact", help="conversion (default: exact)")
    parser.add_argument("--kv-lora-rank", type=int, default=None, help="d_c, the cached latent (transmla / mha2mla)")
    parser.add_argument("--rope-dim", type=int, default=None, help="d_R, the shared roped key (transmla / mha2mla)")
    parser.add_argument("--q-lora-rank", type=int, default=None, help="low-rank query bottleneck (default: none)")
    parser.add_argument("--freqfold", type=int, default=1, help="TransMLA's FreqFold F (default 1)")
    parser.add_argument(
        "--no-refit",
        action="store_true",
        help="keep the method's own o_proj (default: re-solve it by least squares against the source layer); "
        "a better start for a model that will be fine-tuned",
    )
    parser.add_argument(
        "--norm", choices=NORM_MODES, default="gain", help="RMS-normalised bottlenecks: least-squares gains, or an "
        "anchored extra coordinate that keeps them exact for one more element (default: gain)"
    )  # fmt: skip
    parser.add_argument("--calib-dir", default=None, help="folder of text (default: the Python standard library)")
    parser.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens of the quality report (0: skip it)")
    parser.add_argument("--seq-len", type=int, default=256, help="window length of calibration and evaluation")
    parser.add_argument(
        "--dtype", choices=tuple(TORCH_DTYPES), default=None, help="stored weights (default: the source's)"
    )
    parser.add_argument("--format", choices=FORMATS, default="deepseek-v3", help="output layout (default deepseek-v3)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no report on stdout")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")

    def action(args, argv):
        options = ConvertOptions(
            method=args.method,
            kv_lora_rank=args.kv_lora_rank,
            rope_dim=args.rope_dim,
            q_lora_rank=args.q_lora_rank,
            freqfold=args.freqfold,
            refit=not args.no_refit,
            norm=args.norm,
            format=args.format,
            dtype=args.dtype,
            calib_dir=args.calib_dir,
            calib_tokens=args.calib_tokens,
            eval_tokens=args.eval_tokens,
            seq_len=args.seq_len,
        )
        report = convert_checkpoint(
            args.source,
            args.output,
            options,
            overwrite=args.overwrite,
            quiet=args.quiet,
            command="python -m mla_ref convert " + shlex.join(argv),
        )
        if not args.quiet:
            print(f"wrote {args.output} ({args.format}, {report.seconds:.1f} s)")
            for line in report.summary_lines():
                print("  " + line)

    return _run(parser, argv, action)


def export_command(argv: list[str] | None = None) -> int:
    """``python -m mla_ref export SRC OUT --format llama|qwen2|deepseek-v3 [--dtype D] [--overwrite]``"""
    parser = _Parser(
        prog="python -m mla_ref export",
        description="Write a model (e.g. a lab teacher) in a Hugging Face layout that transformers loads as it is.",
    )
    parser.add_argument("source", metavar="SRC", help="an mla_ref checkpoint or any directory mla_ref reads")
    parser.add_argument("output", metavar="OUT", help="output directory (written only when complete)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, required=True, help="Hugging Face layout")
    parser.add_argument(
        "--dtype", choices=tuple(TORCH_DTYPES), default=None, help="stored weights (default: the source's)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")

    def action(args, _argv):
        dtype = None if args.dtype is None else TORCH_DTYPES[args.dtype]
        export_model(args.source, args.output, args.format, dtype=dtype, overwrite=args.overwrite)
        print(f"wrote {args.output} ({args.format})")

    return _run(parser, argv, action)

"""The tiny-model lab's commands: ``train-teacher`` (train and record a teacher) and ``eval`` (perplexity).

``train-teacher`` writes the checkpoint with a TRAINING.md record; ``eval`` reads any directory mla_ref
loads (an mla_ref checkpoint, a llama / qwen2 / mistral or DeepSeek-V3 directory).
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

import torch

from mla_ref import checkpoint
from mla_ref._checks import require_positive_int
from mla_ref.cli.common import Parser, run
from mla_ref.data import Corpus, load_corpus, validation_windows
from mla_ref.mla import ATTENTION_PATHS
from mla_ref.model import ModelConfig, TinyLM
from mla_ref.outputs import check_output
from mla_ref.pipelines.evaluate import evaluate_directory
from mla_ref.records import record_section
from mla_ref.train import RECORD_FILE, TrainConfig, TrainResult, evaluate, train


def train_teacher_parser() -> Parser:
    p = Parser(
        prog="python -m mla_ref train-teacher",
        description="Train a tiny byte-level teacher on the local corpus and write its checkpoint and TRAINING.md.",
    )
    p.add_argument("--attention", required=True, choices=("mha", "gqa", "mqa"), help="attention of the teacher")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    p.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    p.add_argument("--eval-tokens", type=int, default=TrainConfig.eval_tokens)
    p.add_argument("--d-model", type=int, default=ModelConfig.d_model)
    p.add_argument("--n-layers", type=int, default=ModelConfig.n_layers)
    p.add_argument("--n-heads", type=int, default=ModelConfig.n_heads)
    p.add_argument("--n-kv-heads", type=int, default=None, help="KV heads for --attention gqa (default n_heads/4)")
    p.add_argument("--head-dim", type=int, default=ModelConfig.head_dim)
    p.add_argument("--mlp-hidden", type=int, default=ModelConfig.mlp_hidden)
    p.add_argument("--corpus", default=None, help="folder of text files (default: the Python standard library)")
    p.add_argument("--storage-dtype", choices=tuple(checkpoint.STORAGE_DTYPES), default="bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def training_record(
    command: str,
    model: TinyLM,
    corpus: Corpus,
    train_config: TrainConfig,
    result: TrainResult,
    storage_dtype: str,
) -> str:
    """TRAINING.md: a human-readable summary and the same facts as one JSON block."""
    final = result.final
    facts = {
        "command": command,
        "seed": train_config.seed,
        "steps": train_config.steps,
        "batch_size": train_config.batch_size,
        "seq_len": train_config.seq_len,
        "tokens_seen": result.tokens_seen,
        "wall_seconds": round(result.wall_seconds, 1),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "parameters": model.num_parameters(),
        "storage_dtype": storage_dtype,
        "val_loss": round(final.loss, 5),
        "val_perplexity": round(final.perplexity, 5),
        "val_bits_per_byte": round(final.bits_per_byte, 5),
        "val_tokens": final.tokens,
        "corpus": {
            "root": corpus.root,
            "train_files": len(corpus.train_files),
            "val_files": len(corpus.val_files),
            "train_bytes": corpus.train.numel(),
            "val_bytes": corpus.val.numel(),
            "train_sha256": corpus.train_sha256,
            "val_sha256": corpus.val_sha256,
        },
        "train_config": dataclasses.asdict(train_config),
        "model_config": model.config.to_dict(),
        "val_loss_curve": [
            {"step": h["step"], "val_loss": round(h["val_loss"], 5)}
            | ({"train_loss": round(h["train_loss"], 5)} if h["train_loss"] is not None else {})
            for h in result.history
        ],
    }
    c = model.config
    attention = f"{c.attention.upper()}: {c.n_heads} query heads over {c.kv_heads} KV heads of size {c.head_dim}"
    lines = [
        f"# Teacher: tiny byte-level Llama-style model ({c.attention.upper()})",
        "",
        "Trained by mla_ref's own code with exactly this command:",
        "",
        "```",
        facts["command"],
        "```",
        "",
        f"- model: {c.n_layers} layers, d_model {c.d_model}, {attention}, SwiGLU {c.mlp_hidden}, "
        f"RoPE {c.rope_layout} on every head dimension (θ = {c.rope_theta:g}); {facts['parameters']:,} parameters; "
        f"stored as {storage_dtype}",
        f"- data: {corpus.describe()} from `{corpus.root}` (Python {facts['python_version']}); "
        f"train sha256 `{corpus.train_sha256}`, validation sha256 `{corpus.val_sha256}`",
        f"- training: seed {train_config.seed}, {train_config.steps} steps × batch {train_config.batch_size} × "
        f"sequence {train_config.seq_len} = {result.tokens_seen:,} tokens seen; AdamW lr {train_config.lr:g} "
        f"(warm-up {train_config.warmup_steps}, cosine to {train_config.min_lr_ratio:g}·lr), clip "
        f"{train_config.grad_clip:g}",
        f"- wall time: {result.wall_seconds / 60:.1f} min on {facts['threads']} CPU threads, torch {torch.__version__}",
        f"- validation of the stored weights (first {final.tokens:,} bytes of the validation split): "
        f"loss {final.loss:.4f} nats/byte, perplexity {final.perplexity:.3f}, {final.bits_per_byte:.4f} bits/byte",
        "",
        "## Validation loss during training",
        "",
        "| step | train loss (mean since previous row) | val loss |",
        "|---:|---:|---:|",
    ]
    for h in result.history:
        train_loss = "" if h["train_loss"] is None else f"{h['train_loss']:.4f}"
        lines.append(f"| {h['step']} | {train_loss} | {h['val_loss']:.4f} |")
    lines += record_section(facts)
    return "\n".join(lines)


def train_teacher_command(argv: list[str] | None = None) -> int:
    """``python -m mla_ref train-teacher --attention mha|gqa --out DIR --steps N --seed S …``"""

    def action(args, argv):
        out = check_output(args.out, inputs=[args.corpus], overwrite=args.overwrite, name="--out")
        if args.threads is not None:
            torch.set_num_threads(require_positive_int("--threads", args.threads))
        n_kv = {"mha": None, "mqa": None}.get(args.attention, args.n_kv_heads or max(1, args.n_heads // 4))
        model_config = ModelConfig(
            d_model=args.d_model,
            n_layers=args.n_layers,
            n_heads=args.n_heads,
            n_kv_heads=n_kv,
            head_dim=args.head_dim,
            mlp_hidden=args.mlp_hidden,
            attention=args.attention,
        )
        train_config = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            seed=args.seed,
            eval_every=args.eval_every,
            eval_tokens=args.eval_tokens,
        )
        corpus = load_corpus(args.corpus)
        torch.manual_seed(args.seed)
        model = TinyLM(model_config)
        if not args.quiet:
            print(f"corpus: {corpus.describe()}; model: {model.num_parameters():,} parameters", flush=True)
        log = None if args.quiet else (lambda line: print(line, flush=True))
        result = train(model, corpus, train_config, quiet=args.quiet, log=log)
        # The record's final numbers are those of the weights as stored (e.g. rounded to bf16).
        storage_dtype = checkpoint.STORAGE_DTYPES[args.storage_dtype]
        stored = TinyLM(model_config)
        stored.load_state_dict({k: v.to(storage_dtype).float() for k, v in model.state_dict().items()})
        result.final = evaluate(stored, validation_windows(corpus.val, train_config.seq_len, train_config.eval_tokens))
        command = "python -m mla_ref train-teacher " + shlex.join(argv)
        record = training_record(command, model, corpus, train_config, result, args.storage_dtype)
        checkpoint.save(
            model,
            out,
            dtype=storage_dtype,
            extra_files={RECORD_FILE: record},
            overwrite=args.overwrite,
        )
        final = result.final
        print(
            f"wrote {out}: val loss {final.loss:.4f}, perplexity {final.perplexity:.3f}, "
            f"{final.bits_per_byte:.4f} bits/byte, {result.wall_seconds / 60:.1f} min"
        )

    return run(train_teacher_parser(), argv, action)


def evaluate_command(argv: list[str] | None = None) -> int:
    """``python -m mla_ref eval CHECKPOINT …``: validation loss, perplexity and bits per byte."""
    parser = Parser(
        prog="python -m mla_ref eval",
        description="Evaluate a checkpoint on the fixed validation slice of the local corpus.",
    )
    parser.add_argument("checkpoint", help="an mla_ref, llama / qwen2 / mistral or deepseek-v3 checkpoint directory")
    parser.add_argument(
        "--corpus", "--data", default=None, help="folder of text files (default: the Python standard library)"
    )
    parser.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    parser.add_argument("--eval-tokens", "--tokens", type=int, default=TrainConfig.eval_tokens)
    parser.add_argument("--path", choices=ATTENTION_PATHS, default="naive", help="MLA execution path")

    def action(args, _argv):
        result, _, _ = evaluate_directory(
            args.checkpoint, corpus=args.corpus, seq_len=args.seq_len, eval_tokens=args.eval_tokens, path=args.path
        )
        unit = "token" if (Path(args.checkpoint) / "tokenizer.json").is_file() else "byte"
        print(
            f"{args.checkpoint}: {result.tokens:,} validation {unit}s, loss {result.loss:.4f} nats/{unit}, "
            f"perplexity {result.perplexity:.3f}, {result.bits_per_byte:.4f} bits/{unit}"
        )

    return run(parser, argv, action)

"""The tiny-model lab's commands: ``train-teacher`` (train and record a teacher) and ``eval`` (perplexity).

Both read the command line and print; the work is in the library.  ``train-teacher`` runs
``mla_ref.train.train_teacher``, which writes the checkpoint with a TRAINING.md record; ``eval`` runs
``mla_ref.pipelines.evaluate.evaluate_directory`` on any directory mla_ref loads (an mla_ref checkpoint, a llama /
qwen2 / mistral or DeepSeek-V3 directory).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import torch

from mla_ref import checkpoint
from mla_ref._checks import require_positive_int
from mla_ref.cli.common import Parser, run
from mla_ref.data import load_corpus
from mla_ref.mla import ATTENTION_PATHS
from mla_ref.model import ModelConfig
from mla_ref.outputs import check_output
from mla_ref.pipelines.evaluate import evaluate_directory
from mla_ref.train import TrainConfig, train_teacher


def train_teacher_parser() -> Parser:
    p = Parser(
        prog="python -m mla_ref train-teacher",
        description="Train a tiny byte-level teacher on the local corpus and write its checkpoint and TRAINING.md.",
    )
    p.add_argument("--attention", required=True, choices=("mha", "gqa", "mqa", "mla"), help="attention of the teacher")
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
    p.add_argument("--kv-lora-rank", type=int, default=None, help="d_c of --attention mla (required with it)")
    p.add_argument("--rope-dim", type=int, default=None, help="d_R of --attention mla (required with it)")
    p.add_argument("--mlp-hidden", type=int, default=ModelConfig.mlp_hidden)
    p.add_argument("--corpus", default=None, help="folder of text files (default: the Python standard library)")
    p.add_argument("--storage-dtype", choices=tuple(checkpoint.STORAGE_DTYPES), default="bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _mla_sizes(args) -> dict:
    """The MLA fields of the teacher's config: d_c and d_R as given, d_N = d_v = the head size (as a GQA head's)."""
    given = args.kv_lora_rank is not None or args.rope_dim is not None
    if args.attention != "mla":
        if given:
            raise ValueError(f"--kv-lora-rank and --rope-dim size an MLA teacher; got --attention {args.attention}")
        return {}
    if args.kv_lora_rank is None or args.rope_dim is None:
        raise ValueError("--attention mla needs --kv-lora-rank (d_c) and --rope-dim (d_R): the latent cache's sizes")
    require_positive_int("--kv-lora-rank", args.kv_lora_rank)
    require_positive_int("--rope-dim", args.rope_dim)
    return dict(
        kv_lora_rank=args.kv_lora_rank,
        qk_rope_head_dim=args.rope_dim,
        qk_nope_head_dim=args.head_dim,
        v_head_dim=args.head_dim,
    )


def train_teacher_command(argv: list[str] | None = None) -> int:
    """``python -m mla_ref train-teacher --attention mha|gqa --out DIR --steps N --seed S …``"""

    def action(args, argv):
        out = check_output(args.out, inputs=[args.corpus], overwrite=args.overwrite, name="--out")
        if args.threads is not None:
            torch.set_num_threads(require_positive_int("--threads", args.threads))
        n_kv = {"mha": None, "mqa": None, "mla": None}.get(args.attention, args.n_kv_heads or max(1, args.n_heads // 4))
        model_config = ModelConfig(
            **_mla_sizes(args),
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
        result = train_teacher(
            model_config,
            train_config,
            load_corpus(args.corpus),
            out,
            storage_dtype=args.storage_dtype,
            command="python -m mla_ref train-teacher " + shlex.join(argv),
            overwrite=args.overwrite,
            quiet=args.quiet,
            log=None if args.quiet else (lambda line: print(line, flush=True)),
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

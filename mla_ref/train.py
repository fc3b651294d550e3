"""Training, fine-tuning (optionally distilling from a teacher) and evaluation of a TinyLM.

- Optimiser: AdamW (weight decay on matrices only), learning rate warmed up linearly
  then decayed along a cosine to ``min_lr_ratio · lr``, gradients clipped by global norm.
- Loss: next-byte cross entropy; with a teacher, mixed with the distillation term

      L = (1 - α) · CE(student, targets) + α · τ² · KL(softmax(teacher / τ) ‖ softmax(student / τ))

  (the τ² keeps the soft term's gradients on the scale of the hard one; Hinton et al., 2015), and
  optionally a hidden-state term that asks every block's output to stay near the teacher's:

      L += β · Σ_l ‖h_l(student) − h_l(teacher)‖² / ‖h_l(teacher)‖²        (β = distill_hidden_weight)

  For a converted student — the teacher's own MLPs, norms and head around new attention layers — that
  term says at every layer where the residual stream went wrong, not only at the logits.
- Evaluation: mean cross entropy over the fixed validation slice, perplexity = exp(loss)
  and bits per byte = loss / ln 2 (one token is one byte).  Deterministic.

``python -m mla_ref train-teacher`` trains a teacher and writes its checkpoint with a
TRAINING.md record (``train_teacher_command``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import TqdmExperimentalWarning, TqdmWarning

with warnings.catch_warnings():
    # Without ipywidgets, tqdm.auto warns once on import and falls back to the text bar; that is fine here.
    warnings.simplefilter("ignore", (TqdmWarning, TqdmExperimentalWarning))
    from tqdm.auto import tqdm

from mla_ref import checkpoint, records
from mla_ref._checks import require_non_negative_int, require_positive_int
from mla_ref.data import Corpus, load_corpus, random_batch, validation_windows
from mla_ref.mla import ATTENTION_PATHS
from mla_ref.model import ModelConfig, TinyLM
from mla_ref.records import record_section

RECORD_FILE = "TRAINING.md"
TEACHERS_DIR = Path(__file__).resolve().parent / "teachers"  # the shipped teachers: mha/ and gqa/


@dataclass
class TrainConfig:
    """How to train; every field has a default sized for the 2-core CPU lab."""

    steps: int = 1000  # optimiser steps
    batch_size: int = 32  # windows per step
    seq_len: int = 128  # bytes per window
    lr: float = 2e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at min_lr_ratio · lr
    warmup_steps: int = 50  # linear warm-up from 0 to lr
    weight_decay: float = 0.1  # AdamW decay on matrices (not on norms)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moments
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    seed: int = 0  # seeds the initial weights (via the caller) and the batch sampler
    eval_every: int = 50  # validation loss every N steps (0 = only at the start and end)
    eval_tokens: int = 16384  # size of the fixed validation slice, in predicted bytes
    eval_batch_size: int = 32  # windows per evaluation forward
    distill_alpha: float = 0.5  # weight α of the distillation term (used only with a teacher)
    distill_temperature: float = 2.0  # τ of the distillation term
    distill_hidden_weight: float = 0.0  # β of the hidden-state term (used only with a teacher; 0 = off)

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_tokens", "eval_batch_size"):
            require_positive_int(name, getattr(self, name))
        require_non_negative_int("warmup_steps", self.warmup_steps)
        require_non_negative_int("eval_every", self.eval_every)
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"distill_alpha must lie in [0, 1], got {self.distill_alpha}")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be positive, got {self.distill_temperature}")
        if not self.distill_hidden_weight >= 0:
            raise ValueError(f"distill_hidden_weight must be ≥ 0 (0 = off), got {self.distill_hidden_weight}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be ≥ 0 (0 = off), got {self.grad_clip}")


@dataclass(frozen=True)
class Evaluation:
    """Validation numbers over ``tokens`` predicted bytes."""

    loss: float  # mean cross entropy, nats per byte
    perplexity: float  # exp(loss)
    bits_per_byte: float  # loss / ln 2
    tokens: int


@dataclass
class TrainResult:
    # {"step", "lr", "train_loss" (mean since the previous evaluation), "val_loss"} at each evaluation
    history: list[dict] = field(default_factory=list)
    tokens_seen: int = 0
    wall_seconds: float = 0.0
    final: Evaluation | None = None


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to lr over warmup_steps, then a cosine down to min_lr_ratio · lr at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.min_lr_ratio * config.lr
    # lr(p) = floor + (lr - floor) · (1 + cos πp) / 2
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """(1 - α)·CE + α·τ²·KL(teacher_τ ‖ student_τ), averaged over tokens.

    Shapes: student_logits, teacher_logits (b, s, v); targets (b, s).  Returns a scalar.
    """
    v = student_logits.shape[-1]
    hard = F.cross_entropy(student_logits.reshape(-1, v).float(), targets.reshape(-1))
    student_log_probs = F.log_softmax(student_logits.reshape(-1, v).float() / temperature, dim=-1)  # (b·s, v)
    teacher_log_probs = F.log_softmax(teacher_logits.reshape(-1, v).float() / temperature, dim=-1)  # (b·s, v)
    # KL(p_t ‖ p_s) = Σ_v p_t (log p_t - log p_s), mean over tokens
    soft = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")
    return (1.0 - alpha) * hard + alpha * temperature**2 * soft


def hidden_state_loss(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor]) -> torch.Tensor:
    """Σ_l ‖h_l(student) − h_l(teacher)‖² / ‖h_l(teacher)‖²: each block's output error relative to the teacher's.

    Shapes: two lists of one (b, s, d) tensor per block (``TinyLM.forward(..., hidden_states=[])``).
    Returns a scalar.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"need one hidden state per block on both sides, got {len(student_hidden)} and {len(teacher_hidden)}"
        )
    return sum(
        (s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean()
        for s, t in zip(student_hidden, teacher_hidden, strict=True)
    )


@torch.no_grad()
def evaluate(model: TinyLM, windows: torch.Tensor, *, batch_size: int = 32, path: str = "naive") -> Evaluation:
    """Mean next-byte cross entropy over ``windows`` (n, s + 1), with perplexity and bits per byte."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must have shape (n, s + 1) with s ≥ 1, got {tuple(windows.shape)}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        inputs, targets = chunk[:, :-1], chunk[:, 1:]  # (b, s) each
        logits = model(inputs, path=path)  # (b, s, v)
        total += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    loss = total / count
    return Evaluation(loss=loss, perplexity=math.exp(loss), bits_per_byte=loss / math.log(2), tokens=count)


def make_optimizer(model: TinyLM, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings, projections) and none on norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def train(
    model: TinyLM,
    corpus: Corpus,
    config: TrainConfig,
    *,
    teacher: TinyLM | None = None,
    quiet: bool = False,
    log=None,
) -> TrainResult:
    """Train ``model`` in place on random windows of ``corpus.train``; evaluate on its fixed validation slice.

    With a ``teacher``, the loss mixes in logit distillation and, when ``config.distill_hidden_weight`` > 0,
    the hidden-state term (see the module docstring).
    ``log``, if given, is called with one line of text at every evaluation.
    The batch sampler is seeded with ``config.seed``, so the same model, corpus and config
    give the same run.
    """
    if teacher is not None:
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"teacher vocab_size {teacher.config.vocab_size} differs from the student's {model.config.vocab_size}"
            )
        teacher.eval()
    generator = torch.Generator().manual_seed(config.seed)
    windows = validation_windows(corpus.val, config.seq_len, config.eval_tokens)
    optimizer = make_optimizer(model, config)
    result = TrainResult()
    start = time.perf_counter()
    interval_losses: list[float] = []  # training losses since the last evaluation

    def record(step: int, lr: float) -> None:
        val = evaluate(model, windows, batch_size=config.eval_batch_size)
        running = sum(interval_losses) / len(interval_losses) if interval_losses else None
        interval_losses.clear()
        result.history.append({"step": step, "lr": lr, "train_loss": running, "val_loss": val.loss})
        result.final = val
        if log is not None:
            train_text = "" if running is None else f"  train loss {running:.4f}"
            log(f"step {step:>6}  val loss {val.loss:.4f}{train_text}  ({time.perf_counter() - start:.0f} s)")

    model.train()
    record(0, 0.0)
    bar = tqdm(range(config.steps), desc="train", disable=quiet, leave=False)
    for step in bar:
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = random_batch(corpus.train, config.batch_size, config.seq_len, generator)  # (b, s) each
        match_hidden = teacher is not None and config.distill_hidden_weight > 0
        student_hidden: list[torch.Tensor] | None = [] if match_hidden else None  # one (b, s, d) per block
        logits = model(inputs, hidden_states=student_hidden)  # (b, s, v)
        if teacher is None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        else:
            teacher_hidden: list[torch.Tensor] | None = [] if match_hidden else None
            with torch.no_grad():
                teacher_logits = teacher(inputs, hidden_states=teacher_hidden)  # (b, s, v)
            loss = distillation_loss(
                logits, teacher_logits, targets, alpha=config.distill_alpha, temperature=config.distill_temperature
            )
            if match_hidden:
                loss = loss + config.distill_hidden_weight * hidden_state_loss(student_hidden, teacher_hidden)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        result.tokens_seen += inputs.numel()
        interval_losses.append(loss.item())
        bar.set_postfix(loss=f"{interval_losses[-1]:.3f}", refresh=False)
        done = step + 1
        if done == config.steps or (config.eval_every and done % config.eval_every == 0):
            record(done, lr)
    bar.close()
    model.eval()
    result.wall_seconds = time.perf_counter() - start
    return result


# ---- the train-teacher command ---------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _record(
    argv: list[str],
    model: TinyLM,
    corpus: Corpus,
    train_config: TrainConfig,
    result: TrainResult,
    storage_dtype: str,
) -> str:
    """TRAINING.md: a human-readable summary and the same facts as one JSON block."""
    final = result.final
    facts = {
        "command": "python -m mla_ref train-teacher " + shlex.join(argv),
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


def read_record(directory: str | Path) -> dict:
    """The JSON facts block of ``directory/TRAINING.md``."""
    if not (Path(directory) / RECORD_FILE).is_file():
        raise ValueError(f"{str(directory)!r} has no {RECORD_FILE}")
    return records.read_record(Path(directory) / RECORD_FILE)


def train_teacher_command(argv: list[str] | None = None) -> int:
    """``python -m mla_ref train-teacher --attention mha|gqa --out DIR --steps N --seed S …``"""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        print(f"error: --out {str(out)!r} exists and is not empty; pass --overwrite to replace it", file=sys.stderr)
        return 2
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
    record = _record(argv, model, corpus, train_config, result, args.storage_dtype)
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
    return 0


def evaluate_command(argv: list[str] | None = None) -> int:
    """``python -m mla_ref eval CHECKPOINT …``: validation loss, perplexity and bits per byte."""
    parser = argparse.ArgumentParser(
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
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        from mla_ref.hf import load_model, text_tokens  # any supported directory; imported on use

        model = load_model(args.checkpoint)
        tokens = text_tokens(args.checkpoint, load_corpus(args.corpus).val, model.config.vocab_size)
        windows = validation_windows(tokens, args.seq_len, args.eval_tokens)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = evaluate(model, windows, path=args.path)
    unit = "token" if (Path(args.checkpoint) / "tokenizer.json").is_file() else "byte"
    print(
        f"{args.checkpoint}: {result.tokens:,} validation {unit}s, loss {result.loss:.4f} nats/{unit}, "
        f"perplexity {result.perplexity:.3f}, {result.bits_per_byte:.4f} bits/{unit}"
    )
    return 0


main = train_teacher_command

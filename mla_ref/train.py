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
- A teacher: ``train_teacher`` trains one from scratch and stores it with TRAINING.md (``training_record``), whose
  facts ``read_record`` reads back; the shipped teachers in ``TEACHERS_DIR`` were made so.

The ``train-teacher`` and ``eval`` commands (``mla_ref.cli.lab``) read the command line and call this library.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mla_ref import checkpoint, records
from mla_ref._checks import require_non_negative_int, require_positive_int, require_tokens
from mla_ref.data import Corpus, random_batch, validation_windows
from mla_ref.measures import kl_per_position
from mla_ref.model import ModelConfig, TinyLM
from mla_ref.progress import tqdm

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

    @classmethod
    def of_loss(cls, loss: float, tokens: int) -> Evaluation:
        """The numbers of a mean cross entropy of ``loss`` nats over ``tokens`` predicted bytes."""
        return cls(loss=loss, perplexity=math.exp(loss), bits_per_byte=loss / math.log(2), tokens=tokens)


@dataclass
class TrainResult:
    # {"step", "lr", "train_loss" (mean since the previous evaluation), "val_loss"} at each evaluation
    history: list[dict] = field(default_factory=list)
    tokens_seen: int = 0
    wall_seconds: float = 0.0
    final: Evaluation | None = None


def learning_rate(step: int, *, steps: int, lr: float, warmup: int, min_ratio: float, time_used: float = 0.0) -> float:
    """The learning rate of step ``step`` (from 0): a linear warm-up, then a cosine down to a floor.

        step < warmup:  lr · (step + 1) / warmup
        after:          floor + (lr − floor) · (1 + cos πp) / 2,   floor = min_ratio · lr
                        p = max((step − warmup) / (steps − warmup), time_used), at most 1

    ``time_used`` is the fraction of a time limit already spent (0 without one): a run that the limit ends early
    still ends on its small learning rate instead of being cut off near the peak.  ``train`` and the recoveries of
    ``mla_ref.recovery`` all use this schedule.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, steps - warmup), time_used))
    floor = min_ratio * lr
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
    soft = kl_per_position(teacher_logits, student_logits, temperature=temperature).mean()  # KL(p_t ‖ p_s) per token
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
    windows = require_tokens("windows", windows, model.config.vocab_size, min_len=2)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        inputs, targets = chunk[:, :-1], chunk[:, 1:]  # (b, s) each
        logits = model(inputs, path=path)  # (b, s, v)
        total += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return Evaluation.of_loss(total / count, tokens=count)


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
        lr = learning_rate(
            step, steps=config.steps, lr=config.lr, warmup=config.warmup_steps, min_ratio=config.min_lr_ratio
        )
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


def read_record(directory: str | Path) -> dict:
    """The JSON facts block of ``directory/TRAINING.md``."""
    if not (Path(directory) / RECORD_FILE).is_file():
        raise ValueError(f"{str(directory)!r} has no {RECORD_FILE}")
    return records.read_record(Path(directory) / RECORD_FILE)


# ---- a teacher, trained and recorded ---------------------------------------------------------------------------------
def train_teacher(
    model_config: ModelConfig,
    train_config: TrainConfig,
    corpus: Corpus,
    out: str | Path,
    *,
    command: str,
    storage_dtype: str = "bfloat16",
    overwrite: bool = False,
    quiet: bool = False,
    log=None,
) -> TrainResult:
    """Train a teacher from scratch and store it in ``out`` with its TRAINING.md (``python -m mla_ref train-teacher``).

    train (initial weights seeded by ``train_config.seed``) → round the weights to ``storage_dtype``, as the
    checkpoint stores them → evaluate those, so the record's final numbers are the stored model's → write the
    checkpoint and TRAINING.md, which records ``command``.  Returns ``train``'s result with those final numbers.
    """
    torch.manual_seed(train_config.seed)
    model = TinyLM(model_config)
    if log is not None:
        log(f"corpus: {corpus.describe()}; model: {model.num_parameters():,} parameters")
    result = train(model, corpus, train_config, quiet=quiet, log=log)
    dtype = checkpoint.STORAGE_DTYPES[storage_dtype]
    stored = TinyLM(model_config)
    stored.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
    result.final = evaluate(stored, validation_windows(corpus.val, train_config.seq_len, train_config.eval_tokens))
    record = training_record(command, model, corpus, train_config, result, storage_dtype)
    checkpoint.save(model, out, dtype=dtype, extra_files={RECORD_FILE: record}, overwrite=overwrite)
    return result


def training_facts(
    command: str, model: TinyLM, corpus: Corpus, train_config: TrainConfig, result: TrainResult, storage_dtype: str
) -> dict:
    """The facts of TRAINING.md's JSON block, which ``read_record`` reads back."""
    final = result.final
    return {
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


def training_record(
    command: str, model: TinyLM, corpus: Corpus, train_config: TrainConfig, result: TrainResult, storage_dtype: str
) -> str:
    """TRAINING.md: a human-readable summary, the validation loss during training, and the facts as one JSON block."""
    facts = training_facts(command, model, corpus, train_config, result, storage_dtype)
    final, c, t = result.final, model.config, train_config
    attention = f"{c.attention.upper()}: {c.n_heads} query heads over {c.kv_heads} KV heads of size {c.head_dim}"
    if c.attention == "mla":
        attention = (
            f"MLA: {c.n_heads} heads (d_N {c.qk_nope_head_dim}, d_v {c.v_head_dim}) reading a latent of "
            f"d_c {c.kv_lora_rank} and a shared roped key of d_R {c.qk_rope_head_dim}: "
            f"{c.kv_lora_rank + c.qk_rope_head_dim} cached elements per token and layer"
        )
    lines = [
        f"# Teacher: tiny byte-level Llama-style model ({c.attention.upper()})",
        "",
        "Trained by mla_ref's own code with exactly this command:",
        "",
        "```",
        command,
        "```",
        "",
        f"- model: {c.n_layers} layers, d_model {c.d_model}, {attention}, SwiGLU {c.mlp_hidden}, "
        f"RoPE {c.rope_layout} on {'the d_R dimensions' if c.attention == 'mla' else 'every head dimension'} "
        f"(θ = {c.rope_theta:g}); {facts['parameters']:,} parameters; "
        f"stored as {storage_dtype}",
        f"- data: {corpus.describe()} from `{corpus.root}` (Python {facts['python_version']}); "
        f"train sha256 `{corpus.train_sha256}`, validation sha256 `{corpus.val_sha256}`",
        f"- training: seed {t.seed}, {t.steps} steps × batch {t.batch_size} × sequence {t.seq_len} = "
        f"{result.tokens_seen:,} tokens seen; AdamW lr {t.lr:g} (warm-up {t.warmup_steps}, cosine to "
        f"{t.min_lr_ratio:g}·lr), clip {t.grad_clip:g}",
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
    return "\n".join(lines + records.record_section(facts))

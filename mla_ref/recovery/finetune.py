"""Recovery: a short fine-tune that wins back what a conversion below the source's cache size lost.

A converted model (``convert_model`` with TransMLA or MHA2MLA layers) starts close to its source but not on it.
``recover`` trains it for a few steps with ``mla_ref.train.train`` — AdamW, linear warm-up then a cosine,
gradient clipping, a seeded batch sampler, no progress bar when ``quiet`` — on either loss:

    L = CE(student, next bytes)                                                  (no teacher)
    L = (1 − α) · CE + α · τ² · KL(softmax(teacher / τ) ‖ softmax(student / τ))   (distillation from the source)
      + β · Σ_l ‖h_l(student) − h_l(teacher)‖² / ‖h_l(teacher)‖²                 (optional: every block's output)

and reports the validation loss before and after, and the budget it spent:

    tokens   = steps · batch_size · seq_len                   (predicted bytes the optimiser saw)
    fraction = tokens / tokens_seen of the teacher's pre-training (its TRAINING.md record)

``trainable="attention"`` (the default) freezes everything the conversion did not touch (embeddings, norms, MLPs,
head), so only the converted attention layers move: Adam takes steps of about the learning rate whatever the
gradient's size, so a few steps on everything mostly add noise to weights that were already right, and the
attention layers are where the error is.  ``trainable="all"`` is MHA2MLA's choice; it pays off once the run is long
enough for the MLPs to adapt to their new attention — with the hidden-state term it is what the project's table
uses (on the GQA teacher at 25% of the cache, 2% of the pre-training tokens: 1.12× the teacher's perplexity with the
attention layers alone at batch 16, about 1.06× with all parameters, batch 4 and β = 3).

``teacher_divergence`` measures how far the student's next-byte distribution is from the teacher's,
KL(teacher ‖ student) per predicted byte — what distillation pulls down.

On a real model a step of ``recover`` (the whole model forward and backward, a large vocabulary's head, the teacher)
is expensive; ``mla_ref.recovery.layerwise`` trains each attention layer on its own against its source layer
instead, and ``mla_ref.recovery.distill`` runs this loss with a device, a time limit and parameters held fixed.
``python -m mla_ref recover`` (``mla_ref.pipelines.recover``) runs them on a checkpoint directory.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from mla_ref._checks import require_choice, require_number, require_positive_int, require_tokens
from mla_ref.data import Corpus
from mla_ref.measures import kl_per_position
from mla_ref.model import TinyLM
from mla_ref.recovery.steps import training_only
from mla_ref.train import Evaluation, TrainConfig, read_record, train

TRAINABLE: tuple[str, ...] = ("all", "attention")


@dataclass(frozen=True)
class RecoveryResult:
    """What a recovery fine-tune did: validation before and after, and the tokens it used."""

    before: Evaluation  # the converted model as it came, on the fixed validation slice
    after: Evaluation  # the same slice after the fine-tune
    tokens: int  # predicted bytes seen by the optimiser: steps · batch_size · seq_len
    pretraining_tokens: int | None  # the teacher's pre-training tokens (TRAINING.md tokens_seen), if known
    wall_seconds: float
    history: list[dict] = field(default_factory=list)  # train()'s evaluations: {"step", "lr", "train_loss", "val_loss"}

    @property
    def fraction_of_pretraining(self) -> float | None:
        """tokens / pretraining_tokens, or None when the teacher's budget is unknown."""
        return None if self.pretraining_tokens is None else self.tokens / self.pretraining_tokens


def pretraining_tokens(checkpoint_dir: str | os.PathLike) -> int:
    """The tokens a checkpoint saw in pre-training: ``tokens_seen`` of its TRAINING.md record."""
    record = read_record(checkpoint_dir)
    tokens = record.get("tokens_seen")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise ValueError(
            f"the TRAINING.md record of {str(checkpoint_dir)!r} must hold a positive integer tokens_seen, "
            f"got {tokens!r}"
        )
    return tokens


def budget_steps(fraction: float, pretraining: int, *, batch_size: int, seq_len: int) -> int:
    """The most optimiser steps whose tokens stay within ``fraction`` of ``pretraining`` tokens (at least 1).

    steps = ⌊fraction · pretraining / (batch_size · seq_len)⌋; a budget smaller than one step raises ValueError.
    """
    require_number("fraction", fraction, lambda f: 0 < f <= 1, "lie in (0, 1]")
    require_positive_int("pretraining", pretraining)
    per_step = require_positive_int("batch_size", batch_size) * require_positive_int("seq_len", seq_len)
    steps = math.floor(fraction * pretraining / per_step)
    if steps < 1:
        raise ValueError(
            f"a budget of {fraction:.4%} of {pretraining:,} tokens is less than one step of "
            f"batch_size · seq_len = {per_step:,} tokens; raise fraction or shrink the batch"
        )
    return steps


def recovery_config(
    steps: int,
    *,
    batch_size: int = 16,
    seq_len: int = 128,
    lr: float = 5e-4,
    warmup_steps: int | None = None,
    seed: int = 0,
    eval_tokens: int = 16384,
    distill_alpha: float = 0.5,
    distill_temperature: float = 2.0,
    distill_hidden_weight: float = 0.0,
) -> TrainConfig:
    """A ``TrainConfig`` for a short fine-tune: evaluated only before and after, warm-up a tenth of the steps.

    The peak learning rate is far below pre-training's (the weights start close to a good solution, and a large
    step would first undo what the conversion kept).  distill_alpha / distill_temperature (and
    distill_hidden_weight, the hidden-state term) apply with a teacher.
    """
    require_positive_int("steps", steps)
    warmup = max(1, steps // 10) if warmup_steps is None else warmup_steps
    return TrainConfig(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        warmup_steps=warmup,
        seed=seed,
        eval_every=0,
        eval_tokens=eval_tokens,
        distill_alpha=distill_alpha,
        distill_temperature=distill_temperature,
        distill_hidden_weight=distill_hidden_weight,
    )


def recover(
    student: TinyLM,
    corpus: Corpus,
    config: TrainConfig,
    *,
    teacher: TinyLM | None = None,
    pretraining_tokens: int | None = None,
    max_fraction: float | None = None,
    trainable: str = "attention",
    quiet: bool = True,
    log=None,
) -> RecoveryResult:
    """Fine-tune ``student`` in place (see the module docstring); return before/after validation and the budget.

    Args:
        student: the converted model; it is trained in place and left in eval mode.
        corpus: training windows come from ``corpus.train``, the validation slice from ``corpus.val``.
        config: the schedule, batch and seed (``recovery_config`` makes a short one); the same student,
            corpus and config give the same weights.
        teacher: distil from it (usually the unconverted source); None trains on next-byte cross entropy alone.
            It is not modified.
        pretraining_tokens: the teacher's pre-training tokens (``pretraining_tokens(checkpoint_dir)``), to report
            the budget as a fraction of it.
        max_fraction: refuse (ValueError) a config whose tokens exceed this fraction of ``pretraining_tokens``.
        trainable: only the "attention" layers (everything else frozen), or "all" parameters.
        quiet: no progress bar.  ``log`` is passed to ``train`` (one line per evaluation).
    """
    if not isinstance(student, TinyLM):
        raise ValueError(f"student must be a TinyLM, got {type(student).__name__}")
    if teacher is not None and not isinstance(teacher, TinyLM):
        raise ValueError(f"teacher must be a TinyLM or None, got {type(teacher).__name__}")
    if teacher is student:
        raise ValueError("teacher must be a different model from the student (distilling a model into itself)")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig (see recovery_config), got {type(config).__name__}")
    require_choice("trainable", trainable, TRAINABLE)
    if pretraining_tokens is not None:
        require_positive_int("pretraining_tokens", pretraining_tokens)
    tokens = config.steps * config.batch_size * config.seq_len
    if max_fraction is not None:
        if pretraining_tokens is None:
            raise ValueError("max_fraction needs pretraining_tokens (the teacher's pre-training budget)")
        require_number("max_fraction", max_fraction, lambda f: 0 < f <= 1, "lie in (0, 1]")
        if tokens > max_fraction * pretraining_tokens:
            most = math.floor(max_fraction * pretraining_tokens / (config.batch_size * config.seq_len))
            raise ValueError(
                f"the fine-tune would use {tokens:,} tokens = {tokens / pretraining_tokens:.3%} of the teacher's "
                f"{pretraining_tokens:,}, more than max_fraction = {max_fraction:.3%}; at batch_size · seq_len = "
                f"{config.batch_size * config.seq_len:,} that allows at most {most} steps"
            )
    attention = [p for layer in student.layers for p in layer.self_attn.parameters()]
    with training_only(student, attention) if trainable == "attention" else nullcontext():
        result = train(student, corpus, config, teacher=teacher, quiet=quiet, log=log)
    first = result.history[0]["val_loss"]  # train() evaluates once before the first step
    return RecoveryResult(
        before=Evaluation.of_loss(first, tokens=result.final.tokens),
        after=result.final,
        tokens=result.tokens_seen,
        pretraining_tokens=pretraining_tokens,
        wall_seconds=result.wall_seconds,
        history=result.history,
    )


@torch.no_grad()
def teacher_divergence(
    student: TinyLM, teacher: TinyLM, windows: torch.Tensor, *, batch_size: int = 32, temperature: float = 1.0
) -> float:
    """Mean KL(softmax(teacher / τ) ‖ softmax(student / τ)) per predicted byte over ``windows`` (n, s + 1), nats.

    0 when the student predicts exactly as the teacher does.
    """
    windows = require_tokens("windows", windows, teacher.config.vocab_size, min_len=2)
    require_number("temperature", temperature, lambda t: t > 0, "be positive")
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        inputs = chunk[:, :-1]  # (b, s)
        kl = kl_per_position(teacher(inputs), student(inputs), temperature=temperature)  # (b, s)
        total += kl.sum().item()
        count += inputs.numel()
    student.train(modes[0])
    teacher.train(modes[1])
    return total / count

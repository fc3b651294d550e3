"""Distillation of the whole source into a converted model's attention layers, and a side-by-side measurement.

- ``recover_distill``: ``recovery.recover``'s distillation loss (the same ``distillation_loss``) on the attention
  layers only, written out with what a real model needs: a device, a time limit, and parameters held fixed
  (``keep``: e.g. a q_proj bias that stock DeepSeek-V3 cannot store).  Every layer moves at once here, and the
  model's output is far more sensitive to a step than one layer's output is: on SmolLM2 at 25% of its cache, lr 1e-4
  first lowered and then raised the KL to the source within six steps, where 3e-5 lowered it steadily (1.19 → 1.08
  nats in 12 steps); ``recover_layerwise`` takes 1e-3;
- ``compare_with_teacher``: perplexity and KL to the teacher of several models on the same windows, the teacher
  run once (its logits over a large vocabulary are the costly part).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from mla_ref._checks import require_number, require_positive_int, require_tokens, resolve_device
from mla_ref.measures import kl_from_log_probs
from mla_ref.model import TinyLM
from mla_ref.progress import tqdm
from mla_ref.recovery.steps import (
    BETAS,
    MIN_LR_RATIO,
    MovedTo,
    balance_latent,
    require_keep,
    require_pair,
    require_time_limit,
    take_step,
    touches_kept,
    trainable,
    training_only,
)
from mla_ref.train import distillation_loss, learning_rate


@dataclass(frozen=True)
class DistillResult:
    """What ``recover_distill`` did: the training loss at the start and end, steps, tokens and time."""

    first_loss: float  # mean distillation loss over the first tenth of the steps
    last_loss: float  # mean over the last tenth
    steps: int
    trained_tokens: int  # steps · windows per batch · s predicted tokens
    wall_seconds: float
    cpu_seconds: float
    time_limited: bool  # the time limit ended the run before ``steps``
    device: str


@dataclass(frozen=True)
class Comparison:
    """A model on held-out windows against a teacher: perplexity and KL(teacher ‖ model) per predicted token."""

    loss: float  # mean next-token cross entropy, nats
    perplexity: float  # exp(loss)
    kl_to_teacher: float  # mean KL(p_teacher ‖ p_model), nats per token (0 for the teacher itself)
    tokens: int


def recover_distill(
    student: TinyLM,
    teacher: TinyLM,
    windows: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_tokens: int,
    device: str = "cpu",
    quiet: bool = True,
    time_limit_s: float | None = None,
    keep: tuple[str, ...] = (),
    alpha: float = 0.5,
    temperature: float = 2.0,
    seed: int = 0,
    balance: bool = True,
) -> DistillResult:
    """Distil the whole ``teacher`` into the attention layers of ``student``, in place (``recover``'s loss).

    L = (1 − α) · CE(student, next tokens) + α · τ² · KL(softmax(teacher / τ) ‖ softmax(student / τ)) on batches
    of ⌊batch_tokens / s⌋ random windows; Adam on the attention layers' parameters only (less ``keep``), the same
    schedule as ``recover_layerwise`` (cosine to lr/10, decaying over the time limit when that comes first) after a
    longer warm-up (a tenth of the steps, at least 5: Adam's first steps move every weight by about the learning
    rate, and every layer at once), gradients clipped to norm 1.  Why its learning rate is far below
    ``recover_layerwise``'s: the module docstring.

    Args:
        windows: (n, s + 1) token ids: inputs and their next tokens.
        device: "cpu" or "cuda": both models move there for the run and back afterwards.
        time_limit_s: wall-clock seconds; the run stops when they are spent.
        balance: first bring every MLA layer's latent to unit scale (``balance_latent``) on the student's own
            inputs for the first windows (up to 2,048 tokens); skipped for layers whose scaled parameters are kept.
        Others as ``recover_layerwise``; alpha and temperature as ``recovery_config``'s.
    """
    require_pair(student, teacher)
    require_positive_int("steps", steps)
    lr = require_number("lr", lr, lambda v: 0 < v < 1, "lie in (0, 1)")
    require_positive_int("batch_tokens", batch_tokens)
    time_limit = require_time_limit(time_limit_s)
    dev = resolve_device(device)
    keep = require_keep(student, keep)
    windows = require_tokens("windows", windows, teacher.config.vocab_size, min_len=2)
    require_number("alpha", alpha, lambda a: 0 <= a <= 1, "lie in [0, 1]")
    require_number("temperature", temperature, lambda t: t > 0, "be positive")
    s = windows.shape[1] - 1
    per_batch = min(len(windows), max(1, batch_tokens // s))  # windows per batch

    start, cpu_start = time.perf_counter(), time.process_time()
    params = [p for layer in student.layers for p in trainable(layer.self_attn, keep)]  # attention, less ``keep``
    teacher.eval()
    student.eval()  # no dropout anywhere; eval mode only says so
    with training_only(student, params), MovedTo(dev, student, teacher):
        if balance:
            _balance_latents(student, windows[: max(1, 2048 // s), :-1].to(dev), keep)
        batches = _random_batches(windows, per_batch, seed, dev)
        loss = partial(distillation_loss, alpha=alpha, temperature=temperature)
        losses = _distill_steps(student, teacher, batches, loss, params, steps, lr, start, time_limit, quiet)
    student.eval()
    tenth = max(1, len(losses) // 10)
    return DistillResult(
        first_loss=sum(losses[:tenth]) / tenth if losses else math.nan,
        last_loss=sum(losses[-tenth:]) / tenth if losses else math.nan,
        steps=len(losses),
        trained_tokens=len(losses) * per_batch * s,
        wall_seconds=time.perf_counter() - start,
        cpu_seconds=time.process_time() - cpu_start,
        time_limited=len(losses) < steps,
        device=str(dev),
    )


@torch.no_grad()
def _balance_latents(student: TinyLM, inputs: torch.Tensor, keep: tuple[str, ...]) -> None:
    """``balance_latent`` for every MLA layer of ``student`` on its own inputs from ``inputs`` (b, s) token ids,
    except the layers where it would change a parameter held fixed."""
    for layer, x in zip(student.layers, student.attention_inputs(inputs), strict=True):  # x: (b, s, D)
        if not touches_kept(layer.self_attn, keep):
            balance_latent(layer.self_attn, x)


def _random_batches(windows: torch.Tensor, per_batch: int, seed: int, device: torch.device):
    """Endless batches of ``per_batch`` windows drawn at random, without repeats within a batch, from ``windows``
    (n, s + 1); each (b, s + 1) on ``device``.  Seeded on the CPU: the same batches whatever the device."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield windows[torch.randperm(len(windows), generator=generator)[:per_batch]].to(device)


def _distill_steps(
    student, teacher, batches, loss_of, params, steps: int, lr: float, start: float, time_limit, quiet: bool
) -> list[float]:
    """Adam on ``loss_of(student logits, teacher logits, targets)`` over ``batches``, for ``steps`` steps or until
    ``time_limit`` seconds (None: no limit) have passed since ``start``; returns the loss of every step taken."""
    optimizer = torch.optim.Adam(params, lr=lr, betas=BETAS)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="distill", disable=quiet, leave=False)
    for step in bar:
        elapsed = time.perf_counter() - start
        if time_limit is not None and elapsed >= time_limit:
            break
        time_used = elapsed / time_limit if time_limit else 0.0
        rate = learning_rate(
            step, steps=steps, lr=lr, warmup=max(5, steps // 10), min_ratio=MIN_LR_RATIO, time_used=time_used
        )
        batch = next(batches)  # (b, s + 1)
        inputs, targets = batch[:, :-1], batch[:, 1:]  # (b, s) each
        with torch.no_grad():
            teacher_logits = teacher(inputs)  # (b, s, v)
        loss = loss_of(student(inputs), teacher_logits, targets)
        take_step(optimizer, loss, params, rate)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    return losses


@torch.no_grad()
def compare_with_teacher(
    teacher: TinyLM,
    models: dict[str, TinyLM],
    windows: torch.Tensor,
    *,
    batch_tokens: int = 2048,
    device: str = "cpu",
) -> dict[str, Comparison]:
    """Perplexity and KL(p_teacher ‖ p_model) per predicted token of the teacher and each model on ``windows``.

    windows (n, s + 1) token ids.  The teacher runs once per batch for all models (its logits are the costly part
    on a large vocabulary), ⌊batch_tokens / s⌋ windows at a time.  Returns {"teacher": …, name: … for models};
    the teacher's own KL is 0.  Every model moves to ``device`` for the measurement and back afterwards.
    """
    if not isinstance(teacher, TinyLM) or not all(isinstance(m, TinyLM) for m in models.values()):
        raise ValueError("teacher and every model must be TinyLMs")
    if "teacher" in models:
        raise ValueError("'teacher' names the teacher's own row; give the other models other names")
    windows = require_tokens("windows", windows, teacher.config.vocab_size, min_len=2)
    require_positive_int("batch_tokens", batch_tokens)
    dev = resolve_device(device)
    s = windows.shape[1] - 1
    per_batch = max(1, batch_tokens // s)
    totals = {name: [0.0, 0.0] for name in ("teacher", *models)}  # Σ nll, Σ KL
    modes = {name: m.training for name, m in models.items()}
    teacher_mode = teacher.training
    teacher.eval()
    for m in models.values():
        m.eval()
    try:
        with MovedTo(dev, teacher, *models.values()):
            for chunk in windows.split(per_batch):
                chunk = chunk.to(dev)
                inputs, targets = chunk[:, :-1], chunk[:, 1:].flatten()  # (b, s), (b·s,)
                reference = F.log_softmax(teacher(inputs).flatten(0, 1).float(), dim=-1)  # (b·s, v)
                totals["teacher"][0] += F.nll_loss(reference, targets, reduction="sum").item()
                for name, model in models.items():
                    log_probs = F.log_softmax(model(inputs).flatten(0, 1).float(), dim=-1)  # (b·s, v)
                    totals[name][0] += F.nll_loss(log_probs, targets, reduction="sum").item()
                    totals[name][1] += kl_from_log_probs(reference, log_probs).sum().item()  # Σ KL(p_t ‖ p_m)
    finally:
        teacher.train(teacher_mode)
        for name, m in models.items():
            m.train(modes[name])
    count = windows.shape[0] * s
    return {
        name: Comparison(
            loss=nll / count, perplexity=math.exp(nll / count), kl_to_teacher=max(kl / count, 0.0), tokens=count
        )
        for name, (nll, kl) in totals.items()
    }

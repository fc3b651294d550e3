"""Layer-by-layer recovery of a converted model: each attention layer trained on its own against its source layer.

``recovery.recover`` fine-tunes through ``train``: the whole model runs forward and backward on every step, and that
is the expensive part on a real model (a 49,152-word head alone is a fifth of SmolLM2-135M's weights).  A
conversion changes only the attention layers, and each was fit against its source layer on its own, so each can
be trained on its own as well:

    x_l = RMSNorm_l(h_l(teacher))                    the teacher's hidden states entering layer l, after its input norm
    y_l = Attention_l(teacher)(x_l)                  the teacher layer's attention output: the target
    E_l = Σ ‖MLA_l(student)(x_l) − y_l‖² / Σ ‖y_l‖²  (sums over the batch's token positions)

Adam lowers E_l on random batches of calibration windows, layer by layer; nothing else of the student moves.  A
step costs one attention layer forward and backward on the batch, against the whole model (MLPs, head, teacher)
for a step of ``recover``, so the same time buys far more token positions.  The teacher's stream is carried through
one layer at a time (``mla_ref.recovery.activations``), so only that layer's activations are held: h, x and y, each
(n, s, D).

A batch is a set of whole windows, not scattered token positions: the attention output at position t depends on
every earlier position of its window, so a position can only be recomputed together with its window's prefix, and
the target y was computed over whole windows.  ``batch_tokens`` therefore buys ⌊batch_tokens / s⌋ windows.

Each layer goes through four steps (``_recover_layer``): prepare (x_l, y_l, the errors before) → train
(``_fit_layer``) → check (a layer whose loss rose on the last eighth of the windows, never trained on, keeps its
weights from before) → carry the streams on to layer l + 1.

The first position's weight (``first_weight``, w): the loss is E_l + w · E_l,0, where E_l,0 is the relative error at
each window's first position alone.  Why: a real model's first token grows a massive hidden state (SmolLM2: norm
~25,000 from layer 11, against ~200 for the others), the attention sink every later layer leans on, and it grows only
while that token's stream stays close to the source's.  The first token attends to itself alone, so its output is a
fixed linear map of its input, which E_l, averaged over a window, weighs 1/s.  Measured at 12.5% of SmolLM2's cache
(330 steps per layer, 32,768 calibration tokens): with w = 0, 15 of 16 held-out code windows lost a third of their
perplexity, but in one the first token never grew its massive state and perplexity went from 75 to 10 million; with
w = 1 that window was sound (53) but two others broke the same way, and prose came out far better (7.3× the source's
perplexity against 22.7×).  The sink's trigger stays fragile under both: the check before writing
(``mla_ref.pipelines.recover``) refused the w = 1 model, and passed the w = 0 one, whose check windows held no such
window.

Whose inputs (``inputs``): "teacher" (above) or "student": layer l reads the *student's* hidden states, carried
through the student's layers as already trained, and still learns the teacher's output y_l.  The student then meets at
training time the inputs it will see (what its earlier layers got wrong included), at the price of a second stream of
activations (the student's) and its forward through each block.  Measured: the same on the lab's GQA teacher at 25%
(KL 0.52 → 0.11 either way); far worse on SmolLM2 at 25% (100 steps per layer: KL to the source 1.30 → 2.78 nats,
where the teacher's inputs take it down): there the student's stream drifts so far that from layer 18 on E_l starts
above 1 (layer 18: 26), and no layer trained on that stream brings it back.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from mla_ref._checks import require_choice, require_number, require_positive_int, require_tokens, resolve_device
from mla_ref.model import TinyLM
from mla_ref.progress import tqdm
from mla_ref.recovery.activations import Streams, layer_error
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
from mla_ref.train import learning_rate

LAYERWISE_INPUTS: tuple[str, ...] = ("teacher", "student")
# the last 1/8 of the calibration windows are not trained on: they decide whether a layer keeps its training
CHECK_FRACTION = 8


@dataclass(frozen=True)
class LayerRecovery:
    """One layer of ``recover_layerwise``: its relative squared error E_l before and after, and what it took."""

    layer: int
    error_before: float  # E_l on the (first) calibration windows, before training
    error_after: float  # the same, after
    held_out_before: float | None  # E_l on the held-out windows (None without them)
    held_out_after: float | None
    steps: int  # optimiser steps taken (fewer than asked when the time limit cut the layer short)
    seconds: float  # wall time of the layer, its activations and measurements included
    reverted: bool = False  # training raised E_l on the check windows, so the layer kept its weights from before


@dataclass(frozen=True)
class LayerwiseResult:
    """What ``recover_layerwise`` did: per-layer errors and steps, tokens and time."""

    layers: list[LayerRecovery]
    calibration_tokens: int  # n · s token positions whose teacher activations were computed
    measured_tokens: int  # the first of them, on which E_l was measured
    held_out_tokens: int  # m · s' held-out token positions on which E_l was also measured (0 without them)
    trained_tokens: int  # token positions the optimiser saw, over all layers: Σ_l steps_l · windows per batch · s
    wall_seconds: float
    cpu_seconds: float  # this process's CPU time (all its threads); on a GPU, the host's share only
    time_limited: bool  # the time limit cut at least one layer short
    device: str
    inputs: str = "teacher"  # whose hidden states each layer read: the teacher's or the student's own

    @property
    def steps(self) -> int:
        """Optimiser steps over all layers."""
        return sum(layer.steps for layer in self.layers)


def recover_layerwise(
    student: TinyLM,
    teacher: TinyLM,
    tokens: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_tokens: int,
    device: str = "cpu",
    quiet: bool = True,
    time_limit_s: float | None = None,
    held_out: torch.Tensor | None = None,
    keep: tuple[str, ...] = (),
    seed: int = 0,
    chunk_tokens: int = 8192,
    measure_tokens: int = 16384,
    balance: bool = True,
    inputs: str = "teacher",
    first_weight: float = 1.0,
    log=None,
) -> LayerwiseResult:
    """Train each attention layer of ``student`` to reproduce the teacher's (see the module docstring), in place.

    Layer by layer, Adam lowers E_l + w · E_l,0 for ``steps`` steps on batches of ⌊batch_tokens / s⌋ whole windows
    drawn at random (warm-up, then a cosine to lr/10; gradients clipped to norm 1).  Only the student's attention
    layers change; the teacher is not modified.

    Args:
        student: the converted model (any attention); trained in place, left in eval mode.
        teacher: the source model: same depth, width and vocabulary.
        tokens: calibration windows (n, s) of token ids (the model's inputs only); the last ⌊n/8⌋ check each layer.
        steps: optimiser steps per layer.  lr: Adam's peak learning rate.
        batch_tokens: token positions per batch (whole windows: ⌊batch_tokens / s⌋ of them, at least one).
        device: "cpu" or "cuda": each layer and its activations move there while it is worked on, and the student's
            layers move back afterwards, so a model on the CPU comes back on the CPU.
        quiet: no progress bar.  log: called with one line of text per layer.
        time_limit_s: wall-clock seconds for the whole run, shared out among the layers (``_Run.budget``); None:
            every layer takes ``steps`` steps.
        held_out: optional windows (m, s') of other text on which E_l is also measured before and after.
        keep: names of attention parameters held fixed (e.g. "q_proj.bias", which stock DeepSeek-V3 cannot store).
        seed: seeds the batch sampler: the same inputs give the same weights (on one device).
        chunk_tokens: token positions per forward when computing activations and errors (memory, not results).
        measure_tokens: E_l is reported on the first ⌈measure_tokens / s⌉ calibration windows (all are trained on).
        balance: first bring each MLA layer's latent to unit scale (``balance_latent``, the same function), unless
            that would change a parameter in ``keep``.
        inputs, first_weight: whose hidden states each layer reads, and w; the module docstring says why.
    Returns:
        A ``LayerwiseResult``: E_l before and after on the calibration (and held-out) windows, steps, time.
    """
    run = _Run(
        student,
        teacher,
        tokens,
        held_out,
        steps=steps,
        lr=lr,
        batch_tokens=batch_tokens,
        device=device,
        time_limit_s=time_limit_s,
        keep=keep,
        seed=seed,
        chunk_tokens=chunk_tokens,
        measure_tokens=measure_tokens,
        balance=balance,
        inputs=inputs,
        first_weight=first_weight,
    )
    layers: list[LayerRecovery] = []
    bar = tqdm(range(student.config.n_layers), desc="layerwise", disable=quiet, leave=False)
    for index in bar:
        layers.append(_recover_layer(run, index))
        bar.set_postfix(error=f"{layers[-1].error_before:.3g}->{layers[-1].error_after:.3g}", refresh=False)
        if log is not None:
            log(_layer_line(layers[-1], time.perf_counter() - run.start))
    bar.close()
    student.eval()
    return run.result(layers)


@dataclass
class _Run:
    """One ``recover_layerwise`` call: its arguments, checked, and what its layers share (sizes, streams, clock)."""

    student: TinyLM
    teacher: TinyLM
    tokens: torch.Tensor
    held_out: torch.Tensor | None
    steps: int
    lr: float
    batch_tokens: int
    device: torch.device | str
    time_limit_s: float | None
    keep: tuple[str, ...]
    seed: int
    chunk_tokens: int
    measure_tokens: int
    balance: bool
    inputs: str
    first_weight: float

    def __post_init__(self):
        """Refuse bad arguments, one ValueError each; size the batches; embed the windows."""
        require_pair(self.student, self.teacher)
        for name in ("steps", "batch_tokens", "chunk_tokens", "measure_tokens"):
            require_positive_int(name, getattr(self, name))
        self.lr = require_number("lr", self.lr, lambda v: 0 < v < 1, "lie in (0, 1)")
        require_choice("inputs", self.inputs, LAYERWISE_INPUTS)
        self.first_weight = require_number(
            "first_weight", self.first_weight, lambda w: w >= 0, "be a non-negative number"
        )
        self.time_limit_s = require_time_limit(self.time_limit_s)
        self.device = resolve_device(self.device)
        self.keep = require_keep(self.student, self.keep)
        vocab = self.teacher.config.vocab_size
        self.tokens = require_tokens("tokens", self.tokens, vocab, min_len=1)
        if self.held_out is not None:
            self.held_out = require_tokens("held_out", self.held_out, vocab, min_len=1)
        n, s = self.tokens.shape
        self.n_train = n - n // CHECK_FRACTION  # the windows trained on; the rest check each layer's training
        self.per_batch = min(self.n_train, max(1, self.batch_tokens // s))  # windows per batch
        self.chunk = max(1, self.chunk_tokens // s)  # windows per forward when measuring
        # E_l is reported on the first windows: a measurement over all of them would cost ~100 training steps
        self.measured = min(self.n_train, math.ceil(self.measure_tokens / s))
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.generator = torch.Generator().manual_seed(self.seed)  # on the CPU: the same batches whatever the device
        self.student.eval()
        self.teacher.eval()
        own = self.student if self.inputs == "student" else None
        self.calibration = Streams.embedded(self.tokens, self.teacher, own, self.device, self.chunk)
        self.held = None
        if self.held_out is not None:  # (m, s', D) each
            self.held = Streams.embedded(self.held_out, self.teacher, own, self.device, self.chunk)

    def budget(self, index: int, prepared: float) -> float | None:
        """Seconds of training for layer ``index``: an equal share of what is left of the time limit, less what its
        measurements (``prepared`` seconds before training) will cost again afterwards; None without a limit."""
        if self.time_limit_s is None:
            return None
        left = self.time_limit_s - (time.perf_counter() - self.start)
        return max(0.0, left / (self.student.config.n_layers - index) - prepared)

    def result(self, layers: list[LayerRecovery]) -> LayerwiseResult:
        """What the run did, once every layer is done."""
        n, s = self.tokens.shape
        return LayerwiseResult(
            layers=layers,
            calibration_tokens=n * s,
            measured_tokens=min(n, self.measured) * s,
            held_out_tokens=0 if self.held_out is None else self.held_out.numel(),
            trained_tokens=sum(layer.steps for layer in layers) * self.per_batch * s,
            wall_seconds=time.perf_counter() - self.start,
            cpu_seconds=time.process_time() - self.cpu_start,
            time_limited=any(layer.steps < self.steps for layer in layers),
            device=str(self.device),
            inputs=self.inputs,
        )


@dataclass
class _LayerWork:
    """One layer's activations, its errors before training, and its weights from before (``_prepare_layer``)."""

    x: torch.Tensor  # (n, s, D): what the student's layer reads
    y: torch.Tensor  # (n, s, D): the teacher layer's output, the target
    held: tuple[torch.Tensor, torch.Tensor] | None  # (x, y) on the held-out windows, (m, s', D) each
    before: float  # E_l on the measured windows
    check_before: float | None  # E_l + w · E_l,0 on the check windows (None without them)
    held_before: float | None
    untrained: dict[str, torch.Tensor] | None


def _recover_layer(run: _Run, index: int) -> LayerRecovery:
    """Layer ``index``: prepare → train → check → carry the streams on to the next layer."""
    layer_start = time.perf_counter()
    block, own_block = run.teacher.layers[index], run.student.layers[index]
    attention = own_block.self_attn
    with MovedTo(run.device, block, own_block), torch.no_grad():
        work = _prepare_layer(run, block, own_block)
    budget = run.budget(index, prepared=time.perf_counter() - layer_start)
    with MovedTo(run.device, attention):
        taken = _fit_layer(attention, work.x[: run.n_train], work.y[: run.n_train], run, budget)
    with MovedTo(run.device, block, own_block), torch.no_grad():
        reverted = _revert_if_worse(attention, work, run)
        after = layer_error(attention, work.x[: run.measured], work.y[: run.measured], run.chunk)
        held_after = None
        if run.held is not None:
            held_after = layer_error(attention, *work.held, run.chunk)
            run.held.advance(block, own_block, *work.held, run.chunk)
        run.calibration.advance(block, own_block, work.x, work.y, run.chunk)
    return LayerRecovery(
        layer=index,
        error_before=work.before,
        error_after=after,
        held_out_before=work.held_before,
        held_out_after=held_after,
        steps=taken,
        seconds=time.perf_counter() - layer_start,
        reverted=reverted,
    )


def _prepare_layer(run: _Run, block: torch.nn.Module, own_block: torch.nn.Module) -> _LayerWork:
    """x_l and y_l on every window, the latent balanced on the first, and the layer's errors before training."""
    attention = own_block.self_attn
    x, y = run.calibration.layer(block, own_block, run.chunk)  # (n, s, D) each: what the layer reads, the target
    if run.balance and not touches_kept(attention, run.keep):
        balance_latent(attention, x[: run.measured])
    before = layer_error(attention, x[: run.measured], y[: run.measured], run.chunk)
    check_before = None
    if run.n_train < len(x):  # the check windows judge the layer by the loss it trains on
        check_before = layer_error(attention, x[run.n_train :], y[run.n_train :], run.chunk, run.first_weight)
    held, held_before = None, None
    if run.held is not None:
        held = run.held.layer(block, own_block, run.chunk)  # (m, s', D) each
        held_before = layer_error(attention, *held, run.chunk)
    untrained = {k: v.clone() for k, v in attention.state_dict().items()}
    return _LayerWork(x, y, held, before, check_before, held_before, untrained)


def _fit_layer(attention: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, run: _Run, budget: float | None) -> int:
    """Adam on E + w · E_0 over random batches of windows; returns the steps taken.

        E   = Σ_{b,t} ‖attention(x)_{b,t} − y_{b,t}‖² / Σ_{b,t} ‖y_{b,t}‖²   (every position of the batch)
        E_0 = Σ_b ‖attention(x)_{b,0} − y_{b,0}‖² / Σ_b ‖y_{b,0}‖²           (each window's first position)

    Shapes: x, y (n, s, D) on the attention's device.  Stops after ``run.steps`` or when ``budget`` seconds are spent.
    """
    params = trainable(attention, run.keep)
    with training_only(attention, params):
        optimizer = torch.optim.Adam(params, lr=run.lr, betas=BETAS)
        start, taken = time.perf_counter(), 0
        for step in range(run.steps):
            elapsed = time.perf_counter() - start
            if budget is not None and elapsed >= budget:
                break
            lr = learning_rate(
                step,
                steps=run.steps,
                lr=run.lr,
                warmup=max(1, run.steps // 20),
                min_ratio=MIN_LR_RATIO,
                time_used=elapsed / budget if budget else 0.0,
            )
            rows = torch.randperm(len(x), generator=run.generator)[: run.per_batch].to(x.device)  # (b,) windows
            target = y[rows]  # (b, s, D)
            error = attention(x[rows]) - target  # (b, s, D)
            loss = error.pow(2).sum() / target.pow(2).sum()
            if run.first_weight:
                loss = loss + run.first_weight * error[:, 0].pow(2).sum() / target[:, 0].pow(2).sum()
            take_step(optimizer, loss, params, lr)
            taken += 1
    return taken


@torch.no_grad()
def _revert_if_worse(attention: torch.nn.Module, work: _LayerWork, run: _Run) -> bool:
    """Give the layer back its weights from before training if its loss on the check windows rose; True if so.

    Training can fit the training windows at the expense of others: on SmolLM2 at 25%, lr 1e-3, the first layer's
    held-out error rose from 0.018 to 0.027 while the others fell.
    """
    check = (work.x[run.n_train :], work.y[run.n_train :], run.chunk, run.first_weight)
    reverted = work.check_before is not None and layer_error(attention, *check) > work.check_before
    if reverted:
        attention.load_state_dict(work.untrained)
    work.untrained = None  # no longer needed: free its memory before the next layer
    return reverted


def _layer_line(layer: LayerRecovery, elapsed: float) -> str:
    """The log line of one layer: its error before and after (and on the held-out windows), steps, time so far."""
    line = f"layer {layer.layer:>3}  error {layer.error_before:.4g} -> {layer.error_after:.4g}"
    if layer.held_out_before is not None:
        line += f"  held-out {layer.held_out_before:.4g} -> {layer.held_out_after:.4g}"
    return line + f"  {layer.steps} steps  ({elapsed:.0f} s)"

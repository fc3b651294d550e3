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
one layer at a time, so only that layer's activations are held: h, x and y, each (n, s, D).

A batch is a set of whole windows, not scattered token positions: the attention output at position t depends on
every earlier position of its window, so a position can only be recomputed together with its window's prefix, and
the target y was computed over whole windows.  ``batch_tokens`` therefore buys ⌊batch_tokens / s⌋ windows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mla_ref._checks import require_choice, require_number, require_positive_int, require_tokens, resolve_device
from mla_ref.model import TinyLM
from mla_ref.progress import tqdm
from mla_ref.recovery.steps import (
    BETAS,
    GRAD_CLIP,
    MIN_LR_RATIO,
    MovedTo,
    balance_latent,
    require_keep,
    require_pair,
    touches_kept,
    trainable,
)
from mla_ref.train import learning_rate

LAYERWISE_INPUTS: tuple[str, ...] = ("teacher", "student")
CHECK_FRACTION = (
    8  # the last 1/8 of the calibration windows are not trained on: they decide whether a layer keeps its training
)


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


@torch.no_grad()
def _in_chunks(function, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """function applied to ``x`` (n, s, D) ``chunk`` windows at a time: (n, s, D') without a batch-sized peak."""
    return torch.cat([function(part) for part in x.split(chunk)])


@torch.no_grad()
def _embedded(model: TinyLM, tokens: torch.Tensor, device: torch.device, chunk: int) -> torch.Tensor:
    """The embedding rows of ``tokens`` (n, s) on ``device``: (n, s, D) fp32.  Looked up where the table is and
    moved in chunks, so a large vocabulary's table never has to move."""
    embed = model.embed_tokens.weight
    return torch.cat([F.embedding(part.to(embed.device), embed).float().to(device) for part in tokens.split(chunk)])


@torch.no_grad()
def _advance(block: torch.nn.Module, hidden: torch.Tensor, attended: torch.Tensor, chunk: int) -> torch.Tensor:
    """The rest of ``block`` after its attention: h + y, then the residual MLP.  (n, s, D) -> (n, s, D).

    ``attended`` is the block's attention output y on ``hidden``, already computed, so it is not run again.
    """

    def mlp(h: torch.Tensor) -> torch.Tensor:
        return h + block.mlp(block.post_attention_layernorm(h))

    return _in_chunks(mlp, hidden + attended, chunk)


@torch.no_grad()
def _relative_error(
    attention: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int, first_weight: float = 0.0
) -> float:
    """E + w · E_0 (``_fit_layer``'s loss) over all of ``x``, ``y`` (n, s, D), in fp64 sums; w = 0 gives E."""
    error, norm, first_error, first_norm = 0.0, 0.0, 0.0, 0.0
    for xs, ys in zip(x.split(chunk), y.split(chunk), strict=True):
        difference = (attention(xs) - ys).double()  # (c, s, D)
        error += difference.pow(2).sum().item()
        norm += ys.double().pow(2).sum().item()
        first_error += difference[:, 0].pow(2).sum().item()
        first_norm += ys[:, 0].double().pow(2).sum().item()
    return error / norm + (first_weight * first_error / first_norm if first_weight else 0.0)


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
    """Train each attention layer of ``student`` to reproduce the teacher's on the teacher's own inputs, in place.

    See the comment above for the error E_l it lowers.  Layer by layer: the teacher's hidden states on ``tokens``
    are carried to layer l, its input norm and attention give x_l and y_l, and Adam trains the student's layer l
    for ``steps`` steps (warm-up, then a cosine to lr/10; gradients clipped to norm 1) on batches of
    ⌊batch_tokens / s⌋ whole windows (at least one) drawn at random.  The last eighth of the windows is kept out of
    training: a layer whose E_l there is higher after training than before keeps its weights from before (on
    SmolLM2 at 25%, lr 1e-3, the first layer's held-out error rose from 0.018 to 0.027 while the others fell).
    Everything but the attention layers is left untouched, and so is the teacher.

    Args:
        student: the converted model (any attention); trained in place, left in eval mode.
        teacher: the source model: same depth, width and vocabulary; not modified.
        tokens: calibration windows (n, s) of token ids (the model's inputs only; no shifted targets needed);
            the first n − ⌊n/8⌋ are trained on, the last ⌊n/8⌋ are the check windows.
        steps: optimiser steps per layer.  lr: Adam's peak learning rate.
        batch_tokens: token positions per batch (whole windows: ⌊batch_tokens / s⌋ of them, at least one).
        device: "cpu" or "cuda": each layer and its activations move there while it is worked on, and the student's
            layers move back afterwards, so a model on the CPU comes back on the CPU.
        quiet: no progress bar.  log: called with one line of text per layer.
        time_limit_s: wall-clock seconds for the whole run.  Each layer gets an equal share of what is left when
            it starts (its measurements reserved out of it); its schedule decays over that share, and training
            stops when the share is spent.  None: every layer takes ``steps`` steps.
        held_out: optional windows (m, s') of other text on which E_l is also measured before and after.
        keep: names of attention parameters held fixed (e.g. "q_proj.bias", which stock DeepSeek-V3 cannot store).
        seed: seeds the batch sampler: the same inputs give the same weights (on one device).
        chunk_tokens: token positions per forward when computing activations and errors (memory, not results).
        measure_tokens: E_l on the calibration windows is measured on the first ⌈measure_tokens / s⌉ of them (all
            are trained on): enough for a figure, and a measurement over every window would cost as much as a
            hundred training steps on a long calibration set.
        balance: first bring each MLA layer's latent to unit scale (``balance_latent``, the same function), so
            Adam's steps are small relative changes for every matrix.  Skipped for a layer whose kv_b_proj or
            latent gain is in ``keep``.
        first_weight: w in the loss E_l + w · E_l,0, where E_l,0 is the relative error at each window's first
            position alone.  Why: a real model's first token grows a massive hidden state (SmolLM2: norm ~25,000
            from layer 11, against ~200 for the others), the attention sink every later layer leans on, and it
            grows only while that token's stream stays close to the source's.  The first token attends to itself
            alone, so its output is a fixed linear map of its input, which E_l, averaged over a window, weighs
            1/s.  Measured at 12.5% of SmolLM2's cache (330 steps per layer, 32,768 calibration tokens): with
            w = 0, 15 of 16 held-out code windows lost a third of their perplexity, but in one the first token
            never grew its massive state and perplexity went from 75 to 10 million; with w = 1 that window was
            sound (53) but two others broke the same way, and prose came out far better (7.3× the source's
            perplexity against 22.7×).  The sink's trigger stays fragile under both: the check before writing
            (``mla_ref.pipelines.recover``) refused the w = 1 model, and passed the w = 0 one, whose check windows held
            no such window.
        inputs: "teacher" (above) or "student": layer l reads the *student's* hidden states, carried through the
            student's layers as already trained, and still learns the teacher's output y_l.  The student then meets
            at training time the inputs it will see (what its earlier layers got wrong included), at the price of a
            second stream of activations (the student's) and its forward through each block.  Measured: the same on
            the lab's GQA teacher at 25% (KL 0.52 → 0.11 either way); far worse on SmolLM2 at 25% (100 steps per
            layer: KL to the source 1.30 → 2.78 nats, where the teacher's inputs take it down): there the student's
            stream drifts so far that from layer 18 on E_l starts above 1 (layer 18: 26), and no layer trained on
            that stream brings it back.
    Returns:
        A ``LayerwiseResult``: E_l before and after on the calibration (and held-out) windows, steps, time.
    """
    require_pair(student, teacher)
    require_positive_int("steps", steps)
    lr = require_number("lr", lr, lambda v: 0 < v < 1, "lie in (0, 1)")
    require_positive_int("batch_tokens", batch_tokens)
    require_positive_int("chunk_tokens", chunk_tokens)
    require_positive_int("measure_tokens", measure_tokens)
    require_choice("inputs", inputs, LAYERWISE_INPUTS)
    first_weight = require_number("first_weight", first_weight, lambda w: w >= 0, "be a non-negative number")
    time_limit = None
    if time_limit_s is not None:
        time_limit = require_number(
            "time_limit_s", time_limit_s, lambda t: t > 0, "be a positive number of seconds or None"
        )
    dev = resolve_device(device)
    keep = require_keep(student, keep)
    tokens = require_tokens("tokens", tokens, teacher.config.vocab_size, min_len=1)
    if held_out is not None:
        held_out = require_tokens("held_out", held_out, teacher.config.vocab_size, min_len=1)
    n, s = tokens.shape
    n_check = n // CHECK_FRACTION  # the check windows
    n_train = n - n_check
    per_batch = min(n_train, max(1, batch_tokens // s))  # windows per batch
    chunk = max(1, chunk_tokens // s)  # windows per forward when measuring
    measured = min(n_train, math.ceil(measure_tokens / s))  # the first windows, on which E_l is reported

    start, cpu_start = time.perf_counter(), time.process_time()
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same batches whatever the device
    student.eval()
    teacher.eval()
    own = inputs == "student"
    calibration = _Streams(
        _embedded(teacher, tokens, dev, chunk), _embedded(student, tokens, dev, chunk) if own else None
    )
    held = None
    if held_out is not None:
        held = _Streams(
            _embedded(teacher, held_out, dev, chunk), _embedded(student, held_out, dev, chunk) if own else None
        )  # (m, s', D) each
    layers: list[LayerRecovery] = []
    limited = False
    n_layers = student.config.n_layers
    bar = tqdm(range(n_layers), desc="layerwise", disable=quiet, leave=False)
    for index in bar:
        layer_start = time.perf_counter()
        block, own_block = teacher.layers[index], student.layers[index]
        attention = own_block.self_attn
        with MovedTo(dev, block, own_block), torch.no_grad():
            x, y = calibration.layer(block, own_block, chunk)  # (n, s, D) each: what the layer reads, the target
            if balance and not touches_kept(attention, keep):
                balance_latent(attention, x[:measured])
            before = _relative_error(attention, x[:measured], y[:measured], chunk)
            check = (x[n_train:], y[n_train:], chunk, first_weight)  # judged by the loss it trains on
            check_before = _relative_error(attention, *check) if n_check else None
            if held is not None:
                held_x, held_y = held.layer(block, own_block, chunk)  # (m, s', D) each
                held_before = _relative_error(attention, held_x, held_y, chunk)
            untrained = {k: v.clone() for k, v in attention.state_dict().items()}
        prepared = time.perf_counter() - layer_start
        budget = None
        if time_limit is not None:
            # an equal share of what is left, less what this layer's measurements will cost again afterwards
            left = time_limit - (time.perf_counter() - start)
            budget = max(0.0, left / (n_layers - index) - prepared)
        with MovedTo(dev, attention):
            taken = _fit_layer(
                attention, x[:n_train], y[:n_train], steps, lr, per_batch, budget, keep, generator, first_weight
            )
        limited = limited or taken < steps
        with MovedTo(dev, block, own_block), torch.no_grad():
            reverted = bool(n_check) and _relative_error(attention, *check) > check_before
            if reverted:  # it learnt the training windows at the expense of others: keep the layer as it was
                attention.load_state_dict(untrained)
            del untrained
            after = _relative_error(attention, x[:measured], y[:measured], chunk)
            held_after = None
            if held is not None:
                held_after = _relative_error(attention, held_x, held_y, chunk)
                held.advance(block, own_block, held_x, held_y, chunk)
                del held_x, held_y
            calibration.advance(block, own_block, x, y, chunk)
            del x, y
        layers.append(
            LayerRecovery(
                layer=index,
                error_before=before,
                error_after=after,
                held_out_before=None if held is None else held_before,
                held_out_after=held_after,
                steps=taken,
                seconds=time.perf_counter() - layer_start,
                reverted=reverted,
            )
        )
        bar.set_postfix(error=f"{before:.3g}->{after:.3g}", refresh=False)
        if log is not None:
            held_text = "" if held is None else f"  held-out {held_before:.4g} -> {held_after:.4g}"
            log(
                f"layer {index:>3}  error {before:.4g} -> {after:.4g}{held_text}  {taken} steps  "
                f"({time.perf_counter() - start:.0f} s)"
            )
    bar.close()
    student.eval()
    return LayerwiseResult(
        layers=layers,
        calibration_tokens=n * s,
        measured_tokens=min(n, measured) * s,
        held_out_tokens=0 if held_out is None else held_out.numel(),
        trained_tokens=sum(layer.steps for layer in layers) * per_batch * s,
        wall_seconds=time.perf_counter() - start,
        cpu_seconds=time.process_time() - cpu_start,
        time_limited=limited,
        device=str(dev),
        inputs=inputs,
    )


class _Streams:
    """The hidden states of some windows entering the current layer: the teacher's, and the student's when the
    student trains on its own inputs.  Shapes: (n, s, D) each."""

    def __init__(self, teacher: torch.Tensor, student: torch.Tensor | None):
        self.teacher, self.student = teacher, student

    def layer(
        self, block: torch.nn.Module, own_block: torch.nn.Module, chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): what the student's layer reads (the teacher's or its own normalised stream) and the teacher
        layer's attention output on the teacher's stream, the target."""
        x = _in_chunks(block.input_layernorm, self.teacher, chunk)
        y = _in_chunks(block.self_attn, x, chunk)
        if self.student is not None:
            x = _in_chunks(own_block.input_layernorm, self.student, chunk)
        return x, y

    def advance(self, block, own_block, x: torch.Tensor, y: torch.Tensor, chunk: int) -> None:
        """Carry the streams through the layer: the teacher's with y, the student's with its trained attention."""
        # the teacher's stream moves on to layer l + 1: h + y, then the block's MLP
        self.teacher = _advance(block, self.teacher, y, chunk)
        if self.student is not None:
            self.student = _advance(own_block, self.student, _in_chunks(own_block.self_attn, x, chunk), chunk)


def _fit_layer(
    attention: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    per_batch: int,
    budget: float | None,
    keep: tuple[str, ...],
    generator: torch.Generator,
    first_weight: float,
) -> int:
    """Adam on E + w · E_0 over random batches of windows; returns the steps taken.

        E   = Σ_{b,t} ‖attention(x)_{b,t} − y_{b,t}‖² / Σ_{b,t} ‖y_{b,t}‖²   (every position of the batch)
        E_0 = Σ_b ‖attention(x)_{b,0} − y_{b,0}‖² / Σ_b ‖y_{b,0}‖²           (each window's first position)

    Shapes: x, y (n, s, D) on the attention's device.  Stops after ``steps`` or when ``budget`` seconds are spent.
    """
    saved = [(p, p.requires_grad) for p in attention.parameters()]
    params = trainable(attention, keep)
    for p in attention.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr, betas=BETAS)
    start = time.perf_counter()
    taken = 0
    try:
        for step in range(steps):
            elapsed = time.perf_counter() - start
            if budget is not None and elapsed >= budget:
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(
                    step,
                    steps=steps,
                    lr=lr,
                    warmup=max(1, steps // 20),
                    min_ratio=MIN_LR_RATIO,
                    time_used=elapsed / budget if budget else 0.0,
                )
            rows = torch.randperm(len(x), generator=generator)[:per_batch].to(x.device)  # (b,) window indices
            target = y[rows]  # (b, s, D)
            error = attention(x[rows]) - target  # (b, s, D)
            loss = error.pow(2).sum() / target.pow(2).sum()
            if first_weight:
                loss = loss + first_weight * error[:, 0].pow(2).sum() / target[:, 0].pow(2).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            optimizer.step()
            taken += 1
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None
    return taken

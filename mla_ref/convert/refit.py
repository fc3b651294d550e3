"""Output refit: after a lossy conversion, re-solve o_proj so the layer's output matches its source's.

A conversion below the source's cache loses something in the scores (dropped rotary dimensions) and in the
values (a small latent).  Whatever each head now attends to, the module's output is still linear in the heads'
outputs z = [softmax(s_1) V_1 ; … ; softmax(s_h) V_h] ∈ R^{h·d_v}:

    y = W_O z                                   (o_proj; its bias, if any, is kept)

so the W_O that brings y closest to the source layer's output y_src on the calibration inputs is a least-squares
fit, solved in closed form.  ZᵀZ is singular as a rule — each head's values come from the d_c-dimensional latent, so
Z has rank at most h·min(d_v, d_c) — hence the ridge, which keeps the directions Z never spans at zero:

    W_O = Y_srcᵀ Z (ZᵀZ + λ I)⁻¹,   λ = ridge · mean(diag(ZᵀZ))

Z (T, h·d_v) and Y_src (T, d_model) stack the T calibration tokens.  Where the conversion is lossless, the fit
reproduces the source's output up to the ridge's small bias; where it is not, it lowers the calibration error.  It
keeps the cache and the module's form (DeepSeek-V3's o_proj), and the absorbed decode path folds the new W_O as it
did the old.  This step is this project's addition, not TransMLA's or MHA2MLA's; the whole training-free recipe
that ends with it is ``recipe_convert`` in ``mla_ref.convert.methods.recipe``.

It is a training-free step: a model that will be fine-tuned is better started without it.  On the GQA teacher at
25% of its cache the refit takes TransMLA's conversion from 2.12× to 1.89× the teacher's perplexity before any
training, yet after the same short fine-tune from both starts (lesson 09: 16 steps of 4 × 128 bytes, the attention
layers only) the start without it ends lower, 1.49× against 1.52×; and after the conversion-quality table's longer
fine-tune (2% of the pre-training tokens, all parameters) the earlier recipe (rotation budget) ended at 1.051×
without its refit and 1.060× with it (benchmarks/results/teachers.md).  With few calibration tokens it fits their
noise: it refuses fewer than two per unknown (``REFIT_TOKENS_PER_WEIGHT``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mla_ref._checks import require_number
from mla_ref.convert.activations import check_calibration_inputs
from mla_ref.mla import MultiHeadLatentAttention
from mla_ref.threads import all_threads

REFIT_TOKENS_PER_WEIGHT = 2  # calibration tokens per unknown of one output row that the refit asks for


@torch.no_grad()
def refit_output_proj(
    converted: MultiHeadLatentAttention,
    source: nn.Module,
    calibration_inputs: torch.Tensor,
    *,
    ridge: float = 1e-4,
) -> MultiHeadLatentAttention:
    """Return a copy of ``converted`` whose o_proj weight best reproduces ``source``'s output (least squares).

    Shapes: calibration_inputs (b, s, d_model), what both modules read.  Neither module is modified.
    """
    if not isinstance(converted, MultiHeadLatentAttention):
        raise ValueError(f"converted must be a MultiHeadLatentAttention, got {type(converted).__name__}")
    require_number("ridge", ridge, lambda r: r > 0, "be a positive number")
    check_calibration_inputs(calibration_inputs, converted.d_model)
    refit, _ = refit_in_place(copy.deepcopy(converted), calibration_inputs, source(calibration_inputs), ridge)
    return refit


def refit_in_place(
    refit: MultiHeadLatentAttention, calibration_inputs: torch.Tensor, source_output: torch.Tensor, ridge: float
) -> tuple[MultiHeadLatentAttention, float]:
    """Solve ``refit``'s o_proj in place against ``source_output`` (b, s, d_model).

    Returns ``refit`` and its relative output error on the calibration inputs (``output_error``), from the
    normal equations: ‖Y − Z W‖² = ‖Y‖² − 2⟨W, ZᵀY⟩ + ⟨W, ZᵀZ W⟩, no second pass over the tokens; the error is
    also kept as ``refit.calibration_error``, which the split search reads instead of measuring it again.
    """
    target = source_output.flatten(0, 1).double()  # (T, d_model): y_src
    # the forward up to o_proj's input: with o_proj out of the way the module returns the heads' outputs z
    o_proj, refit.o_proj = refit.o_proj, nn.Identity()
    try:
        with all_threads():  # a layer's forward: the same result on any number of threads
            z = refit(calibration_inputs)  # (b, s, h·d_v)
    finally:
        refit.o_proj = o_proj
    z = z.flatten(0, 1).double()  # (T, h·d_v): the heads' outputs, o_proj's input
    if z.shape[0] < REFIT_TOKENS_PER_WEIGHT * z.shape[1]:
        # Fewer samples than about twice the unknowns per output row: the least-squares solution would fit the
        # calibration tokens' noise (on SmolLM2 at half its cache, 512 tokens for 576 unknowns gave perplexity
        # 1,833 against 12 with 4,096 tokens).
        raise ValueError(
            f"the output refit solves for {z.shape[1]} weights per output (h·d_v) from {z.shape[0]} calibration "
            f"tokens; it needs at least {REFIT_TOKENS_PER_WEIGHT * z.shape[1]}: give more calibration tokens "
            "(--calib-tokens), or use a method without the refit (transmla)"
        )
    if refit.o_proj.bias is not None:
        target = target - refit.o_proj.bias.double()  # the bias stays; W_O fits what is left
    with all_threads():  # matmuls: the same result on any number of threads
        gram, cross = z.T @ z, z.T @ target  # ZᵀZ (h·d_v, h·d_v), ZᵀY (h·d_v, d_model)
    lam = ridge * gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)  # λ, scaled to Z
    # W_Oᵀ = (ZᵀZ + λ I)⁻¹ Zᵀ Y_src
    weight_t = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), cross)
    refit.o_proj.weight.copy_(weight_t.T.to(refit.o_proj.weight.dtype))
    weight_t = refit.o_proj.weight.T.double()  # as stored
    target_energy = target.pow(2).sum()
    residual = target_energy - 2 * (weight_t * cross).sum() + (weight_t * (gram @ weight_t)).sum()
    norm = source_output.double().pow(2).sum()  # Σ‖y‖², the bias included
    refit.calibration_error = (residual.clamp_min(0) / norm).item()  # E_l on these inputs, for the split search
    return refit, refit.calibration_error


@torch.no_grad()
def output_error(module: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> float:
    """E = Σ‖module(x) − y‖² / Σ‖y‖²: the layer's relative squared output error on ``inputs`` (b, s, d_model)."""
    with all_threads():  # the forward on every thread; the sums below stay on the caller's
        output = module(inputs)
    return ((output - target).double().pow(2).sum() / target.double().pow(2).sum()).item()

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
did the old.  This step is this project's addition, not TransMLA's or MHA2MLA's; ``recipe_convert`` is the whole
training-free recipe that ends with it.

It is a training-free step: a model that will be fine-tuned is better started without it.  On the GQA teacher at
25% of its cache, the refit brought the earlier recipe (rotation budget) from 1.70× to 1.57× the teacher's perplexity,
but after the
conversion-quality table's fine-tune the un-refit model ends at 1.051× and the refit one at 1.060× (the least-squares
W_O fits the calibration slice closely, and the fine-tune first has to undo that).  With few calibration tokens it
fits their noise: it refuses fewer than two per unknown (``REFIT_TOKENS_PER_WEIGHT``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mla_ref._checks import require_number
from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert.activations import check_calibration_inputs, input_moment
from mla_ref.convert.bkv_pca import bkv_pca_parts, latent_metric_terms
from mla_ref.convert.parts import assemble_mla, check_source
from mla_ref.convert.rorope import RotatedKeyBasis, rorope_basis, rorope_parts
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
    refit, _ = _refit(copy.deepcopy(converted), calibration_inputs, source(calibration_inputs), ridge)
    return refit


def _refit(
    refit: MultiHeadLatentAttention, calibration_inputs: torch.Tensor, source_output: torch.Tensor, ridge: float
) -> tuple[MultiHeadLatentAttention, float]:
    """Solve ``refit``'s o_proj in place against ``source_output`` (b, s, d_model).

    Returns ``refit`` and its relative output error on the calibration inputs (``output_error``), from the
    normal equations: ‖Y − Z W‖² = ‖Y‖² − 2⟨W, ZᵀY⟩ + ⟨W, ZᵀZ W⟩, no second pass over the tokens.
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
    weight_t = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), cross)
    refit.o_proj.weight.copy_(weight_t.T.to(refit.o_proj.weight.dtype))
    weight_t = refit.o_proj.weight.T.double()  # as stored
    target_energy = target.pow(2).sum()
    residual = target_energy - 2 * (weight_t * cross).sum() + (weight_t * (gram @ weight_t)).sum()
    norm = source_output.double().pow(2).sum()  # Σ‖y‖², the bias included
    return refit, (residual.clamp_min(0) / norm).item()


# The key weights the recipe tries in each layer (``latent_metric``'s w): the balance, then ever more latent for the keys.
RECIPE_KEY_WEIGHTS: tuple[float, ...] = (1.0, 4.0, 16.0)


@torch.no_grad()
def output_error(module: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> float:
    """E = Σ‖module(x) − y‖² / Σ‖y‖²: the layer's relative squared output error on ``inputs`` (b, s, d_model)."""
    with all_threads():  # the forward on every thread; the sums below stay on the caller's
        output = module(inputs)
    return ((output - target).double().pow(2).sum() / target.double().pow(2).sum()).item()


@torch.no_grad()
def recipe_convert(
    source: GroupedQueryAttention,
    calibration_inputs: torch.Tensor,
    *,
    kv_lora_rank: int,
    rope_dim: int,
    freqfold: int = 1,
    ridge: float = 1e-4,
    key_weights: tuple[float, ...] = RECIPE_KEY_WEIGHTS,
    x_moment: torch.Tensor | None = None,
    basis: RotatedKeyBasis | None = None,
    source_output: torch.Tensor | None = None,
) -> MultiHeadLatentAttention:
    """mla_ref's training-free recipe: RoRoPE (one roped component per frequency, TransMLA's uniform budget), BKV-PCA
    with the score metric (lesson 06), then the output refit.  A cache of kv_lora_rank + rope_dim elements per token.

    The latent is shared by the keys and the values; how much of it the keys get is BKV-PCA's balance β times a key
    weight w.  The recipe converts the layer once for each w in ``key_weights`` and keeps the one whose refit output
    is closest to the source layer's on the calibration inputs (``output_error``).  Why: on SmolLM2-135M at a
    quarter of its cache (d_R 32, d_c 63) the best w differs by layer — 2 in the last layer, 16 or more in most
    middle ones — and choosing it per layer on the calibration tokens lowered the mean held-out layer error from
    0.209 (w = 1, the balance alone) to 0.177, where the best single w for all layers gave 0.178 and the per-layer
    best on the held-out text itself 0.176.

    With rope_dim ≤ d_h and freqfold 1 the roped components turn with the d_R/2 highest source frequencies: a
    standard RoPE table, which a stock DeepSeek-V3 checkpoint reproduces exactly.

    Shapes: calibration_inputs (b, s, d_model).  ``source`` is not modified.  What does not depend on the sizes,
    when already computed (``recipe_shared``, for converting one layer at several splits): ``x_moment`` E[x xᵀ] of
    the calibration inputs, RoRoPE's ``basis`` (``rorope_basis``), ``source_output`` the source layer's output on
    them (b, s, d_model).
    """
    if not key_weights:
        raise ValueError("key_weights must name at least one key weight, got none")
    check_source(source)
    if x_moment is None or basis is None or source_output is None:
        x_moment, basis, source_output = recipe_shared(source, calibration_inputs, freqfold=freqfold)
    rotated = rorope_parts(
        source, calibration_inputs, rope_dim=rope_dim, freqfold=freqfold, rope_budget="uniform", basis=basis
    )
    target = source_output  # (b, s, d_model): y_src
    # M_K, M_V and the balance of the score metric do not depend on the key weight: formed once for all three
    terms = latent_metric_terms(rotated, calibration_inputs, metric="score", x_moment=x_moment)
    best, best_error = None, float("inf")
    for key_weight in key_weights:
        parts = bkv_pca_parts(
            rotated, calibration_inputs, kv_lora_rank=kv_lora_rank, metric="score", key_weight=key_weight,
            x_moment=x_moment, metric_terms=terms,
        )  # fmt: skip
        converted, error = _refit(assemble_mla(parts, source.d_model), calibration_inputs, target, ridge)
        if error < best_error:
            best, best_error = converted, error
    return best


@torch.no_grad()
def recipe_shared(
    source: GroupedQueryAttention,
    calibration_inputs: torch.Tensor,
    *,
    freqfold: int = 1,
    source_output: torch.Tensor | None = None,
) -> tuple[torch.Tensor, RotatedKeyBasis, torch.Tensor]:
    """What ``recipe_convert`` reads of a layer whatever the sizes: E[x xᵀ] of the calibration inputs, RoRoPE's basis
    (its eigen-decompositions of the keys' second moments) and the source layer's output (b, s, d_model).  Converting
    a layer at several splits computes them once and passes them to every ``recipe_convert``; a ``source_output``
    given is used as it is."""
    check_source(source)
    with all_threads():  # a matmul over the tokens (and a check that they are finite): the same on any threads
        x_moment = input_moment(calibration_inputs, source.d_model).to(source.k_proj.weight.device)  # E[x xᵀ]
    basis = rorope_basis(source, calibration_inputs, freqfold=freqfold, x_moment=x_moment)
    if source_output is None:
        with all_threads():  # a layer's forward: the same result on any number of threads
            source_output = source(calibration_inputs)
    return x_moment, basis, source_output

"""``recipe``: mla_ref's training-free recipe, TransMLA's steps changed where measurement said so.

    1. RoRoPE with one roped component for each of the d_R/2 highest frequencies (d_R ≤ d_h), so that the one RoPE
       table of a DeepSeek-V3 config reproduces it exactly                               — ``convert.rorope``
    2. BKV-PCA weighted by the queries and W_O that read the latent (metric "score"), the keys' share of the
       latent chosen per layer (key weight 1, 4 or 16 × the balance)                       — ``convert.bkv_pca``
    3. the output refit: o_proj re-solved by least squares against the source layer's output on the calibration
       inputs                                                                               — ``convert.refit``

Sizes for a budget of B elements: d_R = min(B/2, d_h) or min(B/3, d_h), d_c = B − d_R; the converter converts
every layer at both and keeps the split whose whole converted model has the lower KL to the source on calibration
text (``convert.split_choice``).  No one rule fits every model: on SmolLM2-135M at 25% (B = 96) d_R 32 gave 2.31×
the source's perplexity where half the budget (48) gave 2.96×; on the GQA teacher half the budget wins (d_R 16:
1.77×, 10: 2.81×).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert.activations import input_moment
from mla_ref.convert.bkv_pca import bkv_pca_parts, latent_metric_terms
from mla_ref.convert.methods.base import Method, even
from mla_ref.convert.parts import MLAParts, assemble_mla, check_source
from mla_ref.convert.refit import REFIT_TOKENS_PER_WEIGHT, refit_in_place
from mla_ref.convert.rorope import RotatedKeyBasis, rorope_basis, rorope_parts
from mla_ref.mla import MultiHeadLatentAttention
from mla_ref.threads import all_threads

# The key weights the recipe tries in each layer (``latent_metric``'s w): the balance, then ever more latent for the keys.
RECIPE_KEY_WEIGHTS: tuple[float, ...] = (1.0, 4.0, 16.0)


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
    with the score metric (lesson 07), then the output refit.  A cache of kv_lora_rank + rope_dim elements per token.

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
    best, best_error = None, float("inf")
    for _key_weight, module in key_weight_candidates(
        source, rotated, calibration_inputs, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, key_weights=key_weights,
        x_moment=x_moment,
    ):  # fmt: skip
        converted, error = refit_in_place(module, calibration_inputs, target, ridge)
        if error < best_error:
            best, best_error = converted, error
    return best


@torch.no_grad()
def key_weight_candidates(
    source: GroupedQueryAttention,
    rotated: MLAParts,
    calibration_inputs: torch.Tensor,
    *,
    kv_lora_rank: int,
    rope_dim: int,
    key_weights: tuple[float, ...],
    x_moment: torch.Tensor,
) -> Iterator[tuple[float, MultiHeadLatentAttention]]:
    """The layer converted with each key weight, before its output refit: (key weight, MLA) pairs, one at a time.

    ``rotated``: RoRoPE's parts at this split (``rorope_parts``); ``x_moment``: E[x xᵀ] of the calibration inputs
    (b, s, d_model).  ``recipe_convert`` refits each and keeps the best; ``benchmarks/convert_floor.py`` times them.
    """
    # M_K, M_V and the balance of the score metric do not depend on the key weight: formed once for all of them
    terms = latent_metric_terms(rotated, calibration_inputs, metric="score", x_moment=x_moment)
    for key_weight in key_weights:
        parts = bkv_pca_parts(
            rotated, calibration_inputs, kv_lora_rank=kv_lora_rank, metric="score", key_weight=key_weight,
            x_moment=x_moment, metric_terms=terms,
        )  # fmt: skip
        yield key_weight, assemble_mla(parts, source.d_model, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim)


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


class Recipe(Method):
    name = "recipe"
    title = (
        "mla_ref's training-free recipe: RoRoPE on a measured share of the budget, a score-weighted latent, "
        "then the output refit"
    )
    steps = (
        "RoRoPE: the leading component of each of the d_R/2 highest frequencies stays roped (d_R at most d_h), "
        "so the one RoPE table of a DeepSeek-V3 config is exact; from a budget, d_R is half or a third of it, "
        "whichever gives the converted model the lower KL to the source on the calibration tokens",
        "BKV-PCA weighted by the queries and W_O that read the latent (metric 'score'), the keys' share "
        "of the latent chosen per layer: key weight 1, 4 or 16 × the balance, the one with the lowest output "
        "error on the calibration tokens after the refit",
        "output refit: o_proj re-solved by least squares against the source layer's output on the calibration inputs",
    )
    options = ("freqfold",)

    def split(self, source: GroupedQueryAttention, elements: int) -> tuple[int, int]:
        # one roped component per frequency keeps the rotary table a standard one, which a DeepSeek-V3 config (one θ'
        # for the model) reproduces exactly; a second component of one frequency could not
        rope_dim = min(even(elements // 2), even(source.head_dim))
        return rope_dim, elements - rope_dim

    def other_rope_dims(self, source: GroupedQueryAttention, elements: int) -> tuple[int, ...]:
        return (min(even(elements // 3), even(source.head_dim)),)  # a third of the budget

    def calibration_tokens_needed(self, source: GroupedQueryAttention) -> int:
        # the refit solves h·d_v unknowns per output row and asks for REFIT_TOKENS_PER_WEIGHT tokens each
        return REFIT_TOKENS_PER_WEIGHT * source.n_heads * source.head_dim

    def convert(
        self, source: GroupedQueryAttention, calibration_inputs: torch.Tensor, sizes: dict
    ) -> MultiHeadLatentAttention:
        return recipe_convert(source, calibration_inputs, **sizes)

    def convert_candidates(
        self,
        source: GroupedQueryAttention,
        calibration_inputs: torch.Tensor,
        candidates: list[dict],
        source_output: torch.Tensor | None = None,
    ) -> list[MultiHeadLatentAttention]:
        # E[x xᵀ], RoRoPE's basis and the source layer's output do not depend on the split: computed once per freqfold
        shared = {}
        converted = []
        for sizes in candidates:
            freqfold = sizes.get("freqfold", 1)
            if freqfold not in shared:
                shared[freqfold] = recipe_shared(
                    source, calibration_inputs, freqfold=freqfold, source_output=source_output
                )
            moment, basis, output = shared[freqfold]
            converted.append(
                recipe_convert(source, calibration_inputs, **sizes, x_moment=moment, basis=basis, source_output=output)
            )
        return converted

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

import torch

from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert.methods.base import Method
from mla_ref.convert.refit import REFIT_TOKENS_PER_WEIGHT, recipe_convert, recipe_shared
from mla_ref.convert.sizes import even
from mla_ref.mla import MultiHeadLatentAttention


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

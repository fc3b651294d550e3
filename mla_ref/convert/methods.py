"""The conversion methods by name: one registry, so a name means the same thing in the command line, the
benchmarks, the demo and the lessons.

Each ``Method`` says what it does (its steps, as CONVERSION.md lists them), how its sizes follow from a cache
budget, and which function converts one layer.  A budget is a fraction F of the source's cache per token and
layer: B = round(F · 2 n_kv d_h) elements, spent on the shared RoPE key (d_R) and the latent (d_c):

    exact      d_c + d_R = 2 n_kv d_h (F = 1 only)   TransMLA's identity: GQA's [K; V] cache is the latent
    transmla   d_R = min(DeepSeek's 64 or d_h/2, B/2), d_c = B − d_R
    mha2mla    r = B / (4 n_kv) rotary pairs per KV head (d_R = 2 r n_kv, half of B), d_c = B − d_R
    recipe     d_R = min(B/2, d_h) or min(B/3, d_h), whichever converts the layers with the lower mean output error
               on the calibration tokens (``split_choice``); d_c = B − d_R  (d_R ≤ d_h: one roped component per
               frequency)

``reserve`` elements of B (e.g. the one anchored latent coordinate of a stock DeepSeek-V3 output) are taken
from d_c, so the cache as written meets the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mla_ref._checks import require_choice, require_non_negative_int, require_positive_int
from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert.bkv_pca import transmla_convert
from mla_ref.convert.exact import gqa_to_mla_exact
from mla_ref.convert.refit import REFIT_TOKENS_PER_WEIGHT, recipe_convert
from mla_ref.convert.rorope import default_rope_dim
from mla_ref.convert.svd_low_rank import mha2mla_convert, mha2mla_ranks
from mla_ref.mla import MultiHeadLatentAttention


def _even(n: int) -> int:
    return n // 2 * 2


def budget_elements(source: GroupedQueryAttention, fraction: float) -> int:
    """B = round(fraction · 2 n_kv d_h): the cache elements per token and layer a budget allows."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"budget must be a fraction of the source's cache in (0, 1], got {fraction!r}")
    return round(fraction * 2 * source.n_kv_heads * source.head_dim)


@dataclass(frozen=True)
class Method:
    """One conversion method: what it is, how its sizes follow from a budget, and the layer converter.

    ``split(source, budget)`` -> (d_R, d_c) for B = ``budget`` elements, the method's rule; ``other_rope_dims(source,
    budget)`` -> further d_R the method tries for a budget, the split with the lowest mean calibration error kept
    (``candidate_sizes``, ``mla_ref.convert.split_choice``); ``convert(source, calibration_inputs, sizes)`` -> the
    MLA layer, with ``sizes`` from ``Method.sizes``.
    """

    name: str
    title: str
    steps: tuple[str, ...]
    options: tuple[str, ...]  # extra keyword options the converter accepts (e.g. TransMLA's freqfold)
    split: Callable[[GroupedQueryAttention, int], tuple[int, int]] | None
    convert: Callable[[GroupedQueryAttention, torch.Tensor, dict], MultiHeadLatentAttention]
    other_rope_dims: Callable[[GroupedQueryAttention, int], tuple[int, ...]] | None = None
    refits_output: bool = False  # o_proj re-solved by least squares: it needs enough calibration tokens

    def calibration_tokens_needed(self, source: GroupedQueryAttention) -> int:
        """The fewest calibration tokens the method converts ``source`` from: the output refit solves h·d_v unknowns
        per output row and asks for ``REFIT_TOKENS_PER_WEIGHT`` tokens each; the other methods need one window."""
        return REFIT_TOKENS_PER_WEIGHT * source.n_heads * source.head_dim if self.refits_output else 1

    def candidate_sizes(
        self,
        source: GroupedQueryAttention,
        *,
        budget: float | None = None,
        kv_lora_rank: int | None = None,
        rope_dim: int | None = None,
        reserve: int = 0,
        **options,
    ) -> list[dict]:
        """Every split of the budget the method tries, its rule's first (``sizes`` for each).

        One entry where the sizes are given (``rope_dim`` or ``kv_lora_rank``) or the method has one rule; for the
        recipe with a budget, also d_R = min(B/3, d_h) — the converter keeps the one whose layers come out closer to
        their sources on the calibration tokens.
        """
        rule = self.sizes(
            source, budget=budget, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, reserve=reserve, **options
        )
        if self.other_rope_dims is None or rope_dim is not None or kv_lora_rank is not None:
            return [rule]
        elements = budget_elements(source, 0.5 if budget is None else budget)
        candidates = [rule]
        for other in self.other_rope_dims(source, elements):
            if other != rule["rope_dim"] and 0 < other < elements - reserve:
                candidates.append(self.sizes(source, budget=budget, rope_dim=other, reserve=reserve, **options))
        return candidates

    def sizes(
        self,
        source: GroupedQueryAttention,
        *,
        budget: float | None = None,
        kv_lora_rank: int | None = None,
        rope_dim: int | None = None,
        reserve: int = 0,
        **options,
    ) -> dict:
        """The keyword sizes ``convert`` takes for ``source``.

        Either a ``budget`` (fraction of the source's cache) or explicit ``kv_lora_rank`` / ``rope_dim``; a size
        left out is filled from the budget (default: half the source's cache), so a budget with ``rope_dim``
        gives d_c = B − d_R: the budget spent by another split than the method's rule.  ``reserve`` elements of
        the budget are kept out of d_c.  ``options``: the method's own (``self.options``).
        """
        for key in options:
            if key not in self.options:
                allowed = ", ".join(self.options) or "none"
                raise ValueError(f"method {self.name!r} takes no option {key!r}; its options: {allowed}")
        if self.split is None:  # exact: the source's own cache
            if kv_lora_rank is not None or rope_dim is not None or budget not in (None, 1, 1.0):
                raise ValueError(
                    "method 'exact' keeps the source's cache (d_c = d_R = n_kv·d_h); sizes and budgets below 1 "
                    "need a lossy method (transmla, mha2mla or recipe)"
                )
            return {}
        if budget is not None and kv_lora_rank is not None:
            raise ValueError(
                "give either a budget or --kv-lora-rank, not both (with a budget, --rope-dim chooses d_R and d_c "
                "takes the rest)"
            )
        require_non_negative_int("reserve", reserve)
        elements = budget_elements(source, 0.5 if budget is None else budget)
        if rope_dim is None:  # the method's rule sees the whole budget; the reserve comes out of d_c alone
            rope_dim, _ = self.split(source, elements)
        require_non_negative_int("rope_dim", rope_dim)
        if kv_lora_rank is None:
            kv_lora_rank = elements - reserve - rope_dim
            if kv_lora_rank < 1:
                raise ValueError(
                    f"a budget of {elements} elements per token leaves no latent beside d_R = {rope_dim}"
                    + (f" and {reserve} reserved" if reserve else "")
                    + ": raise the budget or pass --kv-lora-rank"
                )
        require_positive_int("kv_lora_rank", kv_lora_rank)
        return self._named_sizes(source, kv_lora_rank, rope_dim) | options

    def _named_sizes(self, source: GroupedQueryAttention, kv_lora_rank: int, rope_dim: int) -> dict:
        if self.name != "mha2mla":
            return {"kv_lora_rank": kv_lora_rank, "rope_dim": rope_dim}
        n_kv = source.n_kv_heads
        if rope_dim % (2 * n_kv):
            raise ValueError(
                f"rope_dim for mha2mla must be a multiple of 2·n_kv = {2 * n_kv} (r pairs per KV head), got {rope_dim}"
            )
        return {"rope_pairs": rope_dim // (2 * n_kv), "kv_lora_rank": kv_lora_rank}


def _transmla_split(source: GroupedQueryAttention, elements: int) -> tuple[int, int]:
    rope_dim = min(default_rope_dim(source.head_dim), _even(elements // 2))
    return rope_dim, elements - rope_dim


def _recipe_split(source: GroupedQueryAttention, elements: int) -> tuple[int, int]:
    # One roped component for each of the d_R/2 highest frequencies keeps the rotary table a standard one, which
    # a DeepSeek-V3 config (one θ' for the model) reproduces exactly; a second component of one frequency could not.
    rope_dim = min(_even(elements // 2), _even(source.head_dim))
    return rope_dim, elements - rope_dim


def _recipe_other_rope_dims(source: GroupedQueryAttention, elements: int) -> tuple[int, ...]:
    # A third of the budget: on SmolLM2-135M at 25% (B = 96) d_R 32 gave 2.31× the source's perplexity where the
    # rule's 48 gave 2.96×; on the GQA teacher the rule wins (d_R 16: 1.77×, 10: 2.81×).  No one rule fits both.
    return (min(_even(elements // 3), _even(source.head_dim)),)


def _mha2mla_split(source: GroupedQueryAttention, elements: int) -> tuple[int, int]:
    rope_pairs, kv_lora_rank = mha2mla_ranks(source, elements / (2 * source.n_kv_heads * source.head_dim))
    return 2 * rope_pairs * source.n_kv_heads, kv_lora_rank


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "exact",
            "GQA -> MLA at the same cache, outputs unchanged (TransMLA's identity)",
            ("the GQA cache [K; V] becomes the latent; W_UK and W_UV are 0/1 replication matrices",),
            (),
            None,
            lambda source, _inputs, _sizes: gqa_to_mla_exact(source),
        ),
        Method(
            "transmla",
            "TransMLA as published: RoRoPE (+ FreqFold) and BKV-PCA, no training",
            (
                "RoRoPE: per rotary frequency, one PCA across KV heads; the d_R/2 leading components, spread "
                "evenly over the frequencies, stay roped (FreqFold F pools F adjacent frequencies)",
                "BKV-PCA: K^N and V balanced by their norms, one joint PCA of [K^N; V] on the calibration "
                "activations gives the d_c-wide latent",
                "the query rescaled by √((d_h + d_R)/d_h) for the changed softmax scale",
            ),
            ("freqfold",),
            _transmla_split,
            lambda source, inputs, sizes: transmla_convert(source, inputs, **sizes),
        ),
        Method(
            "mha2mla",
            "MHA2MLA as published: partial RoPE by S_2-norm, then SVD_joint, no fine-tuning",
            (
                "partial RoPE: in every KV head the r rotary pairs with the largest mean ‖q_pair‖·‖k_pair‖ on the "
                "calibration text stay roped (S_2-norm); the others join the no-RoPE part",
                "SVD_joint: one truncated SVD of the stacked [W_K^N; W_V] weights gives the d_c-wide latent",
            ),
            (),
            _mha2mla_split,
            lambda source, inputs, sizes: mha2mla_convert(source, calibration_inputs=inputs, **sizes),
        ),
        Method(
            "recipe",
            "mla_ref's training-free recipe: RoRoPE on a measured share of the budget, a score-weighted latent, "
            "then the output refit",
            (
                "RoRoPE: the leading component of each of the d_R/2 highest frequencies stays roped (d_R at most d_h), "
                "so the one RoPE table of a DeepSeek-V3 config is exact; from a budget, d_R is half or a third of it, "
                "whichever gives the lower mean layer output error on the calibration tokens",
                "BKV-PCA weighted by the queries and W_O that read the latent (metric 'score'), the keys' share "
                "of the latent chosen per layer: key weight 1-32 × the balance, the one with the lowest output "
                "error on the calibration tokens after the refit",
                "output refit: o_proj re-solved by least squares against the source layer's output on the "
                "calibration inputs",
            ),
            ("freqfold",),
            _recipe_split,
            lambda source, inputs, sizes: recipe_convert(source, inputs, **sizes),
            _recipe_other_rope_dims,
            refits_output=True,
        ),
    )
}

LOSSY_METHODS: tuple[str, ...] = tuple(name for name, method in METHODS.items() if method.split is not None)


def get_method(name: str) -> Method:
    """The registered method called ``name`` (a clear error naming the allowed ones otherwise)."""
    require_choice("method", name, tuple(METHODS))
    return METHODS[name]

"""What every conversion method is: how its sizes follow from a cache budget, its steps, and its layer converter.

A budget is a fraction F of the source's cache per token and layer, B = round(F · 2 n_kv d_h) elements
(``budget_elements``), spent on the shared RoPE key (d_R) and the latent (d_c).  Sizes are planned once for the whole
model, before any layer is converted (``plan_sizes``): every layer shares the first one's shape, and the plan is
passed down to the converters as it is.  Each method file (``exact``, ``transmla``, ``mha2mla``, ``recipe``)
subclasses ``Method`` with its own rule for the split (``split``), any further splits it measures
(``other_rope_dims``) and its converter (``convert``).  ``reserve`` elements of B (the one anchored latent coordinate
of a stock DeepSeek-V3 output) are taken from d_c, so the cache as written meets the budget; ``--profile engine``
gives the serving engines' 512 + 64 instead.

``Method.convert_layer`` is what a whole-model conversion calls for each layer: a layer with q/k/v biases (Qwen2)
is converted as the bias-free layer acting on [x; 1] (``mla_ref.convert.biased``), so every method handles biases.
"""

from __future__ import annotations

import torch

from mla_ref._checks import require_non_negative_int, require_number, require_positive_int
from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert.biased import augmented, split_augmented
from mla_ref.mla import MultiHeadLatentAttention

ENGINE_LATENT, ENGINE_ROPE = 512, 64  # DeepSeek-V3's own kv_lora_rank and qk_rope_head_dim, what the engines take
PROFILES: tuple[str, ...] = ("engine",)


def even(n: int) -> int:
    """``n`` rounded down to even: rotary dimensions come in pairs."""
    return n // 2 * 2


def budget_elements(source: GroupedQueryAttention, fraction: float) -> int:
    """B = round(fraction · 2 n_kv d_h): the cache elements per token and layer a budget allows."""
    fraction = require_number("budget", fraction, lambda f: 0 < f <= 1, "be a fraction of the source's cache in (0, 1]")
    return round(fraction * source.cache_elements_per_token())


def engine_sizes(source: GroupedQueryAttention, *, reserve: int = 0) -> tuple[int, int]:
    """(d_c, d_R) = (512 − reserve, 64) for ``--profile engine``; refused where it would not shrink the cache."""
    elements = source.cache_elements_per_token()
    if elements <= ENGINE_LATENT + ENGINE_ROPE:
        raise ValueError(
            f"--profile engine writes the engines' {ENGINE_LATENT} + {ENGINE_ROPE} latent, but the source caches only "
            f"{elements} elements per token and layer (2 · {source.n_kv_heads} KV heads · {source.head_dim}): it "
            "would not save anything. Convert without --profile (the output then loads in transformers, not in the "
            "engines' MLA kernels)"
        )
    return ENGINE_LATENT - reserve, ENGINE_ROPE


def plan_sizes(
    method: Method,
    source: GroupedQueryAttention,
    *,
    budget: float | None = None,
    kv_lora_rank: int | None = None,
    rope_dim: int | None = None,
    reserve: int = 0,
    profile: str | None = None,
    **options,
) -> list[dict]:
    """The candidate sizes every layer is converted at: one dict of ``method.convert``'s size keywords per split.

    ``source``: any layer's attention (all share the shape).  One entry unless the method measures its split of a
    budget (``Method.candidate_sizes``).
    """
    if profile is not None:
        kv_lora_rank, rope_dim = engine_sizes(source, reserve=reserve)
        return [method.sizes(source, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, **options)]
    return method.candidate_sizes(
        source, budget=budget, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, reserve=reserve, **options
    )


class Method:
    """One conversion method.  A subclass sets the four class attributes and implements ``convert`` and ``split``.

    ``sizes(source, budget=…)`` -> the keyword sizes ``convert`` takes; ``candidate_sizes`` -> every split of the
    budget the method tries, its rule's first (the converter keeps the one whose converted model is closest to
    the source, ``mla_ref.convert.split_choice``).
    """

    name: str
    title: str  # one line, as the command line's help and CONVERSION.md give it
    steps: tuple[str, ...]  # what it does, as CONVERSION.md lists it
    options: tuple[str, ...] = ()  # extra keyword options the converter accepts (e.g. TransMLA's freqfold)
    lossy: bool = True  # whether it compresses the cache (and so needs calibration activations and a budget)

    def split(self, source: GroupedQueryAttention, elements: int) -> tuple[int, int] | None:
        """(d_R, d_c) for a budget of ``elements`` by the method's rule; None for a method that keeps the cache."""
        raise NotImplementedError

    def other_rope_dims(self, source: GroupedQueryAttention, elements: int) -> tuple[int, ...]:
        """Further d_R the method measures for a budget (none by default)."""
        return ()

    def convert(
        self, source: GroupedQueryAttention, calibration_inputs: torch.Tensor, sizes: dict
    ) -> MultiHeadLatentAttention:
        """One bias-free layer converted at ``sizes`` (from ``sizes``).  Shapes: calibration_inputs (b, s, d_model)."""
        raise NotImplementedError

    def convert_candidates(
        self,
        source: GroupedQueryAttention,
        calibration_inputs: torch.Tensor,
        candidates: list[dict],
        source_output: torch.Tensor | None = None,
    ) -> list[MultiHeadLatentAttention]:
        """``convert`` at each of ``candidates`` (``candidate_sizes``), in order.  A method whose conversions share
        work that does not depend on the sizes overrides this to do that work once; ``source_output`` (the source
        layer's output on the calibration inputs, when already computed) is for such a method."""
        return [self.convert(source, calibration_inputs, sizes) for sizes in candidates]

    @torch.no_grad()
    def convert_layer(
        self,
        attention: GroupedQueryAttention,
        calibration_inputs: torch.Tensor | None,
        candidates: list[dict],
        source_output: torch.Tensor | None = None,
    ) -> list[MultiHeadLatentAttention]:
        """One layer of a model converted at each of ``candidates`` (``plan_sizes``), in order, biases included.

        A layer with q/k/v biases is converted as the bias-free layer on [x; 1] — W x + b = [W | b] [x; 1] — and the
        last input column of the result becomes the MLA's biases again (``mla_ref.convert.biased``).  Shapes:
        calibration_inputs (b, s, d_model), the hidden states entering the attention (None for ``exact``);
        source_output (b, s, d_model), the layer's output on them, when already computed.
        """
        inputs = None if calibration_inputs is None else calibration_inputs.float()
        if attention.q_proj.bias is None:
            return self.convert_candidates(attention, inputs, candidates, source_output)
        if inputs is not None:
            inputs = torch.cat([inputs, torch.ones_like(inputs[..., :1])], dim=-1)  # [x; 1]
        # the layer on [x; 1] has one more output coordinate, and rounds its own way: its output is not reused
        results = self.convert_candidates(augmented(attention), inputs, candidates, None)
        return [split_augmented(result, attention.d_model) for result in results]

    def named_sizes(self, source: GroupedQueryAttention, kv_lora_rank: int, rope_dim: int) -> dict:
        """(d_c, d_R) as the keywords ``convert`` takes."""
        return {"kv_lora_rank": kv_lora_rank, "rope_dim": rope_dim}

    def calibration_tokens_needed(self, source: GroupedQueryAttention) -> int:
        """The fewest calibration tokens the method converts ``source`` from (any by default)."""
        return 1

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
        return self.named_sizes(source, kv_lora_rank, rope_dim) | options

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

        One entry where the sizes are given (``rope_dim`` or ``kv_lora_rank``) or the method measures no other
        split.
        """
        rule = self.sizes(
            source, budget=budget, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, reserve=reserve, **options
        )
        if rope_dim is not None or kv_lora_rank is not None:
            return [rule]
        elements = budget_elements(source, 0.5 if budget is None else budget)
        candidates = [rule]
        for other in self.other_rope_dims(source, elements):
            if other != rule["rope_dim"] and 0 < other < elements - reserve:
                candidates.append(self.sizes(source, budget=budget, rope_dim=other, reserve=reserve, **options))
        return candidates

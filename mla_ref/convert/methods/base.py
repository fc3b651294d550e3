"""What every conversion method is: its steps, how its sizes follow from a cache budget, and its layer converter.

A budget is a fraction F of the source's cache per token and layer: B = round(F · 2 n_kv d_h) elements
(``mla_ref.convert.sizes``), spent on the shared RoPE key (d_R) and the latent (d_c).  Each method file
(``exact``, ``transmla``, ``mha2mla``, ``recipe``) subclasses ``Method`` with its own rule for that split
(``split``), any further splits it measures (``other_rope_dims``) and its converter (``convert``).
``reserve`` elements of B (the one anchored latent coordinate of a stock DeepSeek-V3 output) are taken from d_c,
so the cache as written meets the budget.
"""

from __future__ import annotations

import torch

from mla_ref._checks import require_non_negative_int, require_positive_int
from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert.sizes import budget_elements
from mla_ref.mla import MultiHeadLatentAttention


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

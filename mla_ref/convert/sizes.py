"""How a cache budget becomes MLA sizes, planned once for the whole model before any layer is converted.

A budget is a fraction F of the source's cache per token and layer, B = round(F · 2 n_kv d_h) elements
(``budget_elements``), spent on the shared roped key (d_R) and the latent (d_c).  ``plan_sizes`` asks the method
for its candidate splits (``Method.candidate_sizes``: the rule's first, then any other split the method measures),
keeps ``reserve`` elements out of d_c (the stock DeepSeek-V3 form's anchored latent coordinate), and for
``--profile engine`` gives the serving engines' 512 + 64 instead.  Every layer of a model shares its shape, so
the first layer's attention stands for all; the plan is passed down to the converters as it is.
"""

from __future__ import annotations

from mla_ref._checks import require_number
from mla_ref.attention import GroupedQueryAttention

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
    method,
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

    ``method``: a ``mla_ref.convert.methods.Method``; ``source``: any layer's attention (all share the shape).
    One entry unless the method measures its split of a budget.
    """
    if profile is not None:
        kv_lora_rank, rope_dim = engine_sizes(source, reserve=reserve)
        return [method.sizes(source, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, **options)]
    return method.candidate_sizes(
        source, budget=budget, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, reserve=reserve, **options
    )

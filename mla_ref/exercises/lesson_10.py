"""Checks of lesson 10's exercises (notebooks/10_convert_a_real_checkpoint.ipynb): the RoPE θ' a recipe conversion
writes, the anchor constant the converter chooses, and what a budget leaves once the anchor takes its element.

Each check computes the truth with the converter's own functions: ``fit_rope_theta`` on the frequencies the recipe
keeps, ``anchor_constant`` and ``input_bound`` on tensors of its own, and the recipe's ``candidate_sizes`` with the
anchor's element reserved, read by the KV-cache calculator.
"""

from __future__ import annotations

import functools
import math

import torch

from mla_ref import checkpoint
from mla_ref.calculator import report
from mla_ref.convert import get_method
from mla_ref.convert.rope_table import fit_rope_theta
from mla_ref.convert.stock_form import anchor_constant, input_bound
from mla_ref.exercises import exercise
from mla_ref.mla import MultiHeadLatentAttention
from mla_ref.model import TinyLM
from mla_ref.model_shapes import ModelShape
from mla_ref.rope import inverse_frequencies
from mla_ref.train import TEACHERS_DIR

# Exercise 10.1: Llama-3-8B's RoPE (θ = 500,000 on d_h = 128) converted by the recipe with d_R = 64
SOURCE_THETA, SOURCE_HEAD_DIM, ROPE_DIM = 500_000.0, 128, 64

# Exercise 10.2: a layer whose input RMSNorm has max |g| = 3 over D = 4096, and whose latent rows have ‖W‖_F = 50
MODEL_WIDTH, LARGEST_NORM_WEIGHT, LATENT_FROBENIUS, LATENT_ROWS = 4096, 3.0, 50.0, 512

# Exercise 10.3: the GQA teacher at an eighth of its cache, with the anchored latent norm, bf16
BUDGET = 0.125


def _number(value, what: str) -> float:
    assert isinstance(value, int | float) and not isinstance(value, bool), (
        f"{what} must be a number, got {type(value).__name__}"
    )
    assert math.isfinite(value) and value > 0, f"{what} must be a finite positive number, got {value!r}"
    return float(value)


@exercise("10.1")
def rope_theta_of_a_recipe_conversion(answer) -> str:
    """θ' of the DeepSeek-V3 config for the recipe's roped key (the d_R/2 highest source frequencies)."""
    theta = _number(answer, "θ'")
    kept = inverse_frequencies(SOURCE_HEAD_DIM, SOURCE_THETA).double()[: ROPE_DIM // 2]  # the d_R/2 highest
    fit = fit_rope_theta([kept], 4096)
    assert fit.exact, "the recipe's frequencies should be a standard table"  # the premise of the question
    standard = theta ** -(torch.arange(0, ROPE_DIM, 2, dtype=torch.float64) / ROPE_DIM)  # ω'_s = θ'^(−2s/d_R)
    worst = float(((standard - kept).abs() / kept).max())
    assert abs(theta / fit.theta - 1) < 1e-6, (
        f"with θ' = {theta:.6g}, slot s turns at θ'^(−2s/{ROPE_DIM}): slot 1 at {float(standard[1]):.4g} where the "
        f"recipe's second pair turns at {float(kept[1]):.4g} (θ^(−2/{SOURCE_HEAD_DIM})); the worst slot is off by "
        f"{worst:.0%}"
    )
    return f"θ' = {fit.theta:,.1f}: the standard table of d_R = {ROPE_DIM} is the recipe's kept frequencies (fit_rope_theta)"


def _synthetic_layer() -> tuple[torch.Tensor, torch.Tensor]:
    """An input-norm weight with max |g| = 3 over D entries, and latent rows W (d_c, D) with ‖W‖_F = 50."""
    generator = torch.Generator().manual_seed(10)
    gains = 1 + 0.1 * torch.randn(MODEL_WIDTH, generator=generator, dtype=torch.float64)
    gains[7] = -LARGEST_NORM_WEIGHT  # the largest magnitude, negative on purpose
    weight = torch.randn(LATENT_ROWS, MODEL_WIDTH, generator=generator, dtype=torch.float64)
    weight *= LATENT_FROBENIUS / torch.linalg.matrix_norm(weight)
    return gains, weight


@exercise("10.2")
def anchor_of_a_layer(answer) -> str:
    """The anchor constant B for a layer with max |g| = 3, D = 4096, ‖W_DKV‖_F = 50 and no bias."""
    value = _number(answer, "B")
    gains, weight = _synthetic_layer()
    truth = anchor_constant(weight, None, input_bound(gains))
    if value != truth:
        reason = ""
        if value == 2 ** math.ceil(math.log2(8192 * LATENT_FROBENIUS * LARGEST_NORM_WEIGHT)):
            reason = " (‖x‖ ≤ max|g| · √D: the normalised vector has norm √D, not 1)"
        elif math.log2(value) != round(math.log2(value)):
            reason = " (B is a power of two: 2 to the ceiling of log₂ of its bound)"
        raise AssertionError(f"B = {value:.6g} is not the anchor anchor_constant chooses: {truth:.6g}{reason}")
    return f"B = 2^{int(math.log2(truth))} = {truth:,.0f} (anchor_constant with input_bound)"


@functools.cache
def _teacher() -> TinyLM:
    return checkpoint.load(TEACHERS_DIR / "gqa")


@exercise("10.3")
def budget_with_the_anchor(answer) -> str:
    """{"informative_elements": d_c + d_R, "bytes_per_token": all layers, bf16} of the recipe at 12.5 %, anchored."""
    keys = {"informative_elements", "bytes_per_token"}
    assert isinstance(answer, dict) and set(answer) == keys, (
        'the answer is a dict {"informative_elements": elements per token and layer from the source, '
        '"bytes_per_token": bytes per token, all layers, bf16}'
    )
    teacher = _teacher()
    source = teacher.layers[0].self_attn
    candidates = get_method("recipe").candidate_sizes(source, budget=BUDGET, reserve=1)  # one element for the anchor
    informative = {sizes["kv_lora_rank"] + sizes["rope_dim"] for sizes in candidates}
    assert len(informative) == 1  # every split the recipe tries spends the same budget
    (informative,) = informative
    sizes = candidates[0]
    with torch.device("meta"):  # the written layer: the latent plus the anchor's coordinate
        written = MultiHeadLatentAttention(
            teacher.config.d_model,
            source.n_heads,
            kv_lora_rank=sizes["kv_lora_rank"] + 1,
            qk_nope_head_dim=sizes["kv_lora_rank"],
            qk_rope_head_dim=sizes["rope_dim"],
            v_head_dim=source.head_dim,
        )
    shape = ModelShape.from_module(written, layers=teacher.config.n_layers)
    bytes_per_token = report(shape, context=1, dtype="bf16")["variants"][0]["bytes_per_token"]
    assert answer["informative_elements"] == informative, (
        f"{answer['informative_elements']} elements is not what the source's keys and values get: the budget allows "
        f"{informative + 1} per token and layer, and the anchor's coordinate is one of them"
    )
    assert answer["bytes_per_token"] == bytes_per_token, (
        f"{answer['bytes_per_token']} bytes per token is not the written cache: {informative + 1} elements per layer "
        f"(the anchor included), {teacher.config.n_layers} layers, 2 bytes each in bf16"
    )
    return (
        f"{informative} elements from the source + 1 anchor = {informative + 1} per layer: {bytes_per_token} bytes per "
        f"token in bf16 (candidate_sizes with reserve=1, the calculator)"
    )

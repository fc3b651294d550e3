"""Output refit: least squares can only lower the calibration error, leaves a lossless conversion as it was,
keeps the module's form (both attention paths), and refuses bad input."""

import pytest
import torch

from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert import gqa_to_mla_exact, latent_metric, recipe_convert, refit_output_proj, transmla_convert
from mla_ref.convert.methods.recipe import RECIPE_KEY_WEIGHTS
from mla_ref.convert.refit import output_error
from mla_ref.convert.rorope import rorope_parts
from mla_ref.rope import inverse_frequencies

D_MODEL = 32


def _source(seed: int = 0) -> GroupedQueryAttention:
    torch.manual_seed(seed)
    return GroupedQueryAttention(D_MODEL, n_heads=4, n_kv_heads=2, head_dim=8).eval()


def _inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 24, D_MODEL, generator=torch.Generator().manual_seed(seed))  # (b, s, d_model)


def _error(module, source, x) -> float:
    with torch.no_grad():
        return float((module(x) - source(x)).pow(2).mean())


def test_refit_lowers_the_calibration_error_of_a_lossy_conversion():
    source, x = _source(), _inputs()
    lossy = transmla_convert(source, x, kv_lora_rank=6, rope_dim=4)  # cache 10 of the source's 32
    before = _error(lossy, source, x)
    errors = {
        ridge: _error(refit_output_proj(lossy, source, x, ridge=ridge), source, x) for ridge in (1e-6, 1e-4, 1e-2)
    }
    assert errors[1e-4] < 0.7 * before, (before, errors)  # measured: about half
    # a larger ridge pulls the fit away from least squares, so the calibration error can only grow with it
    assert errors[1e-6] <= errors[1e-4] * (1 + 1e-6) and errors[1e-4] <= errors[1e-2] * (1 + 1e-6)


def test_refit_keeps_a_lossless_conversion():
    source, x = _source(), _inputs()
    exact = gqa_to_mla_exact(source)
    with torch.no_grad():
        # the ridge biases the fit by about λ/σ²: 1e-8 leaves only fp32 rounding, the default 1e-4 a little more
        torch.testing.assert_close(refit_output_proj(exact, source, x, ridge=1e-8)(x), source(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(refit_output_proj(exact, source, x)(x), source(x), atol=1e-3, rtol=1e-3)


def test_refit_leaves_its_inputs_alone_and_keeps_both_paths():
    source, x = _source(), _inputs()
    lossy = transmla_convert(source, x, kv_lora_rank=6, rope_dim=4)
    weights = {k: v.clone() for k, v in lossy.state_dict().items()}
    refit = refit_output_proj(lossy, source, x)
    for name, tensor in lossy.state_dict().items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0)
    assert refit.cache_elements_per_token() == lossy.cache_elements_per_token() == 10
    with torch.no_grad():
        torch.testing.assert_close(refit(x, path="absorbed"), refit(x, path="naive"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s, m, x: refit_output_proj(s, s, x), "converted must be a MultiHeadLatentAttention"),
        (lambda s, m, x: refit_output_proj(m, s, x, ridge=0.0), "ridge must be a positive number, got 0.0"),
        (lambda s, m, x: refit_output_proj(m, s, x[0]), r"calibration_inputs must have shape \(b, s, d_model=32\)"),
    ],
)
def test_bad_input_is_refused(call, message):
    source, x = _source(), _inputs()
    converted = gqa_to_mla_exact(source)
    with pytest.raises(ValueError, match=message):
        call(source, converted, x)


def test_recipe_is_transmla_with_one_component_per_frequency_and_score_metric_then_refit():
    source, x = _source(), _inputs()
    recipe = recipe_convert(source, x, kv_lora_rank=6, rope_dim=4, key_weights=(1.0,))
    steps = transmla_convert(source, x, kv_lora_rank=6, rope_dim=4, rope_budget="uniform", metric="score")
    by_hand = refit_output_proj(steps, source, x)
    for name, tensor in recipe.state_dict().items():
        torch.testing.assert_close(tensor, by_hand.state_dict()[name], rtol=1e-6, atol=1e-6)
    assert recipe.cache_elements_per_token() == 6 + 4
    # the roped components turn with the d_R/2 highest source frequencies: a standard table
    torch.testing.assert_close(
        torch.tensor(recipe.rope_frequencies, dtype=torch.float64).sort(descending=True).values,
        inverse_frequencies(source.head_dim, source.rope_theta)[:2].double(),
        rtol=1e-6,
        atol=0,
    )


def test_recipe_keeps_the_key_weight_with_the_lowest_calibration_error():
    source, x = _source(), _inputs()
    target = source(x)
    errors = {}
    for weight in RECIPE_KEY_WEIGHTS:
        one = recipe_convert(source, x, kv_lora_rank=6, rope_dim=4, key_weights=(weight,))
        errors[weight] = output_error(one, x, target)
    assert len(set(errors.values())) > 1, errors  # the key weight changes the latent
    recipe = recipe_convert(source, x, kv_lora_rank=6, rope_dim=4)
    torch.testing.assert_close(output_error(recipe, x, target), min(errors.values()), rtol=1e-9, atol=0)


def test_key_weight_shifts_the_latent_toward_the_keys():
    source, x = _source(), _inputs()
    rotated = rorope_parts(source, x, rope_dim=4)
    d_nope = rotated.key_up.shape[1]
    balanced = latent_metric(rotated, x, metric="score")
    weighted = latent_metric(rotated, x, metric="score", key_weight=4.0)
    torch.testing.assert_close(weighted[:d_nope, :d_nope], 4 * balanced[:d_nope, :d_nope], rtol=1e-12, atol=0)
    torch.testing.assert_close(weighted[d_nope:, d_nope:], balanced[d_nope:, d_nope:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="key_weight must be a positive number, got 0"):
        latent_metric(rotated, x, key_weight=0)
    with pytest.raises(ValueError, match="key_weights must name at least one key weight"):
        recipe_convert(source, x, kv_lora_rank=6, rope_dim=4, key_weights=())


def test_too_few_calibration_tokens_for_the_refit_are_refused():
    source = _source()
    x = _inputs()[:1, :20]  # 20 tokens for h·d_v = 32 unknowns per output row
    lossy = transmla_convert(source, _inputs(), kv_lora_rank=6, rope_dim=4)
    with pytest.raises(
        ValueError, match="solves for 32 weights per output .* from 20 calibration tokens; it needs at least 64"
    ):
        refit_output_proj(lossy, source, x)

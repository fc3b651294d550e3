"""Whole-model conversion: the teachers converted exactly, saved, loaded and decoded on both MLA paths."""

from pathlib import Path

import pytest
import torch

from mla_ref import checkpoint
from mla_ref.convert import get_method
from mla_ref.convert.model import convert_model, convert_model_by_method
from mla_ref.model import ModelConfig, TinyLM

TEACHERS = Path(__file__).resolve().parents[1] / "mla_ref" / "teachers"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


@pytest.mark.parametrize("teacher", ["mha", "gqa"])
def test_exact_conversion_of_a_teacher_keeps_logits_and_cache_bytes(teacher, tmp_path):
    torch.manual_seed(0)
    source = checkpoint.load(TEACHERS / teacher)
    converted = convert_model(source)
    tokens = torch.randint(0, 256, (2, 48))
    expected = source(tokens)
    # fp32 throughout: the converted layers regroup the same products; the target is 1e-4 on the logits.
    for path in ("naive", "absorbed"):
        torch.testing.assert_close(converted(tokens, path=path), expected, atol=1e-4, rtol=1e-4)
    assert converted.kv_cache_bytes_per_token() == source.kv_cache_bytes_per_token()
    caches = converted.new_caches()
    converted(tokens, caches)
    assert sum(c.nbytes for c in caches) == 2 * 48 * source.kv_cache_bytes_per_token()
    checkpoint.save(converted, tmp_path / "converted")
    reloaded = checkpoint.load(tmp_path / "converted")
    torch.testing.assert_close(reloaded(tokens, path="absorbed"), converted(tokens, path="absorbed"), rtol=0, atol=0)
    prompt = tokens[:, :8]
    assert torch.equal(reloaded.generate(prompt, 12, path="absorbed"), source.generate(prompt, 12))


def test_attention_inputs_are_what_each_layer_normalises():
    torch.manual_seed(0)
    model = TinyLM(ModelConfig(d_model=32, n_layers=3, n_heads=4, head_dim=8, mlp_hidden=64))
    tokens = torch.randint(0, 256, (2, 10))
    inputs = model.attention_inputs(tokens)
    assert len(inputs) == 3 and inputs[0].shape == (2, 10, 32)
    torch.testing.assert_close(inputs[0], model.layers[0].input_layernorm(model.embed_tokens(tokens)))
    after_first = model.layers[0](model.embed_tokens(tokens))
    torch.testing.assert_close(inputs[1], model.layers[1].input_layernorm(after_first))


def test_per_layer_frequency_tables_are_checked_and_used():
    base = dict(d_model=32, n_layers=2, n_heads=4, head_dim=8, mlp_hidden=64)
    with pytest.raises(ValueError, match=r"one table per layer \(2\), got 1"):
        ModelConfig(**base, rope_frequencies=[[1.0] * 4])
    with pytest.raises(ValueError, match=r"rope_frequencies\[1\] must hold one frequency per rotary pair \(4\)"):
        ModelConfig(**base, rope_frequencies=[[1.0] * 4, [1.0] * 3])
    model = TinyLM(ModelConfig(**base, rope_frequencies=[[1.0, 0.5, 0.25, 0.0], [0.0] * 4]))
    assert model.layers[0].self_attn.rope_frequencies == (1.0, 0.5, 0.25, 0.0)
    assert model.layers[1].self_attn.rope_frequencies == (0.0,) * 4
    assert ModelConfig.from_dict(model.config.to_dict()) == model.config


def test_an_mla_model_is_not_converted_again():
    model = TinyLM(ModelConfig(d_model=32, n_layers=1, n_heads=4, mlp_hidden=64, attention="mla"))
    with pytest.raises(ValueError, match="already 'mla'"):
        convert_model(model)


def test_convert_model_by_method_keeps_the_split_whose_model_is_closer_to_the_source():
    teacher = checkpoint.load(TEACHERS / "gqa")
    tokens = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(0))
    recipe = get_method("recipe")
    candidates = recipe.candidate_sizes(teacher.layers[0].self_attn, budget=0.25)
    assert len(candidates) == 2  # d_R = B/2 and B/3
    by_split = {}
    with torch.no_grad():
        reference = teacher(tokens).log_softmax(-1)
        for sizes in candidates:
            model = convert_model(teacher, lambda a, x, sizes=sizes: recipe.convert(a, x, sizes), tokens)
            log_probs = model(tokens).log_softmax(-1)
            by_split[sizes["rope_dim"]] = (reference.exp() * (reference - log_probs)).sum(-1).mean().item()
    assert len(set(by_split.values())) == 2, by_split
    best = min(by_split, key=by_split.get)
    converted = convert_model_by_method(teacher, "recipe", tokens, budget=0.25)
    assert converted.config.qk_rope_head_dim == best
    by_hand = convert_model(
        teacher, lambda a, x: recipe.convert(a, x, recipe.sizes(a, budget=0.25, rope_dim=best)), tokens
    )
    torch.testing.assert_close(converted(tokens[:2]), by_hand(tokens[:2]), rtol=0, atol=0)
    # one candidate: the method's sizes, no search; exact needs no calibration
    exact = convert_model_by_method(teacher, "exact")
    torch.testing.assert_close(exact(tokens[:2]), teacher(tokens[:2]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="method 'transmla' needs calibration_tokens"):
        convert_model_by_method(teacher, "transmla", budget=0.5)

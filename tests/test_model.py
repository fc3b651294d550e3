"""TinyLM: every attention type runs; cached prefill + decode equals full recomputation; config round trip."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mla_ref.cache import KVCache, LatentCache
from mla_ref.model import ModelConfig, TinyLM

# fp32 throughout: the cached and uncached paths sum the same products in a different order
# (other matmul shapes), which moves logits by ~1e-6; 1e-5 absolute and relative leaves headroom.
FP32 = dict(rtol=1e-5, atol=1e-5)

SMALL = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, head_dim=8, mlp_hidden=64)
MLA_SMALL = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
CONFIGS = {
    "mha": ModelConfig(**SMALL, attention="mha"),
    "gqa": ModelConfig(**SMALL, attention="gqa", n_kv_heads=2),
    "mqa": ModelConfig(**SMALL, attention="mqa"),
    "mla": ModelConfig(**SMALL, attention="mla", **MLA_SMALL),
    "mla_q_lora": ModelConfig(**SMALL, attention="mla", **MLA_SMALL, q_lora_rank=12),
    "mla_no_latent_norm_tied": ModelConfig(
        **SMALL, attention="mla", **MLA_SMALL, latent_norm=False, tie_embeddings=True
    ),
}


def make_model(config: ModelConfig) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(config).eval()


def tokens(b: int, s: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_shape_and_cache_type(name):
    model = make_model(CONFIGS[name])
    logits = model(tokens(2, 7))
    assert logits.shape == (2, 7, 256)
    assert torch.isfinite(logits).all()
    caches = model.new_caches()
    assert len(caches) == CONFIGS[name].n_layers
    assert all(isinstance(c, LatentCache if name.startswith("mla") else KVCache) for c in caches)


def decode_through_caches(model: TinyLM, x: torch.Tensor, prefill: int, path: str) -> torch.Tensor:
    """Logits for every position of x: the first ``prefill`` tokens in one call, then one token per call."""
    caches = model.new_caches()
    chunks = [model(x[:, :prefill], caches, path=path)]
    chunks += [model(x[:, j : j + 1], caches, path=path) for j in range(prefill, x.shape[1])]
    return torch.cat(chunks, dim=1)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("path", ["naive", "absorbed"])
def test_prefill_then_decode_equals_full_recomputation(name, path):
    model = make_model(CONFIGS[name])
    x = tokens(2, 12)
    with torch.no_grad():
        full = model(x, path="naive")
        cached = decode_through_caches(model, x, prefill=5, path=path)
    torch.testing.assert_close(cached, full, **FP32)


@given(
    attention=st.sampled_from(["mha", "gqa", "mqa", "mla"]),
    batch=st.integers(1, 3),
    length=st.integers(2, 10),
    prefill_fraction=st.floats(0.0, 0.9),
    path=st.sampled_from(["naive", "absorbed"]),
    seed=st.integers(0, 2**16),
)
def test_cached_decode_matches_full_over_random_shapes(attention, batch, length, prefill_fraction, path, seed):
    extra = {"gqa": dict(n_kv_heads=2), "mla": MLA_SMALL}.get(attention, {})
    torch.manual_seed(seed)
    model = TinyLM(ModelConfig(**{**SMALL, "n_layers": 1}, attention=attention, **extra)).eval()
    x = tokens(batch, length, seed)
    prefill = max(1, int(prefill_fraction * length))
    with torch.no_grad():
        torch.testing.assert_close(decode_through_caches(model, x, prefill, path), model(x), **FP32)


@pytest.mark.parametrize("name", ["mla", "mla_q_lora"])
def test_mla_naive_and_absorbed_forward_agree(name):
    model = make_model(CONFIGS[name])
    x = tokens(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(x, path="absorbed"), model(x, path="naive"), **FP32)


@pytest.mark.parametrize("name", ["mha", "mla", "mla_q_lora"])
def test_greedy_generate_equals_argmax_of_full_recomputation(name):
    model = make_model(CONFIGS[name])
    prompt = tokens(2, 4)
    out = model.generate(prompt, max_new_tokens=8)
    assert out.shape == (2, 12)
    assert torch.equal(out[:, :4], prompt)
    with torch.no_grad():
        logits = model(out[:, :-1])  # position j predicts token j + 1
    # Each generated token is the argmax of the uncached logits at the position before it.
    assert torch.equal(out[:, 4:], logits[:, 3:].argmax(dim=-1))
    if name.startswith("mla"):
        assert torch.equal(model.generate(prompt, max_new_tokens=8, path="absorbed"), out)


def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    model = make_model(CONFIGS["gqa"])
    prompt = tokens(1, 3)
    first = model.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(5))
    again = model.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    greedy = model.generate(prompt, 10)
    top1 = model.generate(prompt, 10, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(top1, greedy)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_bytes_per_token_matches_real_caches(name):
    model = make_model(CONFIGS[name])
    b, t = 3, 6
    caches = model.new_caches()
    with torch.no_grad():
        model(tokens(b, t), caches)
    measured = sum(c.nbytes for c in caches) / (b * t)
    assert measured == model.kv_cache_bytes_per_token(torch.float32)
    c = CONFIGS[name]
    if c.attention == "mla":
        expected_elements = c.n_layers * (c.kv_lora_rank + c.qk_rope_head_dim)
    else:
        expected_elements = c.n_layers * 2 * c.kv_heads * c.head_dim
    assert model.kv_cache_bytes_per_token(torch.bfloat16) == 2 * expected_elements


def test_tied_head_shares_the_embedding():
    model = make_model(CONFIGS["mla_no_latent_norm_tied"])
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = make_model(CONFIGS["mla"])
    assert model.num_parameters() == untied.num_parameters() - 256 * 32 - 2 * 16  # no head, no latent norms


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_json_round_trip(name):
    config = CONFIGS[name]
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(attention="mla2"), "attention must be one of"),
        (dict(attention="gqa", n_kv_heads=None), "n_kv_heads must be a positive integer"),
        (dict(attention="gqa", n_kv_heads=3), "must divide n_heads"),
        (dict(attention="mqa", n_kv_heads=2), "n_kv_heads for attention 'mqa'"),
        (dict(attention="mla", n_kv_heads=2), "must be None for attention 'mla'"),
        (dict(head_dim=7), "head_dim must be even"),
        (dict(d_model=0), "d_model must be a positive integer"),
        (dict(rope_layout="half"), "rope_layout must be one of"),
    ],
)
def test_bad_config_values_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**SMALL, **change})


def test_unknown_config_key_is_refused():
    data = CONFIGS["mha"].to_dict() | {"n_experts": 4}
    with pytest.raises(ValueError, match=r"unknown model config keys \['n_experts'\]"):
        ModelConfig.from_dict(data)


def test_bad_calls_are_refused():
    model = make_model(CONFIGS["mha"])
    with pytest.raises(ValueError, match="path must be one of"):
        model(tokens(1, 3), path="fast")
    with pytest.raises(ValueError, match=r"tokens must have shape \(b, s\)"):
        model(tokens(1, 3)[0])
    with pytest.raises(ValueError, match="one cache per layer"):
        model(tokens(1, 3), caches=[KVCache()])
    with pytest.raises(ValueError, match="temperature must be"):
        model.generate(tokens(1, 3), 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k must be None or in"):
        model.generate(tokens(1, 3), 2, temperature=1.0, top_k=0)

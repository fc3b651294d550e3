"""The GQA family: reference equality, caching, the MHA/MQA special cases, byte accounting, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mla_ref.attention import GroupedQueryAttention, MultiHeadAttention, MultiQueryAttention, grouped_attention
from mla_ref.rope import apply_rope

# fp32 attention over ≤ 40 tokens: differences come from summation order only, far below 1e-5.
FP32 = dict(atol=1e-5, rtol=1e-5)


def reference_gqa(module: GroupedQueryAttention, x: torch.Tensor) -> torch.Tensor:
    """Textbook GQA: repeat each KV head m times, then PyTorch's own causal attention."""
    b, s, _ = x.shape
    h, g, d = module.n_heads, module.n_kv_heads, module.head_dim
    positions = torch.arange(s)
    q = apply_rope(module.q_proj(x).view(b, s, h, d).transpose(1, 2), positions, layout=module.rope_layout)
    k = apply_rope(module.k_proj(x).view(b, s, g, d).transpose(1, 2), positions, layout=module.rope_layout)
    v = module.v_proj(x).view(b, s, g, d).transpose(1, 2)
    k, v = k.repeat_interleave(h // g, dim=1), v.repeat_interleave(h // g, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return module.o_proj(out.transpose(1, 2).reshape(b, s, h * d))


gqa_shapes = st.tuples(st.integers(1, 4), st.integers(1, 3), st.sampled_from([2, 4, 8])).map(
    lambda t: dict(n_kv_heads=t[0], n_heads=t[0] * t[1], head_dim=t[2])
)


@given(
    shape=gqa_shapes,
    batch=st.integers(1, 3),
    prompt=st.integers(1, 12),
    decode_steps=st.integers(0, 4),
    layout=st.sampled_from(["rotate_half", "interleaved"]),
    bias=st.booleans(),
)
def test_prefill_then_decode_equals_the_textbook_reference(shape, batch, prompt, decode_steps, layout, bias):
    torch.manual_seed(prompt + 10 * decode_steps)
    d_model = 16
    attention = GroupedQueryAttention(d_model, **shape, rope_layout=layout, qkv_bias=bias, o_bias=bias)
    x = torch.randn(batch, prompt + decode_steps, d_model)
    expected = reference_gqa(attention, x)
    torch.testing.assert_close(attention(x), expected, **FP32)
    cache = attention.new_cache()
    steps = [attention(x[:, :prompt], cache)]
    steps += [attention(x[:, prompt + i : prompt + i + 1], cache) for i in range(decode_steps)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, **FP32)
    # The cache holds the n_kv heads only, never per-query-head copies.
    assert cache.keys.shape == (batch, shape["n_kv_heads"], prompt + decode_steps, shape["head_dim"])
    assert cache.nbytes == batch * (prompt + decode_steps) * 2 * shape["n_kv_heads"] * shape["head_dim"] * 4


@given(split=st.integers(1, 9))
def test_a_prompt_in_two_chunks_equals_one_piece(split):
    torch.manual_seed(split)
    attention = GroupedQueryAttention(32, 4, 2)
    x = torch.randn(2, 10, 32)
    cache = attention.new_cache()
    chunked = torch.cat([attention(x[:, :split], cache), attention(x[:, split:], cache)], dim=1)
    torch.testing.assert_close(chunked, attention(x), **FP32)


def test_mha_and_mqa_are_the_two_ends_of_gqa():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32)
    mha, mqa = MultiHeadAttention(32, 4), MultiQueryAttention(32, 4)
    assert (mha.n_kv_heads, mqa.n_kv_heads) == (4, 1)
    for special, n_kv in ((mha, 4), (mqa, 1)):
        gqa = GroupedQueryAttention(32, 4, n_kv)
        gqa.load_state_dict(special.state_dict())
        torch.testing.assert_close(gqa(x), special(x), rtol=0, atol=0)


def test_gqa_equals_mha_whose_kv_heads_are_repeated():
    # GQA(n_kv) is MHA with W_K, W_V tiled so that each group of m query heads reads the same head.
    torch.manual_seed(0)
    gqa = GroupedQueryAttention(32, 8, 2, head_dim=4)
    mha = MultiHeadAttention(32, 8, head_dim=4)
    state = gqa.state_dict()
    for name in ("k_proj.weight", "v_proj.weight"):
        state[name] = state[name].view(2, 4, 32).repeat_interleave(4, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(mha(x), gqa(x), **FP32)
    gqa_cache, mha_cache = gqa.new_cache(), mha.new_cache()
    gqa(x, gqa_cache), mha(x, mha_cache)
    assert mha_cache.nbytes == 4 * gqa_cache.nbytes  # the cache shrinks by n_h / n_kv
    assert gqa.cache_elements_per_token() == 2 * 2 * 4


def test_grouped_attention_matches_pytorch_with_an_offset_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 3, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 5)
    # Queries at positions 4, 5, 6 see keys 0..4, 0..5, 0..6.
    mask = torch.arange(7)[None, :] <= (torch.arange(3)[:, None] + 4)
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), attn_mask=mask, scale=0.3
    )
    torch.testing.assert_close(grouped_attention(q, k, v, scale=0.3, q_offset=4), expected, **FP32)
    unmasked = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), scale=0.3)
    torch.testing.assert_close(grouped_attention(q, k, v, scale=0.3, causal=False), unmasked, **FP32)


def test_softmax_runs_in_fp32_for_bf16_inputs():
    torch.manual_seed(0)
    attention = GroupedQueryAttention(64, 8, 2)
    x = torch.randn(2, 16, 64)
    expected = attention(x)
    out = attention.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # bf16 weights and activations (8-bit mantissa) through four matmuls: errors of a few 1e-3 of the output scale.
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


def test_scale_is_one_over_sqrt_head_dim():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 3)
    probs = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(16), dim=-1)
    torch.testing.assert_close(grouped_attention(q, k, v, scale=1 / math.sqrt(16), causal=False), probs @ v, **FP32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=32, n_heads=6, n_kv_heads=4), r"n_heads \(6\) must be divisible by n_kv_heads \(4\)"),
        (dict(d_model=32, n_heads=4, n_kv_heads=2, head_dim=5), "head_dim must be even"),
        (dict(d_model=0, n_heads=4, n_kv_heads=2), "d_model must be a positive integer"),
        (dict(d_model=32, n_heads=-4, n_kv_heads=2), "n_heads must be a positive integer"),
        (dict(d_model=32, n_heads=4, n_kv_heads=0), "n_kv_heads must be a positive integer"),
        (dict(d_model=30, n_heads=4, n_kv_heads=2), r"d_model \(30\) is not divisible by n_heads \(4\)"),
        (dict(d_model=32, n_heads=4, n_kv_heads=2, rope_layout="neox"), "rope_layout must be one of"),
    ],
)
def test_bad_configurations_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GroupedQueryAttention(**kwargs)


def test_a_cache_fed_another_batch_size_is_refused():
    attention = GroupedQueryAttention(16, 2, 1)
    cache = attention.new_cache()
    attention(torch.randn(2, 3, 16), cache)
    with pytest.raises(ValueError, match="batch size"):
        attention(torch.randn(3, 1, 16), cache)


def test_a_custom_frequency_table_replaces_the_default():
    torch.manual_seed(0)
    default = GroupedQueryAttention(16, 2, 1, head_dim=8)
    x = torch.randn(1, 6, 16)
    standard_table = [10000 ** (-j / 4) for j in range(4)]
    standard = GroupedQueryAttention(16, 2, 1, head_dim=8, rope_frequencies=standard_table)
    standard.load_state_dict(default.state_dict())
    torch.testing.assert_close(standard(x), default(x), **FP32)
    # Frequency 0 leaves a pair unrotated: with all four at 0 the module is attention without RoPE.
    no_rope = GroupedQueryAttention(16, 2, 1, head_dim=8, rope_frequencies=[0.0] * 4)
    no_rope.load_state_dict(default.state_dict())
    q = no_rope.q_proj(x).view(1, 6, 2, 8).transpose(1, 2)
    k = no_rope.k_proj(x).view(1, 6, 1, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    v = no_rope.v_proj(x).view(1, 6, 1, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    expected = no_rope.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, 6, 16))
    torch.testing.assert_close(no_rope(x), expected, **FP32)
    with pytest.raises(ValueError, match="one frequency per rotary pair"):
        GroupedQueryAttention(16, 2, 1, head_dim=8, rope_frequencies=[1.0])


def test_many_sequences_run_a_few_at_a_time_with_the_same_result(monkeypatch):
    import mla_ref.attention as attention

    torch.manual_seed(0)
    q, k, v = torch.randn(7, 4, 16, 8), torch.randn(7, 2, 16, 8), torch.randn(7, 2, 16, 6)
    whole = attention.grouped_attention(q, k, v, scale=0.3)  # 7 · 4 · 16² scores: one block
    monkeypatch.setattr(attention, "SCORES_PER_BLOCK", 2 * 4 * 16 * 16)  # two sequences a block: 4 blocks
    blocked = attention.grouped_attention(q, k, v, scale=0.3)
    assert torch.equal(blocked, whole)  # the same products per sequence: the same bits
    monkeypatch.setattr(attention, "SCORES_PER_BLOCK", 1)
    torch.testing.assert_close(attention.grouped_attention(q, k, v, scale=0.3), whole, rtol=0, atol=0)


@pytest.mark.parametrize(("prompt", "cached"), [(256, 0), (300, 0), (512, 100)])
def test_a_long_prompt_skips_the_scores_its_mask_hides(prompt, cached):
    """A prompt of 256 or more splits its queries in two halves, the first reading only the keys it may see: still
    SDPA's masked attention over every key, with or without cached keys before the prompt."""
    torch.manual_seed(0)
    q = torch.randn(2, 6, prompt, 16)
    k, v = torch.randn(2, 2, cached + prompt, 16), torch.randn(2, 2, cached + prompt, 8)
    mask = torch.arange(cached + prompt)[None, :] <= (torch.arange(prompt)[:, None] + cached)  # (s, t)
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), attn_mask=mask, scale=0.25
    )
    split = grouped_attention(q, k, v, scale=0.25, q_offset=cached)
    torch.testing.assert_close(split, expected, **FP32)

"""GQA → MLA exactly: same outputs on both MLA paths, same cache bytes, the source untouched."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert import gqa_to_mla_exact

# fp32: the converted module multiplies the same numbers in another grouping (≈1e-7 relative).
FP32 = dict(atol=1e-5, rtol=1e-5)


@given(
    n_kv=st.integers(1, 4),
    group=st.integers(1, 3),
    head_dim=st.sampled_from([2, 4, 8]),
    layout=st.sampled_from(["rotate_half", "interleaved"]),
    batch=st.integers(1, 2),
    prompt=st.integers(1, 8),
    decode_steps=st.integers(0, 3),
)
def test_outputs_and_cache_bytes_are_unchanged(n_kv, group, head_dim, layout, batch, prompt, decode_steps):
    torch.manual_seed(prompt)
    source = GroupedQueryAttention(24, n_kv * group, n_kv, head_dim, rope_layout=layout, rope_theta=500.0)
    converted = gqa_to_mla_exact(source)
    x = torch.randn(batch, prompt + decode_steps, 24)
    source_cache = source.new_cache()
    expected = torch.cat(
        [source(x[:, :prompt], source_cache)]
        + [source(x[:, t : t + 1], source_cache) for t in range(prompt, x.shape[1])],
        dim=1,
    )
    for path in ("naive", "absorbed"):
        cache = converted.new_cache()
        out = torch.cat(
            [converted(x[:, :prompt], cache, path=path)]
            + [converted(x[:, t : t + 1], cache, path=path) for t in range(prompt, x.shape[1])],
            dim=1,
        )
        torch.testing.assert_close(out, expected, **FP32)
        assert cache.nbytes == source_cache.nbytes
    assert converted.cache_elements_per_token() == source.cache_elements_per_token()


def test_custom_frequencies_carry_over_and_the_source_is_untouched():
    torch.manual_seed(0)
    source = GroupedQueryAttention(16, 4, 2, 4, rope_frequencies=[0.9, 0.05])
    before = {k: v.clone() for k, v in source.state_dict().items()}
    converted = gqa_to_mla_exact(source)
    assert converted.rope_frequencies == (0.9, 0.05) * 2
    x = torch.randn(1, 9, 16)
    torch.testing.assert_close(converted(x, path="absorbed"), source(x), **FP32)
    for name, value in source.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_biases_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="qkv_bias=True"):
        gqa_to_mla_exact(GroupedQueryAttention(16, 4, 2, qkv_bias=True))

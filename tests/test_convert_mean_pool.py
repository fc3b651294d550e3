"""MHA → GQA by mean-pooling KV heads."""

import pytest
import torch

from mla_ref.attention import GroupedQueryAttention, MultiHeadAttention
from mla_ref.convert import mean_pool_kv_heads


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_pooled_projections_are_the_group_means(n_kv):
    torch.manual_seed(n_kv)
    mha = MultiHeadAttention(32, 8, head_dim=4, qkv_bias=True)
    gqa = mean_pool_kv_heads(mha, n_kv)
    assert gqa.n_kv_heads == n_kv and gqa.k_proj.weight.shape == (n_kv * 4, 32)
    r = 8 // n_kv
    for name in ("k_proj", "v_proj"):
        weight = getattr(mha, name).weight.view(8, 4, 32)
        bias = getattr(mha, name).bias.view(8, 4)
        for g in range(n_kv):
            expected = weight[g * r : (g + 1) * r].mean(0)
            torch.testing.assert_close(getattr(gqa, name).weight.view(n_kv, 4, 32)[g], expected)
            torch.testing.assert_close(getattr(gqa, name).bias.view(n_kv, 4)[g], bias[g * r : (g + 1) * r].mean(0))
    torch.testing.assert_close(gqa.q_proj.weight, mha.q_proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(gqa.o_proj.weight, mha.o_proj.weight, rtol=0, atol=0)


def test_pooling_is_exact_when_heads_in_a_group_are_equal():
    torch.manual_seed(0)
    gqa = GroupedQueryAttention(32, 8, 2, head_dim=4)
    mha = MultiHeadAttention(32, 8, head_dim=4)
    state = gqa.state_dict()
    for name in ("k_proj.weight", "v_proj.weight"):
        state[name] = state[name].view(2, 4, 32).repeat_interleave(4, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(mean_pool_kv_heads(mha, 2)(x), gqa(x), atol=1e-5, rtol=1e-5)


def test_pooling_to_the_same_head_count_is_the_identity_and_the_source_is_untouched():
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4)
    before = {k: v.clone() for k, v in mha.state_dict().items()}
    same = mean_pool_kv_heads(mha, 4)
    x = torch.randn(1, 5, 32)
    torch.testing.assert_close(same(x), mha(x), rtol=0, atol=0)
    mean_pool_kv_heads(mha, 1)
    for name, value in mha.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_pooling_moves_the_outputs_of_distinct_heads():
    torch.manual_seed(0)
    mha = MultiHeadAttention(64, 8)
    x = torch.randn(2, 12, 64)
    reference = mha(x)
    errors = [((mean_pool_kv_heads(mha, n)(x) - reference).norm() / reference.norm()).item() for n in (8, 4, 2, 1)]
    assert errors[0] == 0.0
    assert all(e > 1e-3 for e in errors[1:])  # random heads are far apart: pooling is lossy


@pytest.mark.parametrize(
    "n_kv, message",
    [
        (3, r"n_kv_heads \(3\) must divide the source's 8 KV heads; allowed: \[1, 2, 4, 8\]"),
        (0, "n_kv_heads must be a positive integer"),
        (16, r"n_kv_heads \(16\) must divide"),
    ],
)
def test_bad_head_counts_are_refused(n_kv, message):
    with pytest.raises(ValueError, match=message):
        mean_pool_kv_heads(MultiHeadAttention(32, 8), n_kv)

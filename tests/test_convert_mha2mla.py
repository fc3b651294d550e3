"""MHA2MLA: partial RoPE's pair choices, its MLA form, SVD low rank, the cache, and refusals of bad arguments."""

import math

import pytest
import torch
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

from mla_ref import checkpoint
from mla_ref.attention import GroupedQueryAttention, grouped_attention
from mla_ref.convert import (
    keep_top_pairs,
    mha2mla_convert,
    mha2mla_ranks,
    pair_norm_scores,
    pair_rotation_scores,
    partial_rope_parts,
    select_rotary_pairs,
    svd_low_rank_parts,
)
from mla_ref.convert.activations import input_moment
from mla_ref.convert.model import convert_model
from mla_ref.convert.parts import assemble_mla
from mla_ref.model import ModelConfig, TinyLM
from mla_ref.rope import apply_rope, pair_indices, rope_inv_freq

# fp32: the converted module multiplies the same numbers in another grouping, and the SVD runs in fp64
# before the cast, so agreement is at fp32 rounding (≈1e-7 relative); 1e-5 leaves room for the softmax.
FP32 = dict(atol=1e-5, rtol=1e-5)
# Weight reconstructions: products of fp32-rounded fp64 factors, entries of size ≈0.1.
WEIGHTS = dict(atol=1e-6, rtol=1e-5)


def kept_lists(kept: torch.Tensor) -> list[list[int]]:
    """A (n_kv, d_h/2) bool mask as the sorted pair indices of each KV head."""
    return [row.nonzero().flatten().tolist() for row in kept]


def partial_rope_reference(source: GroupedQueryAttention, kept: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The source's attention with RoPE switched off on the pairs a KV head does not keep (computed directly)."""
    n_h, n_kv, d_h, m = source.n_heads, source.n_kv_heads, source.head_dim, source.group_size
    positions = torch.arange(x.shape[1])
    rope = dict(theta=source.rope_theta, layout=source.rope_layout, inv_freq=rope_inv_freq(source.rope_frequencies))
    q = rearrange(source.q_proj(x), "b s (h d) -> b h s d", h=n_h)
    k = rearrange(source.k_proj(x), "b s (g d) -> b g s d", g=n_kv)
    v = rearrange(source.v_proj(x), "b s (g d) -> b g s d", g=n_kv)
    pairs = [row.nonzero().flatten() for row in kept]
    q = torch.stack([apply_rope(q[:, i], positions, pairs=pairs[i // m], **rope) for i in range(n_h)], dim=1)
    k = torch.stack([apply_rope(k[:, g], positions, pairs=pairs[g], **rope) for g in range(n_kv)], dim=1)
    out = grouped_attention(q, k, v, scale=1.0 / math.sqrt(d_h))
    return source.o_proj(rearrange(out, "b h s d -> b s (h d)"))


def run_in_chunks(module, x: torch.Tensor, prompt: int, **kwargs) -> tuple[torch.Tensor, object]:
    """Prefill ``prompt`` tokens through a fresh cache, then decode the rest one at a time."""
    cache = module.new_cache()
    pieces = [module(x[:, :prompt], cache, **kwargs)]
    pieces += [module(x[:, t : t + 1], cache, **kwargs) for t in range(prompt, x.shape[1])]
    return torch.cat(pieces, dim=1), cache


# ---- pair selection on hand-built cases ---------------------------------------------------------------------


def test_frequency_strategies_pick_the_documented_pairs():
    source = GroupedQueryAttention(24, 4, 2, 12)  # d_h/2 = 6 pairs, ω_j decreasing in j
    expected = {
        ("high", 2): [0, 1],
        ("low", 2): [4, 5],
        ("uniform", 2): [0, 3],
        ("uniform", 3): [0, 2, 4],
        ("uniform", 4): [0, 1, 3, 4],  # ⌊k · 6/4⌋ = 0, 1, 3, 4
        ("high", 0): [],
        ("low", 6): [0, 1, 2, 3, 4, 5],
    }
    for (strategy, r), pairs in expected.items():
        kept = select_rotary_pairs(source, r, strategy)
        assert kept_lists(kept) == [pairs, pairs], (strategy, r)


def test_frequency_strategies_follow_a_custom_frequency_table():
    # pair 1 rotates fastest, pair 3 not at all: "high" and "low" go by ω_j, not by j
    source = GroupedQueryAttention(16, 2, 2, 8, rope_frequencies=[0.1, 0.9, 0.5, 0.0])
    assert kept_lists(select_rotary_pairs(source, 2, "high")) == [[1, 2], [1, 2]]
    assert kept_lists(select_rotary_pairs(source, 1, "low")) == [[3], [3]]
    assert kept_lists(select_rotary_pairs(source, 2, "uniform")) == [[0, 1], [0, 1]]  # ω order 1, 2, 0, 3 -> k = 0, 2


def _pair_weight(norms: list[list[float]], layout: str) -> torch.Tensor:
    """A projection (heads · d_h, D=2) whose head h, pair j has norm[h][j] on input e_0 (all on coordinate a_j)."""
    n_heads, half = len(norms), len(norms[0])
    a_idx, _ = pair_indices(2 * half, layout)
    weight = torch.zeros(n_heads, 2 * half, 2)
    for h in range(n_heads):
        weight[h, a_idx, 0] = torch.tensor(norms[h])
    return rearrange(weight, "h d i -> (h d) i")


@pytest.mark.parametrize("layout", ["rotate_half", "interleaved"])
def test_two_norm_sums_query_norms_over_a_gqa_group(layout):
    source = GroupedQueryAttention(2, 4, 2, 4, rope_layout=layout)  # 2 groups of 2 query heads, 2 pairs each
    query_norms = [[3.0, 2.0], [0.0, 2.0], [1.0, 0.0], [1.0, 0.0]]
    key_norms = [[1.0, 1.0], [1.0, 5.0]]
    with torch.no_grad():
        source.q_proj.weight.copy_(_pair_weight(query_norms, layout))
        source.k_proj.weight.copy_(_pair_weight(key_norms, layout))
    # tokens e_0 and −e_0: the pair vectors flip sign, their norms do not (a mean of norms, not a norm of means)
    calibration = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    scores = pair_norm_scores(source, calibration)
    # group 0: (3 + 0)·1, (2 + 2)·1 -> pair 1, though head 0 alone has its largest norm on pair 0
    # group 1: (1 + 1)·1, (0 + 0)·5 -> pair 0, though the key is largest on pair 1
    torch.testing.assert_close(scores, torch.tensor([[3.0, 4.0], [2.0, 0.0]]), atol=1e-6, rtol=0)
    assert kept_lists(select_rotary_pairs(source, 1, "2-norm", calibration_inputs=calibration)) == [[1], [0]]


def test_keep_top_pairs_per_head_or_globally():
    scores = torch.tensor([[5.0, 4.0, 3.0], [1.0, 0.5, 2.0]])
    assert kept_lists(keep_top_pairs(scores, 1)) == [[0], [2]]
    # the same budget of n_kv · r = 2 pairs spent where the scores are largest: both in head 0
    assert kept_lists(keep_top_pairs(scores, 1, allocation="global")) == [[0, 1], []]
    # ties go to the lower pair index
    assert kept_lists(keep_top_pairs(torch.ones(1, 4), 2)) == [[0, 1]]


def test_rotation_score_weighs_the_two_norm_by_how_far_a_pair_turns():
    # pair 0 turns by π per token, pair 1 not at all; a window of 2 tokens has gaps 0 (twice) and 1 (once)
    source = GroupedQueryAttention(8, 2, 1, 4, rope_frequencies=[math.pi, 0.0])
    x = torch.randn(3, 2, 8)
    # E_Δ |e^{iωΔ} − 1| = (2 · 0 + 1 · 2|sin(π/2)|) / 3 = 2/3 for pair 0, and 0 for the pair that never turns
    expected = pair_norm_scores(source, x) * torch.tensor([2 / 3, 0.0])
    torch.testing.assert_close(pair_rotation_scores(source, x), expected, atol=1e-6, rtol=1e-5)


def test_rotation_score_frees_a_slow_pair_that_two_norm_would_keep():
    source = GroupedQueryAttention(2, 1, 1, 4, rope_frequencies=[1.0, 1e-4])
    with torch.no_grad():  # pair 1 has twice the norms of pair 0 but turns 10⁴ times slower
        source.q_proj.weight.copy_(_pair_weight([[1.0, 2.0]], "rotate_half"))
        source.k_proj.weight.copy_(_pair_weight([[1.0, 2.0]], "rotate_half"))
    x = torch.tensor([[[1.0, 0.0]] * 16])
    assert kept_lists(select_rotary_pairs(source, 1, "2-norm", calibration_inputs=x)) == [[1]]
    assert kept_lists(select_rotary_pairs(source, 1, "rotation-2-norm", calibration_inputs=x)) == [[0]]


def test_global_allocation_keeps_the_budget_but_moves_pairs_between_heads():
    torch.manual_seed(0)
    source = GroupedQueryAttention(16, 4, 4, 8)
    with torch.no_grad():
        source.q_proj.weight[:8] *= 10  # head 0's queries dominate every pair score
    x = torch.randn(2, 6, 16)
    assert select_rotary_pairs(source, 1, "2-norm", calibration_inputs=x).sum(dim=1).tolist() == [1, 1, 1, 1]
    kept = select_rotary_pairs(source, 1, "2-norm", calibration_inputs=x, allocation="global")
    assert kept_lists(kept) == [[0, 1, 2, 3], [], [], []]  # the layer's 4 pairs all go to head 0
    converted = mha2mla_convert(source, rope_pairs=1, kv_lora_rank=30, calibration_inputs=x, allocation="global")
    assert converted.qk_rope_head_dim == 2 * 1 * 4  # d_R as with one pair per head
    assert converted.qk_nope_head_dim == 8  # heads 1-3 keep all 8 coordinates position-free
    torch.testing.assert_close(converted(x, path="absorbed"), converted(x), **FP32)


# ---- partial RoPE at full rank ----------------------------------------------------------------------------


@given(
    n_kv=st.integers(1, 3),
    group=st.integers(1, 2),
    half=st.integers(1, 4),
    layout=st.sampled_from(["rotate_half", "interleaved"]),
    mask_seed=st.integers(0, 1000),
    prompt=st.integers(1, 6),
    decode_steps=st.integers(0, 2),
)
def test_full_rank_partial_rope_only_drops_the_rotations(n_kv, group, half, layout, mask_seed, prompt, decode_steps):
    torch.manual_seed(mask_seed)
    source = GroupedQueryAttention(16, n_kv * group, n_kv, 2 * half, rope_layout=layout, rope_theta=50.0)
    kept = torch.rand(n_kv, half) < 0.5  # any mask, per-head counts may differ
    least_nope = 2 * half - 2 * int(kept.sum(dim=1).min())
    nope_dim = [None, least_nope, 2 * half][mask_seed % 3]  # zero-padded position-free coordinates change nothing
    converted = assemble_mla(partial_rope_parts(source, kept, nope_dim=nope_dim), source.d_model)
    x = torch.randn(2, prompt + decode_steps, 16)
    expected = partial_rope_reference(source, kept, x)
    for path in ("naive", "absorbed"):
        out, cache = run_in_chunks(converted, x, prompt, path=path)
        torch.testing.assert_close(out, expected, **FP32)
        assert converted.cache_elements_per_token() == source.cache_elements_per_token()  # nothing compressed yet


@given(
    n_kv=st.integers(1, 3),
    group=st.integers(1, 3),
    half=st.sampled_from([1, 2, 4]),
    layout=st.sampled_from(["rotate_half", "interleaved"]),
    strategy=st.sampled_from(["high", "low", "uniform", "2-norm"]),
    svd=st.sampled_from(["joint", "split"]),
    full_latent=st.booleans(),
    prompt=st.integers(1, 6),
    decode_steps=st.integers(0, 2),
)
def test_keeping_every_pair_at_full_rank_reproduces_the_source(
    n_kv, group, half, layout, strategy, svd, full_latent, prompt, decode_steps
):
    torch.manual_seed(prompt)
    source = GroupedQueryAttention(16, n_kv * group, n_kv, 2 * half, rope_layout=layout, rope_theta=50.0)
    x = torch.randn(2, prompt + decode_steps, 16)
    # r = d_h/2, and the latent kept whole: either no SVD at all, or an SVD of full rank n_kv · d_h
    kv_lora_rank = None if full_latent else n_kv * 2 * half
    converted = mha2mla_convert(
        source, rope_pairs=half, strategy=strategy, kv_lora_rank=kv_lora_rank, svd=svd, calibration_inputs=x
    )
    expected, source_cache = run_in_chunks(source, x, prompt)
    for path in ("naive", "absorbed"):
        out, cache = run_in_chunks(converted, x, prompt, path=path)
        torch.testing.assert_close(out, expected, **FP32)
        assert cache.nbytes == source_cache.nbytes


# ---- SVD low rank -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["joint", "split"])
@pytest.mark.parametrize(("n_kv", "group"), [(4, 1), (2, 2)])
def test_svd_at_full_rank_reproduces_the_weights(method, n_kv, group):
    source = GroupedQueryAttention(64, n_kv * group, n_kv, 8)
    kept = select_rotary_pairs(source, 1, "high")
    full = partial_rope_parts(source, kept)
    key_rows = n_kv * (8 - 2)
    low = svd_low_rank_parts(full, full.latent_down.shape[0], method=method, key_rows=key_rows)
    # W_UK^i W_DKV and W_UV^i W_DKV are head i's nope-key and value projections again
    torch.testing.assert_close(low.key_up @ low.latent_down, full.key_up @ full.latent_down, **WEIGHTS)
    torch.testing.assert_close(low.value_up @ low.latent_down, full.value_up @ full.latent_down, **WEIGHTS)
    value_rows = rearrange(source.v_proj.weight.detach(), "(g d) i -> g d i", g=n_kv).repeat_interleave(group, 0)
    torch.testing.assert_close(low.value_up @ low.latent_down, value_rows, **WEIGHTS)


def test_svd_puts_sigma_in_the_down_projection():
    source = GroupedQueryAttention(64, 4, 4, 8)  # MHA: stacking W_UK^i, W_UV^i over heads gives U itself
    full = partial_rope_parts(source, select_rotary_pairs(source, 1, "high"))
    low = svd_low_rank_parts(full, 20)
    basis = torch.cat([low.key_up[i] for i in range(4)] + [low.value_up[i] for i in range(4)])  # (n, d_c)
    torch.testing.assert_close(basis.T @ basis, torch.eye(20), atol=1e-5, rtol=0)  # orthonormal columns
    singular_values = torch.linalg.svdvals(full.latent_down.double())[:20].float()
    torch.testing.assert_close(low.latent_down.norm(dim=1), singular_values, atol=1e-5, rtol=1e-5)


@given(rope_pairs=st.integers(0, 4), kv_lora_rank=st.integers(2, 40), seed=st.integers(0, 100))
def test_joint_is_at_least_as_close_as_split_at_equal_cache(rope_pairs, kv_lora_rank, seed):
    torch.manual_seed(seed)
    source = GroupedQueryAttention(48, 4, 4, 8)
    full = partial_rope_parts(source, select_rotary_pairs(source, rope_pairs, "high"))
    kv_lora_rank = min(kv_lora_rank, full.latent_down.shape[0])
    key_rows = 4 * (8 - 2 * rope_pairs)
    weights = {}
    for method in ("joint", "split"):
        low = svd_low_rank_parts(full, kv_lora_rank, method=method, key_rows=key_rows)
        assert low.cache_elements_per_token == kv_lora_rank + 2 * rope_pairs * 4  # the same cache for both
        weights[method] = torch.cat([low.key_up @ low.latent_down, low.value_up @ low.latent_down], dim=1)
    target = torch.cat([full.key_up @ full.latent_down, full.value_up @ full.latent_down], dim=1)
    # Eckart–Young: the joint truncated SVD is the best rank-d_c approximation of [W_K^N ; W_V];
    # split is another rank-d_c approximation, so it cannot be closer (up to fp32 rounding).
    joint_error = (weights["joint"] - target).norm()
    split_error = (weights["split"] - target).norm()
    assert joint_error <= split_error * (1 + 1e-5) + 1e-6


def test_activation_basis_fits_the_calibration_activations_at_least_as_well():
    source = GroupedQueryAttention(32, 4, 4, 8)
    full = partial_rope_parts(source, select_rotary_pairs(source, 1, "high"))
    # correlated inputs, so that the activation basis differs from the weight SVD's
    x = torch.randn(1, 256, 32) @ torch.randn(32, 32)
    covariance = input_moment(x, x.shape[-1])
    w = full.latent_down.double()  # (n, D)

    def activation_error(parts):  # E‖(W − Ŵ) x‖²
        reconstructed = torch.cat([parts.key_up @ parts.latent_down, parts.value_up @ parts.latent_down], 1).double()
        target = torch.cat([full.key_up.double() @ w, full.value_up.double() @ w], 1)
        difference = reconstructed - target  # (n_h, d_N + d_v, D)
        return torch.einsum("hri,ij,hrj->", difference, covariance, difference).item()

    by_weights = svd_low_rank_parts(full, 12)
    by_activations = svd_low_rank_parts(full, 12, covariance=covariance)
    assert activation_error(by_activations) <= activation_error(by_weights) * (1 + 1e-6)
    # with E[xxᵀ] = I the activation basis is the weight SVD
    identity = svd_low_rank_parts(full, 12, covariance=torch.eye(32, dtype=torch.float64))
    torch.testing.assert_close(
        identity.key_up @ identity.latent_down, by_weights.key_up @ by_weights.latent_down, **WEIGHTS
    )


# ---- the converted module -----------------------------------------------------------------------------------


@given(
    n_kv=st.integers(1, 3),
    group=st.integers(1, 2),
    rope_pairs=st.integers(0, 4),
    strategy=st.sampled_from(["high", "low", "uniform", "2-norm", "rotation-2-norm"]),
    svd=st.sampled_from(["joint", "split"]),
    svd_basis=st.sampled_from(["weights", "activations"]),
    rank_share=st.floats(0.05, 1.0),
    batch=st.integers(1, 2),
    prompt=st.integers(1, 6),
    decode_steps=st.integers(0, 2),
)
def test_naive_and_absorbed_paths_agree_and_cache_the_latent(
    n_kv, group, rope_pairs, strategy, svd, svd_basis, rank_share, batch, prompt, decode_steps
):
    torch.manual_seed(prompt)
    source = GroupedQueryAttention(24, n_kv * group, n_kv, 8)
    x = torch.randn(batch, prompt + decode_steps, 24)
    full_rank = n_kv * (8 - 2 * rope_pairs) + n_kv * 8
    kv_lora_rank = max(1, round(rank_share * full_rank))
    allocation = "global" if strategy.endswith("2-norm") and prompt % 2 else "per_head"
    converted = mha2mla_convert(
        source,
        rope_pairs=rope_pairs,
        strategy=strategy,
        kv_lora_rank=kv_lora_rank,
        svd=svd,
        calibration_inputs=x,
        allocation=allocation,
        svd_basis=svd_basis,
    )
    naive, naive_cache = run_in_chunks(converted, x, prompt, path="naive")
    absorbed, absorbed_cache = run_in_chunks(converted, x, prompt, path="absorbed")
    torch.testing.assert_close(absorbed, naive, **FP32)
    d_rope = 2 * rope_pairs * n_kv
    assert converted.kv_lora_rank == kv_lora_rank and converted.qk_rope_head_dim == d_rope
    element_size = torch.tensor([], dtype=torch.float32).element_size()
    for cache in (naive_cache, absorbed_cache):
        assert cache.nbytes == (kv_lora_rank + d_rope) * batch * x.shape[1] * element_size


def test_whole_model_conversion_with_a_global_allocation_keeps_one_shape(tmp_path):
    config = ModelConfig(d_model=32, n_layers=2, n_heads=4, head_dim=8, mlp_hidden=64, attention="mha")
    model = TinyLM(config).eval()
    tokens = torch.randint(0, 256, (2, 12))

    def convert_layer(attention, inputs):
        return mha2mla_convert(
            attention,
            rope_pairs=1,
            strategy="rotation-2-norm",
            allocation="global",
            kv_lora_rank=20,
            calibration_inputs=inputs,
        )

    converted = convert_model(model, convert_layer, tokens)  # refuses layers of different shapes
    assert converted.kv_cache_elements_per_token() == 2 * (20 + 2 * 1 * 4)
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens, path="absorbed"), converted(tokens), **FP32)
        checkpoint.save(converted, tmp_path / "converted")
        reloaded = checkpoint.load(tmp_path / "converted")
        torch.testing.assert_close(reloaded(tokens, path="absorbed"), converted(tokens, path="absorbed"), **FP32)


def test_the_source_is_untouched_and_frequencies_carry_over():
    source = GroupedQueryAttention(16, 4, 2, 8, rope_frequencies=[0.9, 0.3, 0.05, 0.0])
    before = {k: v.clone() for k, v in source.state_dict().items()}
    x = torch.randn(1, 5, 16)
    converted = mha2mla_convert(source, rope_pairs=2, strategy="high", kv_lora_rank=20, calibration_inputs=x)
    assert converted.rope_frequencies == (0.9, 0.3) * 2  # each KV head's kept pairs, block after block
    for name, value in source.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_ranks_for_a_cache_fraction():
    teacher_like = GroupedQueryAttention(256, 8, 8, 32)  # 512 cached elements per token per layer
    assert mha2mla_ranks(teacher_like, 0.5) == (8, 128)  # half of 256 on d_R = 2 · 8 · 8
    assert mha2mla_ranks(teacher_like, 0.25) == (4, 64)
    assert mha2mla_ranks(teacher_like, 0.5, rope_share=1 / 8) == (2, 224)  # d_R = 32 = 1/8 of 256
    assert mha2mla_ranks(teacher_like, 0.25, rope_share=0.0) == (0, 128)
    assert mha2mla_ranks(teacher_like, 0.1, rope_share=0.01) == (1, 35)  # at least one pair when it fits
    assert mha2mla_ranks(teacher_like, 1.0, rope_share=0.9) == (16, 256)  # r capped at d_h/2


@given(fraction=st.floats(0.02, 1.0), rope_share=st.floats(0.0, 0.5), n_kv=st.integers(1, 4), half=st.integers(2, 8))
def test_ranks_spend_exactly_the_budget(fraction, rope_share, n_kv, half):
    source = GroupedQueryAttention(8, n_kv, n_kv, 2 * half)
    budget = round(fraction * 2 * n_kv * 2 * half)
    try:
        rope_pairs, kv_lora_rank = mha2mla_ranks(source, fraction, rope_share=rope_share)
    except ValueError as error:  # only when the budget cannot hold a latent beside the rotary pairs
        assert "too few" in str(error)
        return
    assert 0 <= rope_pairs <= half and kv_lora_rank >= 1
    assert kv_lora_rank + 2 * rope_pairs * n_kv == budget


# ---- bad arguments --------------------------------------------------------------------------------------------


def test_bad_arguments_are_refused_with_a_reason():
    source = GroupedQueryAttention(16, 4, 2, 8)  # d_h/2 = 4 pairs; source cache 32 per token
    x = torch.randn(1, 4, 16)
    cases = [
        (dict(rope_pairs=5, strategy="high"), r"rope_pairs must lie in \[0, 4\].*got 5"),
        (dict(rope_pairs=-1, strategy="high"), "rope_pairs must be a non-negative integer"),
        (dict(rope_pairs=1.5, strategy="high"), "rope_pairs must be a non-negative integer"),
        (dict(rope_pairs=2, strategy="middle"), "strategy must be one of 'high', 'low', 'uniform', '2-norm'"),
        (dict(rope_pairs=2, strategy="2-norm"), "pass calibration_inputs"),
        (dict(rope_pairs=2, strategy="high", kv_lora_rank=25), r"kv_lora_rank must lie in \[1, 24\].*32 elements"),
        (dict(rope_pairs=2, strategy="high", kv_lora_rank=0), "kv_lora_rank must be a positive integer"),
        (dict(rope_pairs=2, strategy="high", kv_lora_rank=8, svd="both"), "svd must be one of 'joint', 'split'"),
        (
            dict(rope_pairs=2, strategy="2-norm", calibration_inputs=torch.randn(1, 4, 12)),
            r"calibration_inputs must have shape \(b, s, d_model=16\).*\(1, 4, 12\)",
        ),
        (dict(rope_pairs=2, strategy="2-norm", calibration_inputs=x[0]), r"shape \(b, s, d_model=16\)"),
        (dict(rope_pairs=2, strategy="2-norm", calibration_inputs=x.numpy()), "must be a tensor"),
        (dict(rope_pairs=2, strategy="2-norm", calibration_inputs=x * float("nan")), "NaN"),
        (dict(rope_pairs=2, strategy="rotation-2-norm"), "pass calibration_inputs"),
        (dict(rope_pairs=2, strategy="high", allocation="global"), "allocation 'global' needs pair scores"),
        (dict(rope_pairs=2, strategy="2-norm", calibration_inputs=x, allocation="all"), "allocation must be one of"),
        (dict(rope_pairs=2, strategy="high", kv_lora_rank=8, svd_basis="activations"), "needs calibration_inputs"),
        (dict(rope_pairs=2, strategy="high", kv_lora_rank=8, svd_basis="queries"), "svd_basis must be one of"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            mha2mla_convert(source, **kwargs)
    with pytest.raises(ValueError, match="qkv_bias=True"):
        mha2mla_convert(GroupedQueryAttention(16, 4, 2, qkv_bias=True), rope_pairs=1, strategy="high")
    with pytest.raises(ValueError, match=r"kept must be a bool tensor of shape \(n_kv, d_h/2\) = \(2, 4\)"):
        partial_rope_parts(source, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="kept must be a bool tensor"):
        partial_rope_parts(source, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"nope_dim must lie in \[4, 8\].*got 2"):
        partial_rope_parts(source, select_rotary_pairs(source, 2, "high"), nope_dim=2)
    full = partial_rope_parts(source, select_rotary_pairs(source, 2, "high"))
    with pytest.raises(ValueError, match="method 'split' needs key_rows"):
        svd_low_rank_parts(full, 8, method="split")
    with pytest.raises(ValueError, match="method must be one of 'joint', 'split'"):
        svd_low_rank_parts(full, 8, method="qr")
    with pytest.raises(ValueError, match=r"kv_lora_rank must lie in \[1, 24\]"):
        svd_low_rank_parts(full, 25)
    with pytest.raises(ValueError, match="allocation must be one of 'per_head', 'global'"):
        keep_top_pairs(torch.ones(2, 4), 1, allocation="greedy")
    with pytest.raises(ValueError, match=r"rope_pairs must lie in \[0, 4\]"):
        keep_top_pairs(torch.ones(2, 4), 5)
    for fraction in (0.0, 1.5, True):
        with pytest.raises(ValueError, match=r"cache_fraction must lie in \(0, 1\]"):
            mha2mla_ranks(source, fraction)
    with pytest.raises(ValueError, match=r"rope_share must lie in \[0, 1\)"):
        mha2mla_ranks(source, 0.5, rope_share=1.0)
    with pytest.raises(ValueError, match="too few"):
        mha2mla_ranks(GroupedQueryAttention(16, 2, 2, 4), 0.01)

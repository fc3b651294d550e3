"""MLA: the equations, naive ≡ absorbed, the latent cache, the absorbed matrices, bf16, long context, errors."""

import copy
import importlib.util
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mla_ref.mla import MLA, MultiHeadLatentAttention
from mla_ref.rope import apply_rope, rope_inv_freq
from mla_ref.testing import copies_of

# fp32, ≤ 40 tokens, small widths: the two paths differ only in summation order (≈1e-6).
FP32 = dict(atol=2e-5, rtol=2e-5)


def reference_mla(m: MultiHeadLatentAttention, x: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2 eqs. 9–19 written out head by head, with no cache and no absorption."""
    b, s, _ = x.shape
    d_n, d_r, d_c, d_v = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank, m.v_head_dim
    positions = torch.arange(s)
    rope = dict(theta=m.rope_theta, layout=m.rope_layout, inv_freq=rope_inv_freq(m.rope_frequencies))
    q = m.q_proj(x) if m.q_lora_rank is None else m.q_b_proj(m.q_a_layernorm(m.q_a_proj(x)))
    q = q.view(b, s, m.n_heads, d_n + d_r)
    compressed = m.kv_a_proj_with_mqa(x)
    latent = compressed[..., :d_c]
    if m.latent_norm:
        latent = m.kv_a_layernorm(latent)
    rope_key = apply_rope(compressed[..., d_c:], positions, **rope)  # (b, s, d_R)
    kv = (latent @ m.kv_b_proj.weight.T).view(b, s, m.n_heads, d_n + d_v)
    outputs = []
    for i in range(m.n_heads):
        q_i = torch.cat([q[:, :, i, :d_n], apply_rope(q[:, :, i, d_n:], positions, **rope)], -1)  # (b, s, d_N+d_R)
        k_i = torch.cat([kv[:, :, i, :d_n], rope_key], -1)  # (b, s, d_N+d_R)
        v_i = kv[:, :, i, d_n:]  # (b, s, d_v)
        scores = q_i @ k_i.transpose(1, 2) / math.sqrt(d_n + d_r)
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        outputs.append(torch.softmax(scores, -1) @ v_i)
    return m.o_proj(torch.cat(outputs, dim=-1))


mla_configs = st.fixed_dictionaries(
    dict(
        n_heads=st.integers(1, 4),
        kv_lora_rank=st.integers(1, 24),
        qk_nope_head_dim=st.integers(1, 8),
        qk_rope_head_dim=st.sampled_from([0, 2, 4, 8]),
        v_head_dim=st.integers(1, 8),
        q_lora_rank=st.one_of(st.none(), st.integers(1, 16)),
        latent_norm=st.booleans(),
        bias=st.booleans(),
        rope_layout=st.sampled_from(["rotate_half", "interleaved"]),
    )
)


def make_mla(config, d_model=16):
    module = MLA(d_model, **config)
    with torch.no_grad():  # RMSNorm weights start at 1; make them generic so the tests see them
        for name, p in module.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return module


@given(config=mla_configs, batch=st.integers(1, 3), prompt=st.integers(1, 10), decode_steps=st.integers(0, 4))
def test_naive_and_absorbed_paths_agree_with_the_equations(config, batch, prompt, decode_steps):
    torch.manual_seed(prompt + 7 * decode_steps)
    m = make_mla(config)
    x = torch.randn(batch, prompt + decode_steps, 16)
    expected = reference_mla(m, x)
    for path in ("naive", "absorbed"):
        torch.testing.assert_close(m(x, path=path), expected, **FP32)
        cache = m.new_cache()
        steps = [m(x[:, :prompt], cache, path=path)]
        steps += [m(x[:, prompt + i : prompt + i + 1], cache, path=path) for i in range(decode_steps)]
        torch.testing.assert_close(torch.cat(steps, 1), expected, **FP32)
        t = prompt + decode_steps
        assert cache.latent_and_rope_key.shape == (batch, t, config["kv_lora_rank"] + config["qk_rope_head_dim"])
        assert cache.nbytes == batch * t * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * 4


def test_a_custom_frequency_table_reaches_both_paths():
    torch.manual_seed(0)
    table = [1.0, 0.3, 0.0, 0.02]  # e.g. a converted key whose pairs came from different source frequencies
    m = make_mla(dict(n_heads=2, kv_lora_rank=12, qk_nope_head_dim=4, qk_rope_head_dim=8, v_head_dim=4))
    custom = MLA(16, 2, 12, 4, 8, 4, rope_frequencies=table)
    custom.load_state_dict(m.state_dict())
    x = torch.randn(2, 7, 16)
    expected = reference_mla(custom, x)
    assert not torch.allclose(expected, reference_mla(m, x))  # the table matters
    for path in ("naive", "absorbed"):
        cache = custom.new_cache()
        out = torch.cat(
            [custom(x[:, :4], cache, path=path)] + [custom(x[:, t : t + 1], cache, path=path) for t in range(4, 7)], 1
        )
        torch.testing.assert_close(out, expected, **FP32)


def test_paths_can_be_mixed_on_one_cache():
    # The cache holds the same rows whichever path wrote them.
    torch.manual_seed(0)
    m = make_mla(dict(n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8))
    x = torch.randn(2, 9, 16)
    cache = m.new_cache()
    out = [m(x[:, :5], cache, path="naive")] + [m(x[:, i : i + 1], cache, path="absorbed") for i in range(5, 9)]
    torch.testing.assert_close(torch.cat(out, 1), reference_mla(m, x), **FP32)


def test_absorbed_path_never_up_projects_the_cache():
    torch.manual_seed(0)
    m = MLA(16, 4, 8, 4, 4, 4)
    calls = []
    m.kv_b_proj.register_forward_hook(lambda *_: calls.append(1))
    cache = m.new_cache()
    m(torch.randn(1, 6, 16), cache, path="absorbed")
    m(torch.randn(1, 1, 16), cache, path="absorbed")
    assert calls == []
    m(torch.randn(1, 1, 16), cache, path="naive")
    assert calls == [1]


def test_absorbed_decode_step_reads_the_cache_without_copying_it():
    """The step attends over the cache rows as stored; the naive path, by design, builds per-head K and V."""
    torch.manual_seed(0)
    m = MLA(16, 4, kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    cache = m.new_cache(capacity=2050)
    cache.append(torch.randn(2, 2048, 32), torch.randn(2, 2048, 8))
    with torch.no_grad():
        with copies_of(cache.latent_and_rope_key) as copies:
            m(torch.randn(2, 1, 16), cache, path="absorbed")
        assert copies == []
        with copies_of(cache.latent_and_rope_key) as copies:
            m(torch.randn(2, 1, 16), cache, path="naive")
        assert copies  # the up-projected keys and values: the copy the absorbed path avoids


def _replace_weights(m: MultiHeadLatentAttention, how: str) -> None:
    new = {name: torch.randn_like(p) for name, p in m.named_parameters()}
    if how == "load_state_dict":
        m.load_state_dict(new)
    elif how == "data.copy_":  # bypasses autograd's version counter: a cache keyed on it would miss this
        for name, p in m.named_parameters():
            p.data.copy_(new[name])
    elif how == "new Parameter":
        m.kv_b_proj.weight = torch.nn.Parameter(new["kv_b_proj.weight"])
    else:  # an optimizer step
        optimizer = torch.optim.SGD(m.parameters(), lr=0.5)
        m(torch.randn(1, 3, 16)).square().sum().backward()
        optimizer.step()


@pytest.mark.parametrize("how", ["load_state_dict", "data.copy_", "new Parameter", "optimizer step"])
def test_a_weight_update_reaches_the_absorbed_decode_step_at_once(how):
    """The absorbed matrices are views of kv_b_proj.weight, never a copy prepared earlier, so none can go stale."""
    torch.manual_seed(0)
    m = MLA(16, 4, kv_lora_rank=12, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)
    x = torch.randn(2, 7, 16)
    cache = m.new_cache()
    with torch.no_grad():
        m(x[:, :6], cache, path="absorbed")
        before = m(x[:, 6:], cache, path="absorbed")  # the absorbed matrices used once with the old weights
    _replace_weights(m, how)
    with torch.no_grad():
        expected = reference_mla(m, x)[:, 6:]  # the new weights, straight from the equations
        cache = m.new_cache()
        m(x[:, :6], cache, path="absorbed")
        after = m(x[:, 6:], cache, path="absorbed")
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, expected, **FP32)


IN_PLACE_CHANGES = {
    "copy_": lambda w, new: w.copy_(new),  # bumps the parameter's version counter
    "data.copy_": lambda w, new: w.data.copy_(new),  # does not: the change is visible only in the values
    "mul_": lambda w, new: w.mul_(new),
}


@pytest.mark.parametrize("change", IN_PLACE_CHANGES.values(), ids=IN_PLACE_CHANGES.keys())
def test_an_in_place_change_to_kv_b_proj_reaches_the_next_decode_step(change):
    """Between two decode steps over one cache, kv_b_proj.weight changes in place; the second absorbed step uses
    the new W_UK and W_UV, as the naive path (which up-projects the cache with the same weight) does."""
    torch.manual_seed(0)
    m = MLA(16, 4, kv_lora_rank=12, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)
    x = torch.randn(2, 8, 16)
    caches = {path: m.new_cache() for path in ("naive", "absorbed")}
    with torch.no_grad():
        steps = {}
        for path, cache in caches.items():
            m(x[:, :6], cache, path=path)
            steps[path] = [m(x[:, 6:7], cache, path=path)]  # a decode step with the old weight
        unchanged, unchanged_cache = copy.deepcopy(m), copy.deepcopy(caches["absorbed"])
        change(m.kv_b_proj.weight, torch.randn_like(m.kv_b_proj.weight))
        for path, cache in caches.items():
            steps[path].append(m(x[:, 7:8], cache, path=path))  # a decode step with the new one
        stale = unchanged(x[:, 7:8], unchanged_cache, path="absorbed")  # what the old weight gives
    assert not torch.allclose(steps["absorbed"][1], stale, rtol=0.1, atol=0.1)  # the change matters
    for before_and_after in zip(steps["absorbed"], steps["naive"], strict=True):
        torch.testing.assert_close(*before_and_after, **FP32)


def test_absorbed_matrices_reproduce_scores_and_outputs():
    torch.manual_seed(0)
    m = MLA(16, 3, kv_lora_rank=10, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=5)
    x, latent = torch.randn(16), torch.randn(10)
    w_uk, w_uv = m.key_up_proj(), m.value_up_proj()
    assert w_uk.shape == (3, 4, 10) and w_uv.shape == (3, 5, 10)
    assert m.absorbed_query_proj().shape == (3, 10, 16) and m.absorbed_output_proj().shape == (3, 16, 10)
    q_nope = torch.einsum("hei,i->he", m.query_nope_proj(), x)  # (h, d_N)
    torch.testing.assert_close(q_nope, (m.q_proj.weight @ x).view(3, 6)[:, :4], **FP32)
    # q_i^N · (W_UK^i c) = (W_UK^iᵀ W_Q^N,i x) · c
    naive_scores = torch.einsum("he,hec,c->h", q_nope, w_uk, latent)
    absorbed_scores = torch.einsum("hci,i,c->h", m.absorbed_query_proj(), x, latent)
    torch.testing.assert_close(absorbed_scores, naive_scores, **FP32)
    # Σ_i W_O^i (W_UV^i c̄) = Σ_i (W_O^i W_UV^i) c̄
    naive_out = m.o_proj.weight @ torch.einsum("hdc,c->hd", w_uv, latent).reshape(-1)
    absorbed_out = torch.einsum("hmc,c->m", m.absorbed_output_proj(), latent)
    torch.testing.assert_close(absorbed_out, naive_out, **FP32)


def test_softmax_scale_counts_the_rope_dimensions():
    m = MLA(16, 2, kv_lora_rank=32, qk_nope_head_dim=12, qk_rope_head_dim=4, v_head_dim=8)
    assert m.softmax_scale == pytest.approx(1 / math.sqrt(16))  # not 1/√d_c = 1/√32
    assert m.cache_elements_per_token() == 36


def test_bf16_paths_stay_within_a_measured_bound_of_fp32():
    torch.manual_seed(0)
    config = dict(n_heads=8, kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, q_lora_rank=48)
    m = make_mla(config, d_model=128)
    x = torch.randn(2, 24, 128)
    expected = reference_mla(m, x)
    m16 = m.to(torch.bfloat16)
    scale = expected.abs().max().item()
    for path in ("naive", "absorbed"):
        cache = m16.new_cache()
        out = torch.cat(
            [m16(x[:, :16].bfloat16(), cache, path=path)]
            + [m16(x[:, i : i + 1].bfloat16(), cache, path=path) for i in range(16, 24)],
            1,
        ).float()
        # bf16 keeps 8 significant bits (ε = 2^-8 ≈ 3.9e-3); rounding the weights and the activations between
        # five matmuls costs about one ε of the output scale. Measured with this seed: 4.3e-3 · max|y| on both
        # paths (the softmax and accumulations run in fp32). The bound leaves 3.5× headroom.
        assert (out - expected).abs().max().item() <= 1.5e-2 * scale, path


def test_decode_over_16k_tokens_stays_finite_and_paths_agree():
    torch.manual_seed(0)
    m = MLA(32, 2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8).to(torch.bfloat16)
    context = 16_384
    cache = m.new_cache(capacity=context + 4)
    with torch.no_grad():
        for _ in range(0, context, 2048):  # prefill in chunks: scores stay (2048 × t) per head
            m((3 * torch.randn(1, 2048, 32)).bfloat16(), cache, path="absorbed")
        assert cache.length == context
        naive_cache = m.new_cache()
        naive_cache.append(cache.latent, cache.rope_key)  # the same 16K rows, for the naive path
        for _ in range(4):
            x = (3 * torch.randn(1, 1, 32)).bfloat16()
            absorbed = m(x, cache, path="absorbed")
            naive = m(x, naive_cache, path="naive")
            assert torch.isfinite(absorbed).all() and torch.isfinite(naive).all()
            # bf16 outputs over 16K keys: both paths accumulate in fp32; the bf16 rounding of the output dominates.
            torch.testing.assert_close(absorbed.float(), naive.float(), atol=2e-2, rtol=2e-2)
    assert cache.length == context + 4
    assert cache.nbytes == (context + 4) * (16 + 4) * 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(qk_rope_head_dim=3), "qk_rope_head_dim must be even"),
        (dict(kv_lora_rank=0), "kv_lora_rank must be a positive integer"),
        (dict(q_lora_rank=0), "q_lora_rank must be a positive integer"),
        (dict(v_head_dim=0), "v_head_dim must be a positive integer"),
        (dict(qk_nope_head_dim=-1), "qk_nope_head_dim must be a non-negative integer"),
        (dict(qk_nope_head_dim=0, qk_rope_head_dim=0), "must be positive, got 0 \\+ 0"),
        (dict(n_heads=0), "n_heads must be a positive integer"),
        (dict(rope_layout="neox"), "rope_layout must be one of"),
    ],
)
def test_bad_configurations_raise_clear_errors(kwargs, message):
    config = dict(d_model=16, n_heads=2, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)
    with pytest.raises(ValueError, match=message):
        MLA(**{**config, **kwargs})


needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed; the Triton backend is not tested"
)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_backend_matches_the_torch_absorbed_path(dtype):
    # On a machine without a GPU this runs the kernel under TRITON_INTERPRET=1 (set in conftest.py).
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = MLA(32, 4, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8).to(device, dtype)
    x = torch.randn(3, 45, 32, device=device, dtype=dtype)
    caches = {backend: m.new_cache() for backend in ("torch", "triton")}
    outputs = {}
    with torch.no_grad():
        for backend, cache in caches.items():
            steps = [m(x[:, :40], cache, path="absorbed", backend=backend)]  # prefill: PyTorch either way
            steps += [m(x[:, t : t + 1], cache, path="absorbed", backend=backend) for t in range(40, 45)]
            outputs[backend] = torch.cat(steps, 1).float()
    # fp32: the kernel sums in another order (≈1e-6). bf16: it rounds the probabilities to bf16 before p·c,
    # one more rounding of 2^-8 than the PyTorch path, on outputs of order 1.
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outputs["triton"], outputs["torch"], atol=tolerance, rtol=tolerance)


def test_triton_backend_needs_the_absorbed_path():
    m = MLA(16, 2, 8, 4, 4, 4)
    with pytest.raises(ValueError, match="backend 'triton' runs the absorbed path only"):
        m(torch.randn(1, 1, 16), path="naive", backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        m(torch.randn(1, 1, 16), backend="cuda")


def test_unknown_path_is_refused():
    m = MLA(16, 2, 8, 4, 4, 4)
    with pytest.raises(ValueError, match="path must be one of 'naive', 'absorbed'"):
        m(torch.randn(1, 2, 16), path="fast")


def test_parameter_names_are_deepseek_v3s():
    low_rank = {name: p.shape for name, p in MLA(64, 4, 32, 16, 8, 16, q_lora_rank=24).named_parameters()}
    assert low_rank == {
        "q_a_proj.weight": (24, 64),
        "q_a_layernorm.weight": (24,),
        "q_b_proj.weight": (4 * 24, 24),
        "kv_a_proj_with_mqa.weight": (32 + 8, 64),
        "kv_a_layernorm.weight": (32,),
        "kv_b_proj.weight": (4 * (16 + 16), 32),
        "o_proj.weight": (64, 4 * 16),
    }
    plain = {name for name, _ in MLA(64, 4, 32, 16, 8, 16, latent_norm=False).named_parameters()}
    assert plain == {"q_proj.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight", "o_proj.weight"}

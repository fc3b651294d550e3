"""TransMLA: RoRoPE keeps the scores before truncation, FreqFold F = 1 is RoRoPE, BKV-PCA is exact at full size
and degrades gracefully below it; the result is a plain MLA (both paths, latent cache); bad input is refused."""

import dataclasses
import math

import pytest
import torch
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert import (
    assemble_mla,
    bkv_pca_parts,
    latent_metric,
    rorope_basis,
    rorope_parts,
    select_rope_components,
    transmla_convert,
    transmla_parts,
)
from mla_ref.convert.parts import rotary_pairs
from mla_ref.mla import MultiHeadLatentAttention
from mla_ref.rope import apply_rope, rope_inv_freq

# fp32: the converted layers multiply the same numbers in another grouping, through an fp64 eigendecomposition
# cast to fp32 (≈1e-7 relative per product); 1e-5 leaves room for sums over d_model and the softmax.
FP32 = dict(atol=1e-5, rtol=1e-5)
D_MODEL = 24


def gqa_scores(source: GroupedQueryAttention, x: torch.Tensor) -> torch.Tensor:
    """q_i · k_g / √d_h after RoPE, for every head and pair of positions: (b, n_h, s, t)."""
    positions = torch.arange(x.shape[1])
    rope = dict(theta=source.rope_theta, layout=source.rope_layout)
    q = apply_rope(rearrange(source.q_proj(x), "b s (h d) -> b h s d", h=source.n_heads), positions, **rope)
    k = apply_rope(rearrange(source.k_proj(x), "b t (g d) -> b g t d", g=source.n_kv_heads), positions, **rope)
    k = k.repeat_interleave(source.group_size, dim=1)  # (b, n_h, t, d_h): head i reads KV head ⌊i/m⌋
    return torch.einsum("bhsd,bhtd->bhst", q, k) / math.sqrt(source.head_dim)


def mla_scores(module: MultiHeadLatentAttention, x: torch.Tensor) -> torch.Tensor:
    """[q_i^N ; RoPE(q_i^R)] · [W_UK^i c ; RoPE(k^R)] / √(d_N + d_R), from the module's weights: (b, n_h, s, t)."""
    positions = torch.arange(x.shape[1])
    rope = dict(layout=module.rope_layout, inv_freq=rope_inv_freq(module.rope_frequencies))
    d_n, d_r, d_c = module.qk_nope_head_dim, module.qk_rope_head_dim, module.kv_lora_rank
    q = rearrange(module.q_proj(x), "b s (h e) -> b h s e", h=module.n_heads)
    q_nope, q_rope = q.split([d_n, d_r], dim=-1)
    latent, rope_key = module.kv_a_proj_with_mqa(x).split([d_c, d_r], dim=-1)  # (b, t, d_c), (b, t, d_R)
    k_nope = torch.einsum("btc,hdc->bhtd", latent, module.key_up_proj())  # (b, h, t, d_N)
    scores = torch.einsum("bhsd,bhtd->bhst", q_nope, k_nope)
    scores = scores + torch.einsum(
        "bhsr,btr->bhst", apply_rope(q_rope, positions, **rope), apply_rope(rope_key, positions, **rope)
    )
    return scores * module.softmax_scale


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def structured_gqa(n_kv: int = 2, group: int = 2, head_dim: int = 8, seed: int = 0) -> GroupedQueryAttention:
    """A GQA layer whose KV heads look alike (a shared part plus a smaller own part), as trained heads tend to,
    so that the PCAs have a spectrum to exploit."""
    generator = torch.Generator().manual_seed(seed)
    source = GroupedQueryAttention(D_MODEL, n_kv * group, n_kv, head_dim, rope_theta=100.0)

    def similar_heads(n: int) -> torch.Tensor:
        shared = torch.randn(head_dim, D_MODEL, generator=generator)
        own = torch.randn(n, head_dim, D_MODEL, generator=generator)
        return rearrange(shared + 0.3 * own, "h d i -> (h d) i") / math.sqrt(D_MODEL)

    with torch.no_grad():
        source.k_proj.weight.copy_(similar_heads(n_kv))
        source.v_proj.weight.copy_(similar_heads(n_kv))
        source.q_proj.weight.copy_(similar_heads(n_kv * group))
    return source


def hidden_states(batch: int, seq: int, seed: int) -> torch.Tensor:
    """Hidden states with a decaying spectrum (a few directions dominate, as in trained models): (b, s, D)."""
    generator = torch.Generator().manual_seed(seed)
    spectrum = torch.arange(1, D_MODEL + 1, dtype=torch.float32) ** -0.7
    return torch.randn(batch, seq, D_MODEL, generator=generator) * spectrum * 3


layouts = st.sampled_from(["rotate_half", "interleaved"])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


@given(n_kv=st.integers(1, 4), group=st.integers(1, 3), head_dim=st.sampled_from([2, 4, 8]), layout=layouts)
def test_rorope_keeps_scores_and_outputs_before_truncation(n_kv, group, head_dim, layout):
    torch.manual_seed(n_kv * 100 + group * 10 + head_dim)
    source = GroupedQueryAttention(D_MODEL, n_kv * group, n_kv, head_dim, rope_layout=layout, rope_theta=50.0)
    calibration, x = torch.randn(3, 10, D_MODEL), torch.randn(2, 7, D_MODEL)
    basis = rorope_basis(source, calibration)
    eye = torch.eye(n_kv, dtype=torch.float64).expand_as(basis.mixing)
    torch.testing.assert_close(basis.mixing.transpose(1, 2) @ basis.mixing, eye, atol=1e-10, rtol=0)  # U_j orthogonal
    converted = assemble_mla(rorope_parts(source, calibration, rope_dim=n_kv * head_dim, basis=basis), D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(mla_scores(converted, x), gqa_scores(source, x), **FP32)
        torch.testing.assert_close(converted(x), source(x), **FP32)
        torch.testing.assert_close(converted(x, path="absorbed"), source(x), **FP32)
    assert converted.cache_elements_per_token() == source.cache_elements_per_token()


def test_rorope_puts_the_key_energy_first_and_matches_a_per_frequency_pca():
    source, calibration = structured_gqa(n_kv=4, group=1), hidden_states(4, 16, seed=1)
    basis = rorope_basis(source, calibration, freqfold=1)
    # reference: for each frequency j, the a- and b-coordinates of every token as samples of an n_kv-vector
    x = calibration.reshape(-1, D_MODEL).double()
    pairs = rotary_pairs(source.k_proj.weight.double(), 4, 8, source.rope_layout)  # (n_kv, 4, 2, D)
    samples = rearrange(torch.einsum("gjei,ti->jteg", pairs, x), "j t e g -> j (t e) g")  # (4, 2T, n_kv)
    moment = samples.transpose(1, 2) @ samples / x.shape[0]  # (4, n_kv, n_kv)
    reference = torch.linalg.eigvalsh(moment).flip(-1)
    torch.testing.assert_close(basis.key_energy, reference, rtol=1e-10, atol=1e-10)
    # the rotated components' own energies are the eigenvalues, in descending order
    rotated = torch.einsum("jsg,jgc->jsc", samples, basis.mixing)
    torch.testing.assert_close(rotated.square().sum(1) / x.shape[0], reference, rtol=1e-8, atol=1e-10)
    assert (basis.key_energy[:, :-1] >= basis.key_energy[:, 1:]).all()
    assert (basis.key_energy[:, 0] / basis.key_energy.sum(-1) > 0.5).all()  # similar heads: one component leads


def test_freqfold_one_is_plain_rorope_and_folding_concentrates_energy():
    source, calibration, x = structured_gqa(n_kv=2), hidden_states(4, 16, seed=1), hidden_states(2, 12, seed=2)
    unfolded = rorope_basis(source, calibration, freqfold=1)
    with torch.no_grad():
        outputs = [
            assemble_mla(rorope_parts(source, calibration, rope_dim=4, fold_frequency=rule), D_MODEL)(x)
            for rule in ("mean", "first", "loading")
        ]
    for out in outputs[1:]:  # with F = 1 each component turns with its own frequency, whatever the rule
        torch.testing.assert_close(out, outputs[0], **FP32)
    # Ky Fan: a pool of F frequencies' top 2k components hold at least the top k of each frequency alone
    folded = rorope_basis(source, calibration, freqfold=2)
    for k in (1, 2):
        separate = rearrange(unfolded.key_energy[:, :k], "(G f) c -> G (f c)", f=2).sum(-1)
        assert (folded.key_energy[:, : 2 * k].sum(-1) >= separate - 1e-9).all()
    # folding mixes frequencies: even keeping every pair roped, the outputs change (an approximation)
    with torch.no_grad():
        full_fold = assemble_mla(rorope_parts(source, calibration, rope_dim=16, freqfold=2), D_MODEL)(x)
    assert relative_error(full_fold, source(x).detach()) > 1e-3


@given(n_kv=st.integers(1, 3), group=st.integers(1, 2), head_dim=st.sampled_from([4, 8]), layout=layouts)
def test_full_size_conversion_is_exact(n_kv, group, head_dim, layout):
    torch.manual_seed(n_kv * 10 + head_dim)
    source = GroupedQueryAttention(D_MODEL, n_kv * group, n_kv, head_dim, rope_layout=layout, rope_theta=50.0)
    calibration, x = torch.randn(2, 12, D_MODEL), torch.randn(2, 9, D_MODEL)
    full = n_kv * head_dim
    with torch.no_grad():
        expected = source(x)
        for metric in ("norm", "score"):
            converted = transmla_convert(source, calibration, kv_lora_rank=full, rope_dim=full, metric=metric)
            torch.testing.assert_close(converted(x), expected, **FP32)
            torch.testing.assert_close(converted(x, path="absorbed"), expected, **FP32)
        # below full RoPE the latent at full width still loses nothing beyond RoRoPE's own truncation
        rotated = rorope_parts(source, calibration, rope_dim=2)
        truncated = assemble_mla(rotated, D_MODEL)(x)
        width = rotated.latent_down.shape[0]
        for balance in (True, False):
            compressed = bkv_pca_parts(rotated, calibration, kv_lora_rank=width, balance=balance)
            torch.testing.assert_close(assemble_mla(compressed, D_MODEL)(x), truncated, **FP32)


def test_error_shrinks_as_the_latent_grows():
    source = structured_gqa(n_kv=2, group=2, head_dim=8)
    calibration, x = hidden_states(8, 16, seed=1), hidden_states(4, 16, seed=2)
    with torch.no_grad():
        expected = source(x)
        rotated = rorope_parts(source, calibration, rope_dim=8)
        errors = [
            relative_error(assemble_mla(bkv_pca_parts(rotated, calibration, kv_lora_rank=d_c), D_MODEL)(x), expected)
            for d_c in (2, 4, 8, 12, 16, 24)
        ]
        floor = relative_error(assemble_mla(rotated, D_MODEL)(x), expected)  # RoRoPE's truncation alone
    # nested principal subspaces: each larger latent reconstructs at least as well on held-out inputs
    # (1e-4 slack for the softmax's nonlinearity on near-equal errors)
    assert all(later <= earlier + 1e-4 for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 2 * errors[-1]  # the sweep spans a real range
    # d_c = d_N + n_kv·d_h is RoRoPE without compression (fp32 outputs, 1e-5 as above)
    torch.testing.assert_close(torch.tensor(errors[-1]), torch.tensor(floor), atol=1e-5, rtol=0)


def test_balancing_equalises_key_and_value_energy():
    source, calibration = structured_gqa(), hidden_states(4, 16, seed=1)
    with torch.no_grad():
        source.k_proj.weight.mul_(5.0)  # keys much larger than values, as the paper observes
        rotated = rorope_parts(source, calibration, rope_dim=4)
    d_nope = rotated.key_up.shape[1]
    latent = calibration.reshape(-1, D_MODEL) @ rotated.latent_down.T
    alpha = latent[:, d_nope:].norm() / latent[:, :d_nope].norm()
    metric = latent_metric(rotated, calibration, metric="norm", balance=True)
    torch.testing.assert_close(
        metric.diagonal()[:d_nope], torch.full((d_nope,), alpha.item() ** 2).double(), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        metric.diagonal()[d_nope:], torch.ones(latent.shape[1] - d_nope).double(), rtol=0, atol=0
    )
    x = hidden_states(2, 12, seed=2)
    with torch.no_grad():
        outputs = [
            assemble_mla(bkv_pca_parts(rotated, calibration, kv_lora_rank=6, balance=b), D_MODEL)(x)
            for b in (True, False)
        ]
    assert relative_error(outputs[0], outputs[1]) > 1e-3  # α ≈ 1/5 changes which directions the latent keeps


def test_query_fold_gives_the_same_scores_with_fewer_nope_dims():
    source, calibration, x = structured_gqa(n_kv=2), hidden_states(4, 16, seed=1), hidden_states(2, 10, seed=2)
    rotated = rorope_parts(source, calibration, rope_dim=4)  # d_N = 2·8 − 4 = 12 position-free key dims
    folded = assemble_mla(bkv_pca_parts(rotated, calibration, kv_lora_rank=5), D_MODEL)
    unfolded = assemble_mla(bkv_pca_parts(rotated, calibration, kv_lora_rank=5, fold_query=False), D_MODEL)
    assert (folded.qk_nope_head_dim, unfolded.qk_nope_head_dim) == (5, 12)  # d_N = min(12, d_c)
    wide = assemble_mla(bkv_pca_parts(rotated, calibration, kv_lora_rank=20), D_MODEL)
    assert wide.qk_nope_head_dim == 12  # nothing to fold when d_c ≥ d_N
    with torch.no_grad():
        torch.testing.assert_close(mla_scores(folded, x), mla_scores(unfolded, x), **FP32)
        torch.testing.assert_close(folded(x), unfolded(x), **FP32)


@given(
    budget=st.sampled_from(["uniform", "energy", "rotation"]),
    freqfold=st.sampled_from([1, 2]),
    rope_dim=st.sampled_from([0, 2, 4, 6, 10]),
    kv_lora_rank=st.integers(1, 12),
    batch=st.integers(1, 2),
    prompt=st.integers(1, 6),
    decode_steps=st.integers(0, 3),
)
def test_converted_module_is_a_plain_mla(budget, freqfold, rope_dim, kv_lora_rank, batch, prompt, decode_steps):
    source, calibration = structured_gqa(n_kv=2, group=2, head_dim=8), hidden_states(2, 12, seed=1)
    converted = transmla_convert(
        source, calibration, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, freqfold=freqfold, rope_budget=budget
    )
    assert isinstance(converted, MultiHeadLatentAttention) and not converted.latent_norm
    assert (converted.kv_lora_rank, converted.qk_rope_head_dim) == (kv_lora_rank, rope_dim)
    x = hidden_states(batch, prompt + decode_steps, seed=2)
    outputs = {}
    with torch.no_grad():
        for path in ("naive", "absorbed"):
            cache = converted.new_cache()
            steps = [converted(x[:, :prompt], cache, path=path)]
            steps += [converted(x[:, t : t + 1], cache, path=path) for t in range(prompt, x.shape[1])]
            outputs[path] = torch.cat(steps, dim=1)
            assert cache.nbytes == (kv_lora_rank + rope_dim) * batch * x.shape[1] * x.element_size()
    torch.testing.assert_close(outputs["absorbed"], outputs["naive"], **FP32)


def test_rope_budgets_spend_exactly_the_pairs_asked():
    source, calibration = structured_gqa(n_kv=2, head_dim=8), hidden_states(4, 16, seed=1)
    basis = rorope_basis(source, calibration)  # 4 frequencies × 2 components
    uniform = select_rope_components(basis, 6, "uniform")  # 3 pairs over 4 frequencies
    assert uniform.sum(-1).tolist() == [1, 1, 1, 0]  # the leftover pairs go to the highest frequencies
    assert select_rope_components(basis, 12, "uniform").sum(-1).tolist() == [2, 2, 1, 1]
    for budget in ("energy", "rotation"):
        assert select_rope_components(basis, 6, budget).sum().item() == 3
    # with frequency 0 a pair never turns: dropping its rotation costs nothing, "rotation" never keeps it
    still = GroupedQueryAttention(D_MODEL, 4, 2, 8, rope_frequencies=[1.0, 0.3, 0.1, 0.0])
    keep = select_rope_components(rorope_basis(still, calibration), 12, "rotation")
    assert keep[3].sum().item() == 0 and keep[:3].all()


def test_kept_pairs_carry_their_source_frequencies_and_the_source_is_untouched():
    source = GroupedQueryAttention(D_MODEL, 4, 2, 8, rope_frequencies=[0.9, 0.5, 0.2, 0.05])
    before = {k: v.clone() for k, v in source.state_dict().items()}
    calibration = hidden_states(2, 8, seed=1)
    parts = transmla_parts(source, calibration, kv_lora_rank=6, rope_dim=6)  # uniform: top pair of ω 0.9, 0.5, 0.2
    torch.testing.assert_close(torch.tensor(parts.rope_frequencies), torch.tensor([0.9, 0.5, 0.2]))
    folded = transmla_parts(source, calibration, kv_lora_rank=6, rope_dim=4, freqfold=2)  # one pair per group
    torch.testing.assert_close(torch.tensor(folded.rope_frequencies), torch.tensor([0.7, 0.125]))  # group means
    for name, value in source.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_bad_arguments_are_refused_with_a_reason():
    source, calibration = structured_gqa(n_kv=2, head_dim=8), hidden_states(2, 8, seed=1)
    convert = lambda **kw: transmla_convert(source, calibration, **{"kv_lora_rank": 8, "rope_dim": 4, **kw})  # noqa: E731
    with pytest.raises(ValueError, match="rope_dim must be even"):
        convert(rope_dim=3)
    with pytest.raises(ValueError, match=r"rope_dim must be at most n_kv · d_h = 16"):
        convert(rope_dim=18)
    with pytest.raises(ValueError, match="rope_dim must be a non-negative integer"):
        convert(rope_dim=-2)
    with pytest.raises(
        ValueError, match=r"exceeds the source's cache of 2·n_kv·d_h = 32 .* allowed kv_lora_rank: 1 … 28"
    ):
        convert(kv_lora_rank=29)
    with pytest.raises(ValueError, match="kv_lora_rank must be a positive integer"):
        convert(kv_lora_rank=0)
    with pytest.raises(
        ValueError, match=r"freqfold must divide the 4 rotary frequencies .* allowed: \[1, 2, 4\], got 3"
    ):
        convert(freqfold=3)
    with pytest.raises(ValueError, match="rope_budget must be one of 'uniform', 'energy', 'rotation'; got 'global'"):
        convert(rope_budget="global")
    with pytest.raises(ValueError, match="fold_frequency must be one of"):
        convert(fold_frequency="median")
    with pytest.raises(ValueError, match="metric must be one of 'norm', 'score'"):
        convert(metric="cosine")
    with pytest.raises(ValueError, match=r"shape \(b, s, d_model=24\) .* got \(2, 8, 16\)"):
        transmla_convert(source, torch.randn(2, 8, 16), kv_lora_rank=8)
    with pytest.raises(ValueError, match=r"got \(16, 24\)"):
        transmla_convert(source, torch.randn(16, D_MODEL), kv_lora_rank=8)
    with pytest.raises(ValueError, match=r"with b·s ≥ 1, got \(0, 8, 24\)"):
        transmla_convert(source, torch.randn(0, 8, D_MODEL), kv_lora_rank=8)
    with pytest.raises(ValueError, match="must be finite"):
        transmla_convert(source, torch.full((1, 4, D_MODEL), float("nan")), kv_lora_rank=8)
    with pytest.raises(ValueError, match="must be a tensor"):
        transmla_convert(source, [[0.0] * D_MODEL], kv_lora_rank=8)
    with pytest.raises(ValueError, match="qkv_bias=True"):
        transmla_convert(GroupedQueryAttention(D_MODEL, 4, 2, qkv_bias=True), calibration, kv_lora_rank=8)
    with pytest.raises(ValueError, match="source must be a mla_ref GroupedQueryAttention"):
        transmla_convert(torch.nn.Linear(D_MODEL, D_MODEL), calibration, kv_lora_rank=8)
    rotated = rorope_parts(source, calibration, rope_dim=4)
    with pytest.raises(ValueError, match=r"kv_lora_rank must be at most the latent's width .* = 28"):
        bkv_pca_parts(rotated, calibration, kv_lora_rank=29)
    with pytest.raises(ValueError, match="the latent must start with the 12 position-free key dims"):
        bkv_pca_parts(dataclasses.replace(rotated, key_up=rotated.key_up.roll(1, dims=-1)), calibration, kv_lora_rank=8)
    with pytest.raises(ValueError, match="computed with freqfold=1, but freqfold=2"):
        rorope_parts(source, calibration, rope_dim=4, freqfold=2, basis=rorope_basis(source, calibration))

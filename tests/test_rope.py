"""RoPE: the frequency table, both layouts, relative-position invariance, partial RoPE, errors."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mla_ref.rope import apply_rope, convert_layout, inverse_frequencies, pair_indices

LAYOUTS = ["rotate_half", "interleaved"]


def test_inverse_frequencies_match_the_formula():
    d, theta = 8, 500.0
    expected = torch.tensor([theta ** (-2 * j / d) for j in range(d // 2)])
    torch.testing.assert_close(inverse_frequencies(d, theta), expected)


def test_interleaved_layout_equals_complex_multiplication():
    # Pair j of the interleaved layout is the complex number x[2j] + i·x[2j+1], rotated by e^{i n ω_j}.
    torch.manual_seed(1)
    x = torch.randn(3, 5, 8)
    positions = torch.arange(5)
    angles = positions[:, None].float() * inverse_frequencies(8)[None, :]
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(3, 5, 4, 2)) * torch.polar(torch.ones(()), angles))
    torch.testing.assert_close(apply_rope(x, positions, layout="interleaved"), expected.reshape(3, 5, 8))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_position_zero_is_identity_and_norms_are_kept(layout):
    x = torch.randn(2, 4, 6, 16)
    out = apply_rope(x, torch.zeros(6, dtype=torch.long), layout=layout)
    torch.testing.assert_close(out, x)
    rotated = apply_rope(x, torch.arange(6) * 7, layout=layout)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


@given(
    half=st.integers(1, 8),
    m=st.integers(0, 200),
    n=st.integers(0, 200),
    shift=st.integers(-50, 300),
    layout=st.sampled_from(LAYOUTS),
)
def test_scores_depend_only_on_the_position_gap(half, m, n, shift, layout):
    # q R_m · k R_n = q R_{m+Δ} · k R_{n+Δ}: only n - m matters (fp32, angles up to ~500 rad → 1e-4).
    shift = max(shift, -min(m, n))
    torch.manual_seed(half)
    q, k = torch.randn(1, 2 * half), torch.randn(1, 2 * half)
    score = (apply_rope(q, torch.tensor([m]), layout=layout) * apply_rope(k, torch.tensor([n]), layout=layout)).sum()
    shifted = (
        apply_rope(q, torch.tensor([m + shift]), layout=layout)
        * apply_rope(k, torch.tensor([n + shift]), layout=layout)
    ).sum()
    torch.testing.assert_close(shifted, score, atol=1e-4, rtol=1e-4)


@given(half=st.integers(1, 8), t=st.integers(1, 9))
def test_layouts_are_the_same_rotation_up_to_a_permutation(half, t):
    torch.manual_seed(t)
    x = torch.randn(2, t, 2 * half)
    positions = torch.arange(t) * 3
    via_interleaved = apply_rope(convert_layout(x, "rotate_half", "interleaved"), positions, layout="interleaved")
    expected = convert_layout(apply_rope(x, positions, layout="rotate_half"), "rotate_half", "interleaved")
    torch.testing.assert_close(via_interleaved, expected)
    round_trip = convert_layout(convert_layout(x, "rotate_half", "interleaved"), "interleaved", "rotate_half")
    torch.testing.assert_close(round_trip, x)


def test_mixing_layouts_changes_the_result():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8)
    positions = torch.arange(4) + 1
    diff = (apply_rope(x, positions, layout="rotate_half") - apply_rope(x, positions, layout="interleaved")).abs()
    assert diff.max() > 0.1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_partial_rope_rotates_only_the_chosen_pairs(layout):
    torch.manual_seed(0)
    d = 12
    x = torch.randn(2, 5, d)
    positions = torch.arange(5) + 3
    kept = [0, 3, 5]
    out = apply_rope(x, positions, layout=layout, pairs=kept)
    full = apply_rope(x, positions, layout=layout)
    a_idx, b_idx = pair_indices(d, layout)
    for j in range(d // 2):
        cols = [a_idx[j].item(), b_idx[j].item()]
        reference = full if j in kept else x
        torch.testing.assert_close(out[..., cols], reference[..., cols])
    torch.testing.assert_close(apply_rope(x, positions, layout=layout, pairs=range(d // 2)), full)
    torch.testing.assert_close(apply_rope(x, positions, layout=layout, pairs=[]), x)


def test_bf16_input_keeps_its_dtype_and_is_close_to_fp32():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16)
    positions = torch.arange(7)
    out = apply_rope(x.bfloat16(), positions)
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: relative error ≈ 2^-8 ≈ 0.004 per element.
    torch.testing.assert_close(out.float(), apply_rope(x, positions), atol=2e-2, rtol=2e-2)


def test_custom_inverse_frequencies_are_used():
    x = torch.randn(1, 3, 4)
    positions = torch.arange(3)
    inv_freq = torch.tensor([math.pi / 2, 0.0])
    out = apply_rope(x, positions, inv_freq=inv_freq, layout="interleaved")
    # Position 1 turns pair 0 by 90°: (a, b) -> (-b, a); pair 1 has frequency 0 and stays.
    torch.testing.assert_close(out[0, 1, :2], torch.stack([-x[0, 1, 1], x[0, 1, 0]]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[0, :, 2:], x[0, :, 2:])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: inverse_frequencies(7), "rotary_dim must be even"),
        (lambda: inverse_frequencies(0), "rotary_dim must be a positive integer"),
        (lambda: inverse_frequencies(8, theta=0.0), "theta must be positive"),
        (lambda: apply_rope(torch.randn(2, 5), torch.arange(2)), "must be even"),
        (lambda: apply_rope(torch.randn(2, 4), torch.arange(3)), r"positions must have shape \(t,\) = \(2,\)"),
        (lambda: apply_rope(torch.randn(2, 4), torch.arange(2), layout="neox"), "layout must be one of"),
        (lambda: apply_rope(torch.randn(2, 4), torch.arange(2), pairs=[2]), r"pairs must lie in \[0, 2\)"),
        (lambda: apply_rope(torch.randn(2, 4), torch.arange(2), inv_freq=torch.ones(3)), "inv_freq must have shape"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_frequency_tables_are_checked():
    from mla_ref.rope import frequency_table

    assert frequency_table(None, 8) is None
    assert frequency_table([1, 0.5, 0.25, 0], 8) == (1.0, 0.5, 0.25, 0.0)
    with pytest.raises(ValueError, match=r"one frequency per rotary pair \(4\), got 3"):
        frequency_table([1, 2, 3], 8)
    with pytest.raises(ValueError, match="finite and non-negative"):
        frequency_table([1, -1, 0, 0], 8)

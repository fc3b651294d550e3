"""Checks of lesson 08's exercises (notebooks/08_mha2mla_partial_rope_and_svd.ipynb): which rotary pairs can lose
RoPE, SVD_split, how small a latent can be.

The checks that ask about the MHA teacher repeat the lesson's setup (``_layer_zero``: the shipped teacher's first
attention layer and the hidden states that enter it on the lesson's 16 calibration windows of 128 training bytes)
and compute the truth from the package's conversion functions.
"""

from __future__ import annotations

import functools

import torch

from mla_ref import GroupedQueryAttention, checkpoint
from mla_ref.convert import assemble_mla, partial_rope_parts, select_rotary_pairs, svd_low_rank_parts
from mla_ref.data import load_corpus
from mla_ref.exercises import exercise
from mla_ref.measures import relative_error
from mla_ref.rope import inverse_frequencies
from mla_ref.train import TEACHERS_DIR


@functools.cache
def _layer_zero() -> tuple[GroupedQueryAttention, torch.Tensor, torch.Tensor]:
    """The MHA teacher's first attention layer, its calibration inputs (16, 128, d) and its output on them."""
    teacher = checkpoint.load(TEACHERS_DIR / "mha")
    corpus = load_corpus()
    starts = torch.randint(0, corpus.train.numel() - 128, (16,), generator=torch.Generator().manual_seed(0))
    tokens = corpus.train[starts[:, None] + torch.arange(128)].long()  # the lesson's calibration windows
    source = teacher.layers[0].self_attn
    inputs = teacher.attention_inputs(tokens)[0]
    with torch.no_grad():
        return source, inputs, source(inputs)


@torch.no_grad()
def _error(parts) -> float:
    """Relative output error of the MLA built from ``parts`` against layer 0, on its calibration inputs."""
    source, inputs, expected = _layer_zero()
    return relative_error(assemble_mla(parts, source.d_model)(inputs), expected)


def _require_int(answer, what: str) -> int:
    assert isinstance(answer, int) and not isinstance(answer, bool), f"the answer is {what} (an int), got {answer!r}"
    return answer


@exercise("08.1")
def slow_pairs_that_can_lose_rope(answer) -> str:
    """The most slowest pairs whose rotation layer 0 can drop (S_high, r = 16 − k) with its output error below 0.05."""
    source, _, _ = _layer_zero()
    half = source.head_dim // 2
    k = _require_int(answer, f"a number of pairs in [0, {half}]")
    assert 0 <= k <= half, f"k must lie in [0, {half}], got {k}"

    def error(dropped):  # the 16 − dropped fastest pairs keep RoPE, the `dropped` slowest lose it
        return _error(partial_rope_parts(source, select_rotary_pairs(source, half - dropped, "high")))

    at_k = error(k)
    assert at_k < 0.05, f"dropping the rotation of the {k} slowest pairs gives an output error of {at_k:.3f}"
    if k < half:
        one_more = error(k + 1)
        assert one_more >= 0.05, f"the {k + 1} slowest pairs can lose it too (output error {one_more:.4f})"
    return f"layer 0 stays below 0.05 with the {k} slowest pairs position-free, and not with one more"


@exercise("08.2")
def pairs_that_turn(answer) -> str:
    """(r, m): the smallest r at which S_high keeps every pair turning by > 1 rad in a 128-byte window; m of those
    that S_low keeps at that r."""
    assert isinstance(answer, tuple) and len(answer) == 2, f"the answer is a pair (r, m), got {answer!r}"
    r, low_keeps = (_require_int(value, "a count") for value in answer)
    source, _, _ = _layer_zero()
    if source.rope_frequencies is not None:
        omega = torch.tensor(source.rope_frequencies, dtype=torch.float64)
    else:
        omega = inverse_frequencies(source.head_dim, source.rope_theta).double()  # ω_j, (d_h/2,)
    turning = (127 * omega > 1).nonzero().flatten()  # pairs that turn by more than a radian over gaps ≤ 127
    half = source.head_dim // 2
    smallest = next(
        r for r in range(half + 1) if select_rotary_pairs(source, r, "high")[0, turning].all()
    )  # the same pairs in every head
    assert r == smallest, f"S_high keeps every turning pair from r = {smallest}" + (
        " (at your r it misses some)" if r < smallest else ", fewer than your r"
    )
    truth = int(select_rotary_pairs(source, r, "low")[0, turning].sum())
    assert low_keeps == truth, f"at r = {r}, S_low keeps {truth} of the turning pairs, not {low_keeps}"
    return f"r = {r} covers the {len(turning)} turning pairs with S_high; S_low keeps {truth} of them at that r"


@exercise("08.3")
def svd_split_by_hand(answer) -> str:
    """``answer(W, key_rows, d_c)`` -> [W_K^N, W_V] rebuilt by SVD_split (rank d_c/2 each), (d, n) like W."""
    assert callable(answer), f"the answer is a function (W, key_rows, d_c) -> rebuilt W, got {type(answer).__name__}"
    with torch.random.fork_rng(devices=[]):  # a layer of its own, leaving the caller's random state alone
        torch.manual_seed(7)
        layer = GroupedQueryAttention(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16)
    full = partial_rope_parts(layer, select_rotary_pairs(layer, 2, "high"))  # full rank: W is (64, 2·12 + 2·16)
    key_rows = full.latent_down.shape[0] - layer.n_kv_heads * layer.head_dim  # the nope-key columns come first
    weight = full.latent_down.double().T  # W = [W_K^N, W_V]: (d, n)
    n_kv = layer.n_kv_heads
    for rank in (16, 24):
        split = svd_low_rank_parts(full, rank, method="split", key_rows=key_rows)
        up = torch.cat([*(split.key_up[u * 2] for u in range(n_kv)), *(split.value_up[u * 2] for u in range(n_kv))])
        truth = (up @ split.latent_down).double().T  # the package's rebuilt W: (d, n)
        rebuilt = answer(weight.clone(), key_rows, rank)
        assert isinstance(rebuilt, torch.Tensor) and rebuilt.shape == weight.shape, (
            f"the function must return a tensor shaped like W, {tuple(weight.shape)}"
        )
        error = relative_error(rebuilt.double(), truth)
        if error > 1e-5:  # fp32 maps against fp64: ~1e-7
            joint = svd_low_rank_parts(full, rank, method="joint")
            up_joint = torch.cat(
                [*(joint.key_up[u * 2] for u in range(n_kv)), *(joint.value_up[u * 2] for u in range(n_kv))]
            )
            is_joint = relative_error(rebuilt.double(), (up_joint @ joint.latent_down).double().T) < 1e-5
            raise AssertionError(
                f"at d_c = {rank} the rebuilt weights are off by a relative error {error:.2g}"
                + (": that is the joint SVD; split factorises W_K^N and W_V separately" if is_joint else "")
            )
    return "your SVD_split rebuilds the same W as svd_low_rank_parts(method='split') at d_c = 16 and 24"


@exercise("08.4")
def smallest_latent_under_a_bound(answer) -> str:
    """The smallest d_c (a multiple of 16) with layer 0's output error ≤ 0.15 at r = 8 (S_2-norm, SVD_joint)."""
    d_c = _require_int(answer, "a latent size d_c")
    source, inputs, _ = _layer_zero()
    full = partial_rope_parts(source, select_rotary_pairs(source, 8, "2-norm", calibration_inputs=inputs))
    widest = full.latent_down.shape[0]
    assert d_c % 16 == 0 and 16 <= d_c <= widest, f"d_c must be a multiple of 16 in [16, {widest}], got {d_c}"
    at_d_c = _error(svd_low_rank_parts(full, d_c))
    assert at_d_c <= 0.15, f"at d_c = {d_c} layer 0's output error is {at_d_c:.3f}, above 0.15"
    if d_c == 16:
        return "d_c = 16, the smallest size tried, keeps layer 0's output error within 0.15"
    smaller = _error(svd_low_rank_parts(full, d_c - 16))
    assert smaller > 0.15, f"d_c = {d_c - 16} already keeps the error at {smaller:.3f}"
    return f"d_c = {d_c} keeps layer 0's output error within 0.15, and d_c = {d_c - 16} does not"

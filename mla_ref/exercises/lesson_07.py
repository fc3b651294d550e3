"""Checks of lesson 07's exercises (notebooks/07_gqa_is_a_special_mla.ipynb): PCA, RoRoPE, BKV-PCA, the split of
a cache budget.

The checks that ask about the GQA teacher repeat the lesson's setup (``_lesson``: the shipped teacher, 16
calibration windows of 128 training bytes drawn with seed 0, the first 512 validation bytes held out) and compute
the truth from the package's conversion functions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mla_ref import checkpoint
from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert import (
    bkv_pca_parts,
    key_value_balance,
    rorope_basis,
    rorope_parts,
    select_rope_components,
    transmla_convert,
)
from mla_ref.data import load_corpus, random_batch, validation_windows
from mla_ref.exercises import exercise
from mla_ref.measures import relative_error
from mla_ref.rope import apply_rope
from mla_ref.train import TEACHERS_DIR


@dataclass
class _Lesson:
    layers: list[GroupedQueryAttention]  # the teacher's attention layers
    calibration: list[torch.Tensor]  # per layer: (16, 128, d), the hidden states entering it on calibration text
    held_out: list[torch.Tensor]  # per layer: (4, 128, d), on the first 512 validation bytes
    targets: list[torch.Tensor]  # per layer: its output on held_out


@functools.cache
def _lesson() -> _Lesson:
    """Lesson 07's teacher and data, as its section 3 builds them."""
    teacher = checkpoint.load(TEACHERS_DIR / "gqa")
    corpus = load_corpus()
    calibration_tokens, _ = random_batch(corpus.train, 16, 128, torch.Generator().manual_seed(0))
    held_out_tokens = validation_windows(corpus.val, 128, 512)[:, :-1]
    layers = [layer.self_attn for layer in teacher.layers]
    held_out = teacher.attention_inputs(held_out_tokens)
    with torch.no_grad():
        targets = [attention(h) for attention, h in zip(layers, held_out, strict=True)]
    return _Lesson(layers, teacher.attention_inputs(calibration_tokens), held_out, targets)


def _correlated_samples(seed: int, n: int, p: int, decay: float) -> torch.Tensor:
    """n centred fp64 samples of a p-vector whose principal variances fall by ``decay`` decades: (n, p)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(p, p, generator=generator, dtype=torch.float64)
    mixing = mixing * torch.logspace(0, -decay, p, dtype=torch.float64)[:, None]
    x = torch.randn(n, p, generator=generator, dtype=torch.float64) @ mixing
    return x - x.mean(dim=0)


@exercise("07.1")
def directions_for_a_share(answer) -> str:
    """``answer(eigenvalues, kept)`` -> the smallest k whose top-k principal directions keep ``kept`` of E‖x‖²."""
    assert callable(answer), f"the answer is a function (eigenvalues, kept) -> k, got {type(answer).__name__}"
    tried = 0
    for seed, p, decay in ((0, 8, 1.5), (1, 12, 3.0), (2, 6, 0.5)):
        x = _correlated_samples(seed, 4096, p, decay)
        eigenvalues = torch.linalg.eigvalsh(x.T @ x / x.shape[0]).flip(0)  # descending
        directions = torch.linalg.svd(x, full_matrices=False).Vh  # rows: the principal directions, by the SVD
        total = x.pow(2).sum()

        def left(k, x=x, directions=directions, total=total):  # share of ‖X‖² the top k directions leave out
            top = directions[:k].T  # (p, k)
            return ((x - x @ top @ top.T).pow(2).sum() / total).item()

        for kept in (0.5, 0.9, 0.99):
            k = answer(eigenvalues.clone(), kept)
            assert isinstance(k, int) and not isinstance(k, bool), f"k must be an int, got {type(k).__name__}"
            assert 0 <= k <= p, f"k must lie in [0, {p}] for {p}-vectors, got {k}"
            assert left(k) <= 1 - kept, (
                f"keeping {k} directions leaves {left(k):.3f} of ‖X‖² out, more than 1 − {kept} (p = {p})"
            )
            assert k == 0 or left(k - 1) > 1 - kept, (
                f"{k - 1} directions already keep {kept} (they leave {left(k - 1):.3f} out): k = {k} is not the "
                f"smallest (p = {p})"
            )
            tried += 1
    return f"the smallest k, measured by projecting the samples: {tried} cases (3 data sets, shares 0.5, 0.9, 0.99)"


@exercise("07.2")
def entries_that_survive_two_mixings(answer) -> str:
    """The (m, n) entries of a (16, 16) score matrix unchanged when coordinate a is mixed by U and b by U flipped."""
    mask = torch.as_tensor(answer)
    assert mask.dtype == torch.bool and tuple(mask.shape) == (16, 16), (
        f"the answer is a (16, 16) bool mask of the (m, n) entries that survive, got {mask.dtype} {tuple(mask.shape)}"
    )
    generator = torch.Generator().manual_seed(6)
    keys = torch.randn(2, 16, 2, generator=generator)  # pair j of 2 KV heads at positions 0 … 15: (n_kv, t, 2)
    query = torch.randn(16, 2, generator=generator)  # pair j of one query head reading KV head 0: (t, 2)
    mixing = torch.linalg.qr(torch.randn(2, 2, generator=generator)).Q  # an orthogonal U_j
    swapped = mixing.flip(1)  # orthogonal too, but another matrix
    positions = torch.arange(16)
    rope = dict(inv_freq=torch.tensor([1.0]), layout="rotate_half")  # one pair turning with ω = 1

    def mix(pairs, left, right):  # coordinate a mixed by `left`, b by `right`: (n_kv, t, 2) -> (n_kv, t, 2)
        return torch.stack([left.T @ pairs[..., 0], right.T @ pairs[..., 1]], dim=-1)

    source = apply_rope(query, positions, **rope) @ apply_rope(keys[0], positions, **rope).T  # (t, t)
    broken_query = torch.stack([mixing[0][:, None] * query[None, :, 0], swapped[0][:, None] * query[None, :, 1]], -1)
    broken = torch.einsum(
        "cse,cte->st",
        apply_rope(broken_query, positions, **rope),
        apply_rope(mix(keys, mixing, swapped), positions, **rope),
    )
    survives = (broken - source).abs() <= 1e-4 * (1 + source.abs())  # fp32 rounding only
    extra = (mask & ~survives).nonzero().tolist()
    missed = (survives & ~mask).nonzero().tolist()
    assert not extra, f"entry (m, n) = {tuple(extra[0])} changes, but your mask says it survives"
    assert not missed, f"entry (m, n) = {tuple(missed[0])} survives, but your mask says it changes"
    return f"exactly the entries m = n survive ({int(survives.sum())} of 256), on keys and queries of its own"


@exercise("07.3")
def frequencies_kept_roped(answer) -> str:
    """The rotary frequencies j that keep a roped component in layer 2 at d_R = 16 under the rotation budget."""
    try:
        claimed = {int(j) for j in answer}
    except TypeError:
        raise AssertionError(f"the answer is a collection of frequencies j, got {type(answer).__name__}") from None
    lesson = _lesson()
    basis = rorope_basis(lesson.layers[2], lesson.calibration[2])
    kept = select_rope_components(basis, 16, "rotation")  # (d_h/2, n_kv)
    truth = set(kept.any(-1).nonzero().flatten().tolist())
    missing, extra = sorted(truth - claimed), sorted(claimed - truth)
    assert not extra, (
        f"frequency j = {extra[0]} keeps no roped component: what it could add (energy × (1 − cos Δω)) ranks too low"
    )
    assert not missing, f"frequency j = {missing[0]} keeps a roped component too"
    return f"layer 2 keeps RoPE on frequencies {sorted(truth)} at d_R = 16 (select_rope_components)"


@exercise("07.4")
def latent_share_from_eigenvalues(answer) -> str:
    """The share of E‖z‖² (z = c S, balanced) that BKV-PCA's d_c = 32 latent keeps in layer 0 (d_R = 32, rotation)."""
    assert isinstance(answer, (int, float)) and not isinstance(answer, bool), (
        f"the answer is a number (a share between 0 and 1), got {type(answer).__name__}"
    )
    lesson = _lesson()
    layer, calibration = lesson.layers[0], lesson.calibration[0]
    rotated = rorope_parts(layer, calibration, rope_dim=32, rope_budget="rotation")
    compressed = bkv_pca_parts(rotated, calibration, kv_lora_rank=32, fold_query=False)
    d_nope, n_kv, g = rotated.key_up.shape[1], layer.n_kv_heads, layer.group_size
    with torch.no_grad():
        x = calibration.flatten(0, 1).double()  # (T, d)
        latent = x @ rotated.latent_down.double().T  # c = [k^N, v]: (T, d_N + n_kv·d_h)
        up = torch.cat([compressed.key_up[0], *(compressed.value_up[u * g] for u in range(n_kv))]).double()
        rebuilt = x @ compressed.latent_down.double().T @ up.T  # ĉ from the package's maps
        scale = torch.ones(latent.shape[1], dtype=torch.float64)
        scale[:d_nope] = key_value_balance(rotated, calibration)  # S = diag(α·1_{d_N}, 1)
        kept = 1 - (((latent - rebuilt) * scale).pow(2).sum() / (latent * scale).pow(2).sum()).item()
    # the package's maps are fp32: the share it keeps is within ~1e-6 of the eigenvalues' prediction
    assert abs(answer - kept) < 1e-4, f"bkv_pca_parts' latent of 32 keeps {kept:.4f} of E‖z‖², not {answer:.4f}"
    return "bkv_pca_parts' 32-wide latent keeps that share of E‖z‖², measured on the calibration tokens"


@functools.cache
def _quarter_errors() -> dict[int, float]:
    """Mean relative output error over the four layers on the held-out states, for d_R = 8, 16, 24 and
    d_c = 32 − d_R (``transmla_convert`` with the rotation budget and the score metric)."""
    lesson = _lesson()
    measured = {}
    with torch.no_grad():
        for rope_dim in (8, 16, 24):
            per_layer = [
                relative_error(
                    transmla_convert(
                        layer,
                        calibration,
                        kv_lora_rank=32 - rope_dim,
                        rope_dim=rope_dim,
                        rope_budget="rotation",
                        metric="score",
                    )(held_out),
                    target,
                )
                for layer, calibration, held_out, target in zip(
                    lesson.layers, lesson.calibration, lesson.held_out, lesson.targets, strict=True
                )
            ]
            measured[rope_dim] = sum(per_layer) / len(per_layer)
    return measured


@exercise("07.5")
def rope_dim_for_a_quarter(answer) -> str:
    """Which d_R of {8, 16, 24} a 32-element budget (d_c = 32 − d_R) should spend, defended by the measured errors."""
    assert isinstance(answer, dict) and {"rope_dim", "errors"} <= set(answer), (
        "the answer is a dict: {'rope_dim': your d_R, 'errors': {8: e, 16: e, 24: e}}, the mean held-out errors"
    )
    errors = answer["errors"]
    assert isinstance(errors, dict) and set(errors) == {8, 16, 24}, (
        f"'errors' must give the mean error at each of d_R = 8, 16, 24, got {errors!r}"
    )
    measured = _quarter_errors()
    for rope_dim, error in measured.items():
        assert abs(errors[rope_dim] - error) < 1e-3, (
            f"at d_R = {rope_dim} the mean held-out error is {error:.3f}, not {errors[rope_dim]:.3f}"
        )
    best = min(measured, key=measured.get)
    assert answer["rope_dim"] == best, (
        f"d_R = {answer['rope_dim']} is not the best split: d_R = {best} gives {measured[best]:.3f}"
    )
    return f"d_R = {best} gives the lowest mean held-out error of the three splits, as measured"

"""The checks of lessons 06-08's exercises: a right answer passes, a plausible wrong one is refused with its reason,
and the placeholder None is reported as not answered yet."""

import pytest
import torch

from mla_ref.convert import key_value_balance, rorope_basis, rorope_parts, select_rope_components, transmla_convert
from mla_ref.exercises import check_exercise
from mla_ref.exercises.lesson_07 import _lesson
from mla_ref.measures import relative_error
from mla_ref.rope import apply_rope

EXERCISES = ("06.1", "06.2", "07.1", "07.2", "07.3", "07.4", "07.5", "08.1", "08.2", "08.3", "08.4")


@pytest.mark.parametrize("key", EXERCISES)
def test_none_is_not_answered_yet(key, capsys):
    assert check_exercise(key, None) is False
    assert f"exercise {key}: not answered yet" in capsys.readouterr().out


def refused(key, answer, reason):
    with pytest.raises(AssertionError, match=reason):
        check_exercise(key, answer)


def rotation(position, dim):  # R_p, so that RoPE_p(u) = u R_p
    return apply_rope(torch.eye(dim), torch.full((dim,), position))


def test_05_1_absorbed_matrix():
    assert check_exercise("06.1", lambda w_uk, gap: rotation(gap, w_uk.shape[1]) @ w_uk.T)
    refused("06.1", lambda w_uk, gap: w_uk.T, "gap 1.*must depend on the gap")  # lesson 04's A_0 at every gap
    refused("06.1", lambda w_uk, gap: rotation(-gap, w_uk.shape[1]) @ w_uk.T, "gap 1")  # turned the wrong way
    refused("06.1", lambda w_uk, gap: w_uk, "shape")


def test_05_2_rows_that_stay_right():
    assert check_exercise("06.2", [0])
    refused("06.2", [], "row 0 stays right")
    refused("06.2", [0, 1], "row 1 changes")


def smallest_k(eigenvalues, kept):
    return int((eigenvalues.cumsum(0) / eigenvalues.sum() < kept).sum()) + 1


def test_06_1_directions_for_a_share():
    assert check_exercise("07.1", smallest_k)
    refused("07.1", lambda eigenvalues, kept: smallest_k(eigenvalues, kept) - 1, "leaves")  # one short
    refused("07.1", lambda eigenvalues, kept: smallest_k(eigenvalues, kept) + 1, "not the smallest")


def test_06_2_diagonal_survives():
    assert check_exercise("07.2", torch.eye(16, dtype=torch.bool))
    refused("07.2", torch.ones(16, 16, dtype=torch.bool), "changes")
    refused("07.2", torch.zeros(16, 16, dtype=torch.bool), "survives")


def test_06_3_frequencies_kept():
    lesson = _lesson()
    kept = select_rope_components(rorope_basis(lesson.layers[2], lesson.calibration[2]), 16, "rotation")
    right = kept.any(-1).nonzero().flatten().tolist()
    assert check_exercise("07.3", right)
    refused("07.3", range(8), "keeps no roped component")  # the uniform budget's eight highest
    refused("07.3", right[1:], "keeps a roped component too")


def test_06_4_latent_share():
    lesson = _lesson()
    # the prediction from the eigenvalues of E[zᵀz], as the lesson computes it
    parts = rorope_parts(lesson.layers[0], lesson.calibration[0], rope_dim=32, rope_budget="rotation")
    x = lesson.calibration[0].flatten(0, 1).double()
    latent = x @ parts.latent_down.double().T
    d_nope = parts.key_up.shape[1]
    z = latent.clone()
    z[:, :d_nope] *= key_value_balance(parts, lesson.calibration[0])
    eigenvalues = torch.linalg.eigvalsh(z.T @ z / z.shape[0]).flip(0)
    predicted = (eigenvalues[:32].sum() / eigenvalues.sum()).item()
    assert check_exercise("07.4", predicted)
    unbalanced = torch.linalg.eigvalsh(latent.T @ latent).flip(0)
    refused("07.4", (unbalanced[:32].sum() / unbalanced.sum()).item(), "keeps")  # without the balance
    refused("07.4", 32 / 96, "keeps")  # the share of the coordinates, not of the energy


def test_06_5_rope_dim_for_a_quarter():
    lesson = _lesson()
    errors = {}
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
            errors[rope_dim] = sum(per_layer) / len(per_layer)
    best = min(errors, key=errors.get)
    assert check_exercise("07.5", {"rope_dim": best, "errors": errors})
    worst = max(errors, key=errors.get)
    refused("07.5", {"rope_dim": worst, "errors": errors}, "not the best split")
    refused("07.5", {"rope_dim": best, "errors": {**errors, best: errors[best] - 0.1}}, "mean held-out error is")
    refused("07.5", {"rope_dim": best}, "dict")


def test_07_1_slow_pairs():
    assert check_exercise("08.1", 8)
    refused("08.1", 9, "output error of")  # one too many: pair 7 turns by more than 2 rad
    refused("08.1", 4, "can lose it too")


def test_07_2_turning_pairs():
    assert check_exercise("08.2", (9, 2))
    refused("08.2", (8, 1), "from r = 9")
    refused("08.2", (9, 9), "keeps 2")
    refused("08.2", 9, "pair")


def split_by_hand(weight, key_rows, d_c):
    def truncate(block, rank):
        top = torch.linalg.svd(block, full_matrices=False).Vh[:rank].T
        return block @ top @ top.T

    return torch.cat([truncate(weight[:, :key_rows], d_c // 2), truncate(weight[:, key_rows:], d_c // 2)], dim=1)


def test_07_3_svd_split():
    state = torch.random.get_rng_state()
    assert check_exercise("08.3", split_by_hand)
    assert torch.equal(torch.random.get_rng_state(), state)  # the check leaves the caller's random state alone

    def joint(weight, key_rows, d_c):
        top = torch.linalg.svd(weight, full_matrices=False).Vh[:d_c].T
        return weight @ top @ top.T

    refused("08.3", joint, "that is the joint SVD")
    refused("08.3", lambda weight, key_rows, d_c: split_by_hand(weight, key_rows, d_c)[:, 1:], "shaped like W")


def test_07_4_smallest_latent():
    assert check_exercise("08.4", 64)
    refused("08.4", 48, "above 0.15")
    refused("08.4", 80, "already keeps")
    refused("08.4", 70, "multiple of 16")

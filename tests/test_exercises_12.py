"""Lesson 12's exercise checks: a right answer passes, a plausible wrong one is refused with its reason."""

import pytest

from mla_ref.calculator import elements_per_token_per_layer
from mla_ref.exercises import check_exercise, lesson_12
from mla_ref.model_shapes import load_model_shape
from mla_ref.recovery import budget_steps, pretraining_tokens
from mla_ref.train import TEACHERS_DIR

needs_mla_teacher = pytest.mark.skipif(
    not (TEACHERS_DIR / "mla" / "model.safetensors").is_file(), reason="the MLA teacher is not in mla_ref/teachers"
)


def _cache(name):
    return elements_per_token_per_layer(load_model_shape(TEACHERS_DIR / name))


@pytest.mark.parametrize("key", ["12.1", "12.2", "12.3"])
def test_none_is_not_answered_yet(key, capsys):
    assert check_exercise(key, None) is False
    assert "not answered yet" in capsys.readouterr().out


def test_12_1_right(capsys):
    assert check_exercise("12.1", (48 + 16) / _cache("mha"))
    assert "right" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("wrong", "reason"),
    [
        (lambda: (48 + 16) / _cache("gqa"), "GQA teacher's cache"),
        (lambda: 48 / _cache("mha"), "count d_R"),
        (lambda: 100 * (48 + 16) / _cache("mha"), "percentage"),
        (lambda: _cache("mha") / (48 + 16), "times smaller"),
        (lambda: 0.3, "is not"),
        (lambda: "0.125", "a number"),
    ],
)
def test_12_1_wrong(wrong, reason):
    with pytest.raises(AssertionError, match=reason):
        check_exercise("12.1", wrong())


@pytest.mark.parametrize(
    ("ratios", "right", "wrong", "reason"),
    [
        ({48: 1.5, 112: 1.4}, "neither", 112, "whole cache"),
        ({48: 1.5, 112: 1.4}, "neither", 48, "more than 1.05"),
        ({48: 1.5, 112: 1.01}, 112, 48, "more than 1.05"),
        ({48: 1.5, 112: 1.01}, 112, "neither", "already comes within"),
        ({48: 1.02, 112: 1.0}, 48, 112, "smaller latent"),
    ],
)
def test_12_2_decides_from_the_measured_ratios(monkeypatch, ratios, right, wrong, reason):
    monkeypatch.setattr(lesson_12, "_conversion_ratios", lambda: ratios)
    assert check_exercise("12.2", right)
    with pytest.raises(AssertionError, match=reason):
        check_exercise("12.2", wrong)


@pytest.mark.parametrize("answer", [64, "48", True, 0.5])
def test_12_2_refuses_an_answer_outside_the_choices(answer):
    with pytest.raises(AssertionError, match="answer one of"):
        check_exercise("12.2", answer)


@needs_mla_teacher
def test_12_2_measured(one_thread):
    ratios = lesson_12._conversion_ratios()  # converts and measures, as the check does
    assert set(ratios) == {48, 112} and all(ratio > 0 for ratio in ratios.values())
    matching = [latent for latent, ratio in ratios.items() if ratio <= lesson_12.MATCH]
    right = matching[0] if matching else "neither"
    assert check_exercise("12.2", right)
    wrong = 112 if right == "neither" else "neither"
    with pytest.raises(AssertionError, match="12.2"):
        check_exercise("12.2", wrong)


def test_12_3_right(capsys):
    steps = budget_steps(0.02, pretraining_tokens(TEACHERS_DIR / "gqa"), batch_size=8, seq_len=128)
    assert check_exercise("12.3", steps)
    assert f"{steps} steps" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("wrong", "reason"),
    [
        (lambda tokens: tokens * 0.02 // (4 * 128), "batch 4"),
        (lambda tokens: tokens * 0.02, "in tokens"),
        (lambda tokens: tokens * 0.02 // (8 * 128) + 1, "more than 2%"),
        (lambda tokens: 7.5, "is not"),
    ],
)
def test_12_3_wrong(wrong, reason):
    with pytest.raises(AssertionError, match=reason):
        check_exercise("12.3", wrong(pretraining_tokens(TEACHERS_DIR / "gqa")))

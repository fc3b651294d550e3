"""Lesson 11's exercise checks: a right answer passes, a plausible wrong one is refused with its reason."""

import pytest

from mla_ref.exercises import check_exercise, lesson_11
from mla_ref.pipelines.fetch import default_fetch_problem

needs_smollm2 = pytest.mark.skipif(
    default_fetch_problem("smollm2-135m") is not None, reason="SmolLM2 is not fetched: run `make models`"
)

SOURCE_BYTES = 384 * 30 * 4 * 1000  # 2 · n_kv · d_h = 384 elements, 30 layers, fp32, 1,000 tokens


@pytest.mark.parametrize("key", ["11.1", "11.2", "11.3"])
def test_none_is_not_answered_yet(key, capsys):
    assert check_exercise(key, None) is False
    assert "not answered yet" in capsys.readouterr().out


def test_11_1_right(capsys):
    assert check_exercise("11.1", 96 * 30 * 4 * 1000)  # a quarter of 384, with the anchor, over 30 layers
    assert "11,520,000 B" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("wrong", "reason"),
    [
        (SOURCE_BYTES, "source's GQA cache"),
        (96 * 30 * 2 * 1000, "bf16"),
        (96 * 4 * 1000, "one layer"),
        (95 * 30 * 4 * 1000, "anchor"),
        (SOURCE_BYTES // 3, "is not what the caches hold"),
        (11.52e6, "whole number"),
    ],
)
def test_11_1_wrong(wrong, reason):
    with pytest.raises(AssertionError, match=reason):
        check_exercise("11.1", wrong)


@needs_smollm2
def test_11_2_right_and_wrong(capsys):
    ratios, shares, uniform = lesson_11.sink_measures()
    truth = [i for i in range(len(ratios)) if ratios[i] > 2.5 and shares[i] > 8 * uniform]
    assert set(range(12, 29)) <= set(truth)  # the lesson's sink layers are sinks in these windows too
    assert check_exercise("11.2", truth)
    assert "right" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="are sinks here too"):
        check_exercise("11.2", truth[1:])
    with pytest.raises(AssertionError, match="not sinks in these windows: layer 0"):
        check_exercise("11.2", [0, *truth])
    with pytest.raises(AssertionError, match="list of ints"):
        check_exercise("11.2", "12-28")


@needs_smollm2
def test_11_3_right_and_wrong():
    errors = lesson_11.split_errors()
    assert sorted(errors) == [16, 24]  # the recipe's two candidates at an eighth of the cache: B/3 and B/2
    best, other = sorted(errors, key=errors.get)
    assert check_exercise("11.3", best)
    with pytest.raises(AssertionError, match="the other split loses less"):
        check_exercise("11.3", other)
    with pytest.raises(AssertionError, match="candidates at 12.5%"):
        check_exercise("11.3", 32)

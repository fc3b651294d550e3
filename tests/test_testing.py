import pytest
import torch

from mla_ref.testing import check_close, check_far, copies_of, relative_error


def test_relative_error_is_the_ratio_of_norms():
    expected = torch.tensor([3.0, 4.0])
    assert relative_error(expected + torch.tensor([0.3, 0.4]), expected) == pytest.approx(0.1)


def test_check_close_prints_on_a_match_and_raises_beyond_the_tolerance(capsys):
    x = torch.ones(3)
    check_close("ones", x + 1e-7, x, rtol=1e-6, atol=0)
    assert capsys.readouterr().out == "ones: match: True\n"
    with pytest.raises(AssertionError):
        check_close("ones", x + 1e-3, x, rtol=1e-6, atol=0)


def test_check_far_raises_when_the_tensors_are_close():
    x = torch.ones(4)
    check_far("doubled", 2 * x, x, at_least=0.5)
    with pytest.raises(AssertionError, match="above 0.5"):
        check_far("same", x, x, at_least=0.5)


def test_check_close_takes_plain_numbers(capsys):
    check_close("loss", 2.7275, 2.72749, rtol=1e-4, atol=0)
    assert capsys.readouterr().out == "loss: match: True\n"
    with pytest.raises(AssertionError):
        check_close("loss", 2.7, 2.8, rtol=1e-4, atol=0)


def test_copies_of_lists_new_memory_once_and_never_a_view():
    rows = torch.randn(64, 10)
    positive = rows > 0
    with copies_of(rows) as copies:
        _ = rows[:, :8], rows.float(), rows.view(640), rows.T  # views: the same memory
        _ = rows.sum(dim=0)  # new, but far smaller than rows
        _ = rows < 0  # as many elements, but a quarter of the bytes
        filled = rows.masked_fill(positive, 0.0)  # a copy of all of it
        _ = filled[:, :8], filled.reshape(32, 20)  # views of that copy: listed once, above
        _ = torch.cat([rows, rows])
    assert copies == ["masked_fill -> (64, 10)", "cat -> (128, 10)"]
    with copies_of(rows, at_least=0.25) as copies:
        _ = rows[:20].clone()  # 20 of 64 rows: above a quarter
        _ = rows[:10].clone()  # 10 of 64: below
    assert copies == ["clone -> (20, 10)"]

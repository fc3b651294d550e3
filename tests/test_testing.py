import pytest
import torch

from mla_ref.testing import check_close, check_far, relative_error


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

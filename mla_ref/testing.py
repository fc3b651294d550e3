"""The checks the lessons print: one definition of "match", shared by every notebook.

Each check raises (and so stops a notebook under nbval) when it fails, and prints one short line when it
holds, so a lesson's output reads as a list of verified claims.
"""

from __future__ import annotations

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ over all elements (Frobenius norms), as a float."""
    return ((actual - expected).norm() / expected.norm()).item()


def check_close(name: str, actual, expected, *, rtol: float, atol: float) -> None:
    """Raise unless |actual − expected| ≤ atol + rtol·|expected| everywhere (``torch.testing.assert_close``);
    otherwise print ``{name}: match: True``.  Tensors or plain numbers; the tolerance is always explicit: say why
    next to each call."""
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), rtol=rtol, atol=atol)
    print(f"{name}: match: True")


def check_far(name: str, actual: torch.Tensor, expected: torch.Tensor, *, at_least: float) -> None:
    """Raise unless ``actual`` differs from ``expected`` by a relative error above ``at_least``; print it."""
    error = relative_error(actual, expected)
    if not error > at_least:
        raise AssertionError(f"{name}: expected a relative error above {at_least}, got {error:.3g}")
    print(f"{name}: relative error {error:.2f} > {at_least}: different, as expected")

"""The checks the lessons print: one definition of "match", shared by every notebook.

Each check raises (and so stops a notebook under nbval) when it fails, and prints one short line when it
holds, so a lesson's output reads as a list of verified claims.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode


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


class _CopyWatch(TorchFunctionMode):
    """Notes every torch function's result that lives in new memory of at least ``nbytes`` bytes."""

    def __init__(self, watched: torch.Tensor, nbytes: int):
        super().__init__()
        self.nbytes = nbytes
        self.copies: list[str] = []
        # memory already accounted for: the watched tensor's, then each copy's (kept alive so no address is reused)
        self.storages = [watched.untyped_storage()]
        self.known = {watched.untyped_storage().data_ptr()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, tuple | list) else (result,):
            if not isinstance(tensor, torch.Tensor) or tensor.nbytes < self.nbytes:
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.known:  # a view of memory seen before is no new copy
                self.known.add(storage.data_ptr())
                self.storages.append(storage)
                self.copies.append(f"{getattr(func, '__name__', func)} -> {tuple(tensor.shape)}")
        return result


@contextmanager
def copies_of(tensor: torch.Tensor, *, at_least: float = 0.5) -> Iterator[list[str]]:
    """Inside the block, list every torch call whose result is new memory of ``at_least`` · ``tensor``'s bytes or more.

    Views share memory and are not listed: a slice, a reshape or an fp32 ``.float()`` of ``tensor`` (or of a
    copy already listed).  A ``masked_fill``, ``contiguous`` or ``cat`` of it is, once.  Each entry reads
    "function -> shape".  Tensors as large as the results listed stay alive until the block ends.

        with copies_of(cache.latent_and_rope_key) as copies:
            mla(x, cache, path="absorbed")
        assert copies == []
    """
    watch = _CopyWatch(tensor, max(1, int(at_least * tensor.nbytes)))
    with watch:
        yield watch.copies

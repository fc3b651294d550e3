"""The checks the lessons print: one definition of "match", shared by every notebook.

Each check raises (and so stops a notebook under nbval) when it fails, and prints one short line when it
holds, so a lesson's output reads as a list of verified claims.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

from mla_ref.measures import relative_error  # noqa: F401  (the lessons import it from here)


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


def write_byte_tokenizer(directory) -> None:
    """Write ``directory/tokenizer.json``: one token per byte (256 ids, no merges), for the random models of tests
    and benchmarks whose vocabulary is not 256 — a model directory without a tokenizer is read as bytes only when
    its vocabulary is exactly 256.  Needs the ``tokenizers`` package (the ``hf`` extra)."""
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 characters byte-level BPE spells bytes with
    tokenizer = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(Path(directory) / "tokenizer.json"))


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

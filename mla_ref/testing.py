"""The checks the lessons print: one definition of "match", shared by every notebook.

Each check raises (and so stops a notebook under nbval) when it fails, and prints one short line when it
holds, so a lesson's output reads as a list of verified claims.
"""

from __future__ import annotations

import torch

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

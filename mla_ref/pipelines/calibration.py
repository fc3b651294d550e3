"""The token windows a conversion or a recovery calibrates on, cut from folders of text.

The first tokens of a split are a handful of files (the standard library's train split starts with
``_pydecimal.py``), so ``spread_windows`` takes one window from each of many evenly spaced stretches of it;
``interleave_windows`` spaces a second text's windows among the first's; ``CalibrationText`` carries windows a
caller prepared (a mix of code and prose, say).  Text becomes tokens by the model directory's own tokenizer
(``mla_ref.hf.files.text_tokens``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mla_ref._checks import require_tokens
from mla_ref.data import read_text_folder, validation_windows
from mla_ref.hf.files import text_tokens


def first_windows(
    directory: str | os.PathLike, data: torch.Tensor, vocab_size: int, n_tokens: int, seq_len: int
) -> torch.Tensor:
    """The first windows of ``data`` as token ids: (n, seq_len + 1) int64, up to ``n_tokens`` tokens (fewer where the
    text is shorter).  A tokenizer needs fewer than 8 bytes a token, so 8 bytes per token are read."""
    tokens = text_tokens(directory, data[: 8 * (n_tokens + seq_len + 1)], vocab_size)
    return validation_windows(tokens, seq_len, n_tokens)


@dataclass(frozen=True)
class CalibrationText:
    """Calibration windows a caller prepared (a mix of texts, say) in place of the calibration folder's train split.

    windows: (n, seq_len + 1) token ids in the source's vocabulary; description: what they are, in words, for
    CONVERSION.md (e.g. "16,384 tokens of code and 8,192 of English prose").
    """

    windows: torch.Tensor
    description: str

    def checked(self, vocab_size: int, seq_len: int) -> torch.Tensor:
        """The windows as int64, after checking their shape against ``seq_len`` and their ids against the vocabulary."""
        windows = require_tokens("calibration windows", self.windows, vocab_size, min_len=seq_len + 1)
        if windows.shape[1] != seq_len + 1:
            raise ValueError(
                f"calibration windows must be {seq_len + 1} tokens long (seq_len + 1), got {windows.shape[1]}"
            )
        return windows


def calibration_windows(
    directory: str | os.PathLike, data: torch.Tensor, vocab_size: int, n_tokens: int, seq_len: int
) -> tuple[torch.Tensor, bool]:
    """Calibration windows (n, seq_len + 1), n = ⌈n_tokens / seq_len⌉: one from each of n evenly spaced stretches of
    ``data`` (``spread_windows``), so the calibration sees as many files as it has windows.  Returns the windows and
    whether they are spread.

    Why many tokens, and spread: SmolLM2-135M at a quarter of its cache (recipe, d_R 32, d_c 64, mla-ref form) was
    3.22× the source's perplexity on held-out code and 5.93× on English prose when calibrated on the first 4,096
    tokens of the standard library's train split (one file, ``_pydecimal.py``); 2.35× / 3.16× on its first 16,384
    tokens; 2.15× / 3.02× on 16,384 tokens spread one window per stretch; 2.16× / 2.89× on 32,768 spread
    (``benchmarks/calibration_amount.py``).  The output refit solves h·d_v unknowns per output row (576 there) and
    wants many tokens per unknown.  A text too short for n stretches gives its first windows instead (as many as it
    holds).
    """
    n_windows = max(1, math.ceil(n_tokens / seq_len))
    try:
        return spread_windows(directory, data, vocab_size, n_tokens, seq_len, n_windows), True
    except ValueError:  # a short text: its windows, in order
        return first_windows(directory, data, vocab_size, n_tokens, seq_len), False


def interleave_windows(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The windows of both, ``second``'s spaced evenly among ``first``'s: (n_1 + n_2, s + 1).

    So any leading slice of the result (the converter checks its written form on the first calibration windows) holds
    both kinds in proportion.
    """
    if not len(second):
        return first
    order = torch.cat([torch.arange(len(first)) / len(first), (torch.arange(len(second)) + 0.5) / len(second)])
    return torch.cat([first, second])[order.argsort(stable=True)]


def spread_windows(
    directory: Path, data: torch.Tensor, vocab_size: int, n_tokens: int, seq_len: int, pieces: int
) -> torch.Tensor:
    """About ``n_tokens`` of token windows (n, seq_len + 1) from ``pieces`` evenly spaced stretches of ``data``.

    The first tokens of a split are a handful of files (the standard library's train split starts with
    ``_pydecimal.py``); stretches spread over the whole split give the calibration many files' worth of text.
    Each stretch is tokenized on its own (``text_tokens``, the directory's tokenizer or bytes) and gives
    ⌈n / pieces⌉ consecutive windows, n = ⌈n_tokens / seq_len⌉; the result has n windows.
    """
    n_windows = max(1, math.ceil(n_tokens / seq_len))
    pieces = min(pieces, n_windows)
    per_piece = math.ceil(n_windows / pieces)
    stride = data.numel() // pieces
    # a tokenizer needs fewer than 8 bytes a token (as ``convert`` assumes): 8 bytes per token are read
    length = min(stride, 8 * per_piece * seq_len + 8)
    windows = []
    for piece in range(pieces):
        tokens = text_tokens(directory, data[piece * stride : piece * stride + length], vocab_size)
        available = (tokens.numel() - 1) // seq_len
        if available < 1:
            continue
        windows.append(validation_windows(tokens, seq_len, min(per_piece, available) * seq_len))
    found = sum(len(w) for w in windows)
    if found < n_windows:
        raise ValueError(
            f"the train split holds {found} windows of {seq_len} tokens where {n_windows} were asked for "
            f"({n_tokens:,} tokens); lower --tokens or give a larger --calib-dir"
        )
    return torch.cat(windows)[:n_windows]


def folder_calibration(source_root, corpus, options, vocab_size: int) -> tuple[torch.Tensor, str]:
    """Calibration windows (n, seq_len + 1) from the train split of ``corpus``, and from every text file of
    ``options.calib_extra_dir`` spaced evenly among them (``options``: a ``ConvertOptions``); and where they came from, in words for CONVERSION.md.

    Why a second folder: the output refit and the latent follow the calibration text, so a model converted on code
    loses more on English prose (SmolLM2-135M at 25%: 1.62× the source's perplexity on held-out code, 2.33× on
    prose); adding prose of another kind to the calibration narrows that (``benchmarks/calibration_text.py``).
    """

    def spread(data: torch.Tensor, n_tokens: int, what: str) -> tuple[torch.Tensor, str]:
        windows, evenly = calibration_windows(source_root, data, vocab_size, n_tokens, options.seq_len)
        return windows, f"{'spread evenly over' if evenly else 'from the start of'} {what}"

    calibration, where = spread(corpus.train, options.calib_tokens, f"the train split of {corpus.root}")
    if options.calib_extra_dir is None:
        return calibration, where
    text, files = read_text_folder(options.calib_extra_dir)
    n_extra = options.calib_extra_tokens or options.calib_tokens
    extra, extra_where = spread(text, n_extra, f"the {len(files)} text files of {options.calib_extra_dir}")
    where = (
        f"in two parts, the second's windows spaced evenly among the first's: {calibration.numel() - len(calibration):,} "
        f"tokens {where}; {extra.numel() - len(extra):,} tokens {extra_where}"
    )
    return interleave_windows(calibration, extra), where

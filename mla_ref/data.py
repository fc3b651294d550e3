"""A byte-level corpus built from text already on the machine: nothing is downloaded.

By default the corpus is the Python standard library's own ``.py`` sources (found via
``sysconfig.get_paths()["stdlib"]``), without test suites and third-party packages.
Files are sorted by relative path, then shuffled *by file* with a fixed seed and split
into train and validation, so no file straddles the split.  Each split is the files'
bytes joined by a blank line; its sha256 is recorded so a result can name its data.
Tokens are bytes: vocabulary 256, no tokenizer.

``load_corpus(folder)`` does the same for any folder of text files; ``read_text_folder(folder)`` reads one whole,
unsplit (text that only calibrates a conversion).
"""

from __future__ import annotations

import hashlib
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from mla_ref._checks import require_positive_int

# Directory names never read from the standard library: test suites, third-party packages, caches.
SKIPPED_DIRS: frozenset[str] = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
# Files whose content depends on how this Python was built, not on its version.
SKIPPED_FILE_PREFIXES: tuple[str, ...] = ("_sysconfigdata",)
FILE_SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class Corpus:
    """Train and validation bytes as uint8 tensors, with the files and hashes they came from."""

    root: str  # folder the files were read from
    train: torch.Tensor  # (n_train,) uint8
    val: torch.Tensor  # (n_val,) uint8
    train_files: tuple[str, ...]  # relative paths, in the order they were joined
    val_files: tuple[str, ...]
    train_sha256: str
    val_sha256: str

    def describe(self) -> str:
        return (
            f"{len(self.train_files)} train files ({self.train.numel():,} bytes), "
            f"{len(self.val_files)} validation files ({self.val.numel():,} bytes)"
        )


def stdlib_folder() -> Path:
    """The standard library's source folder of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_text(data: bytes) -> bool:
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def list_files(folder: Path, suffixes: tuple[str, ...] | None) -> list[str]:
    """Relative paths (posix, sorted) of the readable text files under ``folder``.

    Skips hidden entries, the directories in SKIPPED_DIRS, files named with a
    SKIPPED_FILE_PREFIXES prefix, and, when ``suffixes`` is given, files with other endings.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.startswith((".", *SKIPPED_FILE_PREFIXES)) or (suffixes is not None and not name.endswith(suffixes)):
                continue
            found.append(Path(dirpath, name).relative_to(folder).as_posix())
    return sorted(found)


def _join(folder: Path, files: list[str]) -> tuple[bytes, list[str]]:
    parts, kept = [], []
    for rel in files:
        data = (folder / rel).read_bytes()
        if data and _is_text(data):
            parts.append(data)
            kept.append(rel)
    return FILE_SEPARATOR.join(parts), kept


def load_corpus(
    folder: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    suffixes: tuple[str, ...] | None = None,
) -> Corpus:
    """Read, split and hash a byte-level corpus.

    Args:
        folder: a folder of text files; None means the standard library's sources.
        val_fraction: share of *files* held out for validation (at least one file each side).
        seed: the file shuffle's seed; the same seed and files give the same split.
        suffixes: file endings to keep; default (".py",) for the standard library and
            every UTF-8 text file for a user folder.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if folder is None:
        root, suffixes = stdlib_folder(), suffixes or (".py",)
    else:
        root = Path(folder)
        if not root.is_dir():
            raise ValueError(f"corpus folder {str(root)!r} does not exist or is not a directory")
    files = list_files(root, suffixes)
    if len(files) < 2:
        raise ValueError(f"corpus folder {str(root)!r} holds {len(files)} text files; need at least 2 to split")
    shuffled = list(files)
    random.Random(seed).shuffle(shuffled)
    n_val = min(len(files) - 1, max(1, round(val_fraction * len(files))))
    val_bytes, val_files = _join(root, sorted(shuffled[:n_val]))
    train_bytes, train_files = _join(root, sorted(shuffled[n_val:]))
    if not train_bytes or not val_bytes:
        raise ValueError(f"corpus folder {str(root)!r}: a split came out empty (binary or empty files?)")
    return Corpus(
        root=str(root),
        train=torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8),
        val=torch.frombuffer(bytearray(val_bytes), dtype=torch.uint8),
        train_files=tuple(train_files),
        val_files=tuple(val_files),
        train_sha256=hashlib.sha256(train_bytes).hexdigest(),
        val_sha256=hashlib.sha256(val_bytes).hexdigest(),
    )


def read_text_folder(
    folder: str | os.PathLike, suffixes: tuple[str, ...] | None = None
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Every text file under ``folder`` (``list_files``), joined whole with no split: (n,) uint8 and the files read.

    For text that only calibrates (a conversion's second calibration folder), where no part needs holding out.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"text folder {str(root)!r} does not exist or is not a directory")
    data, files = _join(root, list_files(root, suffixes))
    if not data:
        raise ValueError(f"text folder {str(root)!r} holds no UTF-8 text file")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), tuple(files)


def random_batch(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the byte stream and their next bytes.

    Shapes: data (n,) uint8 -> inputs (b, s) int64 and targets (b, s) int64 with
    targets[:, j] = inputs[:, j + 1] shifted one byte further along.
    """
    require_positive_int("batch_size", batch_size)
    require_positive_int("seq_len", seq_len)
    if data.numel() < seq_len + 1:
        raise ValueError(f"data holds {data.numel()} bytes; a window needs seq_len + 1 = {seq_len + 1}")
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)  # (b,)
    offsets = torch.arange(seq_len + 1)  # (s + 1,)
    windows = data[starts[:, None] + offsets[None, :]].long()  # (b, s + 1)
    return windows[:, :-1], windows[:, 1:]


def validation_windows(data: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """The fixed evaluation slice: the first windows of ``data``, non-overlapping.

    Window i holds bytes [i·s, i·s + s] (s + 1 bytes: inputs and shifted targets); as many
    windows as fit in ``max_tokens`` predicted bytes.  Returns (n_windows, s + 1) int64.
    """
    require_positive_int("seq_len", seq_len)
    require_positive_int("the number of evaluation tokens", max_tokens)
    n_windows = min(max_tokens // seq_len, (data.numel() - 1) // seq_len)
    if n_windows < 1:
        raise ValueError(
            f"no evaluation window fits: the text holds {data.numel()} tokens and {max_tokens} were asked for, "
            f"fewer than one window of {seq_len} (+1); ask for at least {seq_len} tokens, a shorter window, or more text"
        )
    starts = torch.arange(n_windows) * seq_len  # (n,)
    return data[starts[:, None] + torch.arange(seq_len + 1)[None, :]].long()  # (n, s + 1)

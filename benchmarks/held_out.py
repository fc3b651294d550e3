"""The two texts the real-model benchmarks measure on, and calibration text that contains neither.

- code: the validation split of the Python standard library's sources (``mla_ref.data.load_corpus``, split by
  file), which no calibration reads;
- prose: the Python language reference's English text that ships with Python (``pydoc_data.topics``).

The reference's text is also a file of the standard library's *train* split (``pydoc_data/topics.py``, about 6.6% of
its bytes), and calibration windows spread over that split reach it.  ``calibration_folder`` therefore makes a
folder of the train split's files less that one (symbolic links, nothing copied), for ``--calib-dir``: the prose
stays held out, and the code's files were never in the train split.  ``train_without_prose`` is the same for a
script that reads the train split's bytes itself.  ``calibration_prose_folder`` links English prose of other
documents (IDLE's news and read-me files, email's architecture notes, the licence) for a second calibration folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

PROSE_FILE = "pydoc_data/topics.py"  # the file of the standard library that holds the prose text
CALIBRATION_PROSE_FILES = (  # English text beside the standard library (not .py: in no split of the code corpus)
    "idlelib/NEWS.txt",
    "idlelib/NEWS2x.txt",
    "idlelib/README.txt",
    "idlelib/HISTORY.txt",
    "idlelib/TODO.txt",
    "idlelib/extend.txt",
    "idlelib/idle_test/README.txt",
    "email/architecture.rst",
    "LICENSE.txt",
    "idlelib/CREDITS.txt",
)


def prose_text() -> str:
    """The Python language reference's text: every topic of ``pydoc_data.topics``, in sorted order."""
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))


def calibration_folder(corpus, folder: Path) -> Path:
    """``folder`` filled with links to every file of ``corpus``'s train split except ``PROSE_FILE``; returns it.

    ``corpus``: ``mla_ref.data.load_corpus()`` (the standard library).  An existing folder is refilled.
    """
    if PROSE_FILE not in corpus.train_files:
        raise ValueError(f"{PROSE_FILE} is not in the train split of {corpus.root}; the benchmark expects it there")
    folder.mkdir(parents=True, exist_ok=True)
    for name in corpus.train_files:
        if name == PROSE_FILE:
            continue
        link = folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(Path(corpus.root) / name)
    return folder


def calibration_prose_files(stdlib: Path) -> list[str]:
    """The ``CALIBRATION_PROSE_FILES`` under ``stdlib`` (a Python may lack some); ValueError when it has none."""
    found = [name for name in CALIBRATION_PROSE_FILES if (stdlib / name).is_file()]
    if not found:
        raise ValueError(f"none of the prose files {', '.join(CALIBRATION_PROSE_FILES)} is under {stdlib}")
    return found


def calibration_prose_folder(stdlib: Path, folder: Path) -> tuple[Path, list[str]]:
    """``folder`` filled with links to the ``CALIBRATION_PROSE_FILES`` this Python has, for ``--calib-extra-dir``:
    English prose about Python, other documents than the language reference the prose text comes from.  Returns the
    folder and the files linked."""
    found = calibration_prose_files(stdlib)
    folder.mkdir(parents=True, exist_ok=True)
    for name in found:
        link = folder / name.replace("/", "-")  # flat: a folder reader skips idlelib/idle_test, as it skips tests
        if not link.is_symlink():
            link.symlink_to(stdlib / name)
    return folder, found


def train_without_prose(corpus) -> torch.Tensor:
    """The bytes of ``corpus``'s train split (uint8) with ``PROSE_FILE``'s bytes cut out: files are joined in sorted
    order, so that file is one run of them."""
    prose_file = (Path(corpus.root) / PROSE_FILE).read_bytes()
    train = corpus.train.numpy().tobytes()
    start = train.find(prose_file)
    if PROSE_FILE not in corpus.train_files or start < 0:
        raise ValueError(f"{PROSE_FILE} is not in the train split of {corpus.root}; the benchmark expects it there")
    return torch.frombuffer(bytearray(train[:start] + train[start + len(prose_file) :]), dtype=torch.uint8)

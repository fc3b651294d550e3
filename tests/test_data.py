"""The local byte-level corpus: deterministic file-level split, skipped test folders, batches and windows."""

import hashlib

import pytest
import torch

from mla_ref.data import (
    SKIPPED_DIRS,
    load_corpus,
    random_batch,
    read_text_folder,
    stdlib_folder,
    validation_windows,
)


@pytest.fixture(scope="module")
def stdlib_corpus():
    return load_corpus()


def test_stdlib_split_is_deterministic_and_file_level(stdlib_corpus):
    again = load_corpus()
    assert (again.train_sha256, again.val_sha256) == (stdlib_corpus.train_sha256, stdlib_corpus.val_sha256)
    assert again.train_files == stdlib_corpus.train_files
    assert not set(stdlib_corpus.train_files) & set(stdlib_corpus.val_files)
    n_files = len(stdlib_corpus.train_files) + len(stdlib_corpus.val_files)
    assert len(stdlib_corpus.val_files) == round(0.05 * n_files)
    other = load_corpus(seed=1)
    assert other.val_files != stdlib_corpus.val_files


def test_stdlib_corpus_skips_tests_and_third_party_code(stdlib_corpus):
    assert stdlib_corpus.root == str(stdlib_folder())
    files = stdlib_corpus.train_files + stdlib_corpus.val_files
    assert all(f.endswith(".py") for f in files)
    assert not [f for f in files if set(f.split("/")[:-1]) & SKIPPED_DIRS]
    assert "argparse.py" in files  # a plain library module is in


def test_hashes_name_the_bytes(stdlib_corpus):
    assert hashlib.sha256(stdlib_corpus.val.numpy().tobytes()).hexdigest() == stdlib_corpus.val_sha256
    assert hashlib.sha256(stdlib_corpus.train.numpy().tobytes()).hexdigest() == stdlib_corpus.train_sha256


def test_custom_folder_corpus(tmp_path):
    for i in range(10):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}\n" * 5)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "skipped.txt").write_text("never read")
    (tmp_path / ".hidden.txt").write_text("never read")
    (tmp_path / "image.bin").write_bytes(bytes(range(256)))  # not text: left out
    corpus = load_corpus(tmp_path, val_fraction=0.2, seed=3)
    files = corpus.train_files + corpus.val_files
    assert sorted(files) == [f"doc{i}.txt" for i in range(10)]
    assert len(corpus.val_files) == 2
    assert b"never read" not in corpus.train.numpy().tobytes() + corpus.val.numpy().tobytes()
    assert load_corpus(tmp_path, val_fraction=0.2, seed=3).val_sha256 == corpus.val_sha256


def test_bad_corpus_requests_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist or is not a directory"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "only.txt").write_text("one file")
    with pytest.raises(ValueError, match="holds 1 text files; need at least 2"):
        load_corpus(tmp_path)
    with pytest.raises(ValueError, match="val_fraction must lie strictly between 0 and 1"):
        load_corpus(tmp_path, val_fraction=1.0)


def test_a_text_folder_is_read_whole_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.rst").write_text("first")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "skipped.txt").write_text("never read")
    (tmp_path / "image.bin").write_bytes(bytes(range(256)))
    data, files = read_text_folder(tmp_path)
    assert files == ("a.rst", "b.txt")
    assert data.numpy().tobytes() == b"first\n\nsecond"


def test_bad_text_folders_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist or is not a directory"):
        read_text_folder(tmp_path / "missing")
    (tmp_path / "image.bin").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="holds no UTF-8 text file"):
        read_text_folder(tmp_path)


def test_random_batch_targets_are_inputs_shifted_by_one():
    data = torch.arange(200, dtype=torch.uint8)
    inputs, targets = random_batch(data, 4, 16, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (4, 16)
    assert inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(targets - inputs, torch.ones_like(inputs))  # consecutive bytes of arange
    again, _ = random_batch(data, 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(again, inputs)
    with pytest.raises(ValueError, match="a window needs seq_len \\+ 1 = 201"):
        random_batch(data, 1, 200, torch.Generator())


def test_validation_windows_are_the_first_non_overlapping_windows():
    data = torch.arange(100, dtype=torch.uint8)
    windows = validation_windows(data, seq_len=8, max_tokens=30)
    assert windows.shape == (3, 9)  # 30 // 8 windows of 8 predicted bytes each
    assert torch.equal(windows[:, :-1].flatten(), torch.arange(24))  # inputs tile the start, no overlap
    assert torch.equal(windows[:, -1], torch.tensor([8, 16, 24]))  # the last target is the next window's start
    assert validation_windows(data, seq_len=8, max_tokens=10_000).shape == (12, 9)  # capped by the data
    with pytest.raises(ValueError, match="no evaluation window fits"):
        validation_windows(data, seq_len=200, max_tokens=1000)

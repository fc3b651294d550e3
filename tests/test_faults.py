"""Nothing lost, nothing silent: every writing command refuses an OUT that would destroy an input, no output is
ever half-written or silently replaced, and bad weights, tokenizers and arguments are refused with one line before
any work — each case one that once went wrong."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mla_ref import checkpoint
from mla_ref.__main__ import main
from mla_ref.hf import models as hf_models
from mla_ref.model import ModelConfig, TinyLM
from mla_ref.outputs import check_output, clear_leftovers, staged_output
from mla_ref.pipelines import convert as hf_convert
from mla_ref.pipelines.convert import ConvertOptions, convert_checkpoint
from mla_ref.records import CONVERSION_RECORD, read_record
from mla_ref.train import TEACHERS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread (conftest)
TEACHER = TEACHERS_DIR / "gqa"
QUICK = ["--calib-tokens", "512", "--eval-tokens", "0", "--seq-len", "32", "--quiet"]


def tree_digest(root: Path) -> str:
    """SHA-256 over every file's relative path and bytes under ``root``: equal digests, untouched tree."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def refused(argv: list[str], capsys, code: int = 2) -> str:
    """Run ``python -m mla_ref ARGV``; assert the exit code and one ``error:`` line; return that line."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".replaced-" in p.name)


@pytest.fixture(scope="module")
def llama_teacher(tmp_path_factory) -> Path:
    """The GQA teacher exported in Llama layout (byte-level: a vocabulary of 256, no tokenizer)."""
    out = tmp_path_factory.mktemp("faults") / "teacher-llama"
    assert main(["export", str(TEACHER), str(out), "--format", "llama"]) == 0
    return out


@pytest.fixture
def source(tmp_path, llama_teacher) -> Path:
    """A private copy of the Llama teacher, inside ``tmp_path/parent``."""
    path = tmp_path / "parent" / "src"
    shutil.copytree(llama_teacher, path)
    return path


# ---- 1. data loss: OUT is, holds or lies inside an input ------------------------------------------------------------
def test_convert_refuses_its_source_as_out_even_with_overwrite(source, capsys):
    before = tree_digest(source.parent)
    line = refused(["convert", str(source), str(source), "--budget", "0.5", "--overwrite", *QUICK], capsys)
    assert "is the input" in line and str(source) in line
    line = refused(["convert", str(source), str(source.parent), "--overwrite", *QUICK], capsys)
    assert "holds the input" in line
    line = refused(["convert", str(source), str(source / "inside"), *QUICK], capsys)
    assert "lies inside the input" in line
    assert tree_digest(source.parent) == before


def test_export_and_recover_and_train_teacher_refuse_an_input_as_out(source, tmp_path, capsys):
    before = tree_digest(source)
    assert "is the input" in refused(["export", str(source), str(source), "--format", "llama", "--overwrite"], capsys)
    line = refused(["recover", str(source), str(source / "out"), "--source", str(TEACHER), "--overwrite"], capsys)
    assert "lies inside the input" in line
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("text " * 100)
    line = refused(["train-teacher", "--attention", "gqa", "--out", str(corpus), "--corpus", str(corpus)], capsys)
    assert "--out" in line and "is the input" in line
    assert tree_digest(source) == before


def test_the_current_directory_is_never_an_output(source, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert "current directory" in refused(["convert", str(source), ".", "--overwrite", *QUICK], capsys)
    assert "current directory" in refused(["fetch", "smollm2-135m", "..", "--overwrite"], capsys)
    assert (work / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_only_a_model_directory(source, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    line = refused(["export", str(source), str(folder), "--format", "llama", "--overwrite"], capsys)
    assert "not a model directory" in line
    assert (folder / "cat.jpg").read_bytes() == b"\xff\xd8"


def test_an_empty_existing_folder_is_used_by_every_command(source, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert (
        main(["convert", str(source), str(out), "--budget", "0.5", *QUICK]) == 0
    )  # the rule train-teacher and fetch already had
    assert (out / "config.json").is_file() and leftovers(tmp_path) == []


# ---- 2. two writers of one OUT --------------------------------------------------------------------------------------
def test_a_second_writer_never_replaces_what_appeared_meanwhile(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="appeared while this command ran"):
        with staged_output(out) as staging:
            (staging / "mine.txt").write_text("second")
            out.mkdir()  # the other command finishes first
            (out / "theirs.txt").write_text("first")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert leftovers(tmp_path) == []


def test_two_exports_to_one_out_at_once_leave_one_complete_output(source, tmp_path, capsys, monkeypatch):
    """The second export's check passes while the first is still writing; the first lands; the second is refused."""
    out = tmp_path / "out"
    save_weights = hf_models.save_weights

    def slow_save(tensors, directory, *args, **kwargs):
        if not out.exists():  # the second export is in progress: let the first one finish now
            monkeypatch.setattr(hf_models, "save_weights", save_weights)
            assert main(["export", str(source), str(out), "--format", "llama"]) == 0
        return save_weights(tensors, directory, *args, **kwargs)

    monkeypatch.setattr(hf_models, "save_weights", slow_save)
    capsys.readouterr()
    line = refused(["export", str(source), str(out), "--format", "llama"], capsys)
    assert "appeared while this command ran" in line
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "model.safetensors").is_file() and leftovers(tmp_path) == []


# ---- 3. kills and interrupts ----------------------------------------------------------------------------------------
WRITER = textwrap.dedent(
    """
    import sys, time
    from mla_ref.cli.common import Parser, run
    from mla_ref.outputs import staged_output

    def action(args, argv):
        with staged_output(args.out) as staging:
            (staging / "big.bin").write_bytes(b"0" * 1000)
            print("writing", flush=True)
            time.sleep(60)

    parser = Parser()
    parser.add_argument("out")
    sys.exit(run(parser, None, action))
    """
)


def _start_writer(out: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "writing"
    return process


@pytest.mark.parametrize(("sig", "code", "words"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_an_interrupted_command_says_so_in_one_line_and_leaves_nothing(tmp_path, sig, code, words):
    process = _start_writer(tmp_path / "out")
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code
    assert err.strip().splitlines() == [f"error: interrupted ({words}); nothing was written"]
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writers_staging_folder_says_what_it_is_and_the_next_run_clears_it(tmp_path, capsys):
    out = tmp_path / "out"
    process = _start_writer(out)
    process.kill()
    process.wait(timeout=60)
    (left,) = leftovers(tmp_path)
    assert left.startswith(f".out.partial-{process.pid}-")
    with staged_output(out) as staging:
        (staging / "config.json").write_text("{}")
    assert f"removed {left}, a half-written output of a command that was killed" in capsys.readouterr().err
    assert leftovers(tmp_path) == [] and (out / "config.json").is_file()


def test_an_output_moved_aside_by_a_killed_overwrite_is_put_back(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    aside = tmp_path / f".out.replaced-{pid}-abc"
    aside.mkdir()
    (aside / "config.json").write_text("old")
    assert clear_leftovers(tmp_path / "out") == [
        f"restored {str(tmp_path / 'out')!r} from {aside.name}, which a killed command had moved aside"
    ]
    assert (tmp_path / "out" / "config.json").read_text() == "old" and leftovers(tmp_path) == []


def test_a_running_writers_staging_folder_is_left_alone(tmp_path):
    own = tmp_path / f".out.partial-{os.getpid()}-xyz"
    own.mkdir()
    assert clear_leftovers(tmp_path / "out") == [] and own.is_dir()


# ---- 4. text read as bytes by a model that has a tokenizer ----------------------------------------------------------
@pytest.fixture(scope="module")
def wide_vocab_llama(tmp_path_factory) -> Path:
    """A Llama directory whose vocabulary is 300 and which has no tokenizer.json (as a real model with its
    tokenizer files lost)."""
    root = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, attention="gqa", n_kv_heads=2,
                         head_dim=16, mlp_hidden=96)  # fmt: skip
    checkpoint.save(TinyLM(config), root / "ckpt")
    assert main(["export", str(root / "ckpt"), str(root / "llama"), "--format", "llama"]) == 0
    return root / "llama"


def test_a_model_without_its_tokenizer_is_refused_not_read_as_bytes(wide_vocab_llama, tmp_path, capsys):
    line = refused(["eval", str(wide_vocab_llama), "--eval-tokens", "256", "--seq-len", "32"], capsys)
    assert "no tokenizer.json and a vocabulary of 300" in line
    line = refused(["convert", str(wide_vocab_llama), str(tmp_path / "out"), "--budget", "0.5", *QUICK], capsys)
    assert "no tokenizer.json" in line and not (tmp_path / "out").exists()


def test_a_garbled_tokenizer_is_a_clear_error(wide_vocab_llama, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(wide_vocab_llama, broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    line = refused(["eval", str(broken), "--eval-tokens", "256", "--seq-len", "32"], capsys)
    assert "tokenizer.json" in line and "is not a tokenizer the 'tokenizers' package reads" in line


# ---- 5. recover trains towards the source it was converted from, or refuses -----------------------------------------
@pytest.fixture(scope="module")
def relative_conversion(tmp_path_factory) -> Path:
    """The GQA teacher converted at 25%, its source typed as a relative path from the folder ``a``."""
    root = tmp_path_factory.mktemp("provenance")
    for name in ("a", "b"):
        (root / name).mkdir()
    shutil.copytree(TEACHER, root / "a" / "teacher")
    old = Path.cwd()
    os.chdir(root / "a")
    try:
        options = ConvertOptions(budget=0.25, calib_tokens=512, eval_tokens=0, seq_len=32)
        convert_checkpoint("teacher", root / "converted", options)
    finally:
        os.chdir(old)
    # in folder b, a different model of the same name and shape (the teacher with its embedding perturbed)
    shutil.copytree(TEACHER, root / "b" / "teacher")
    weights = root / "b" / "teacher" / "model.safetensors"
    tensors = load_file(weights)
    tensors["embed_tokens.weight"] = tensors["embed_tokens.weight"] * 1.01
    save_file(tensors, weights, metadata={"format": "pt"})
    return root / "converted"


RECOVER = ["--tokens", "512", "--steps", "2", "--batch-tokens", "64", "--seq-len", "32", "--eval-tokens", "64"]


def test_the_record_names_its_source_by_absolute_path_and_fingerprint(relative_conversion):
    record = read_record(relative_conversion / CONVERSION_RECORD)
    assert record["source"] == "teacher"  # as typed
    assert record["source_path"] == str(relative_conversion.parent / "a" / "teacher")
    assert len(record["source_fingerprint"]) == 64


def test_recover_finds_the_recorded_source_from_any_directory(relative_conversion, monkeypatch, capsys):
    monkeypatch.chdir(relative_conversion.parent / "b")  # where "teacher" is another model
    out = relative_conversion.parent / "recovered"
    assert main(["recover", str(relative_conversion), str(out), *RECOVER, "--quiet", "--force"]) == 0
    record = read_record(out / "RECOVERY.md")
    assert record["source_path"] == str(relative_conversion.parent / "a" / "teacher") and record["source_checked"]
    assert "the one the converted model's CONVERSION.md records" in (out / "RECOVERY.md").read_text()


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_recover_refuses_a_different_source_even_when_forced(relative_conversion, tmp_path, capsys, force):
    other = relative_conversion.parent / "b" / "teacher"
    argv = ["recover", str(relative_conversion), str(tmp_path / "out"), "--source", str(other), *RECOVER, *force]
    line = refused(argv, capsys)
    assert "is not the model" in line and "fingerprint" in line
    assert not (tmp_path / "out").exists()


def test_kv_cache_compare_refuses_a_different_model_at_the_recorded_path(relative_conversion, tmp_path, capsys):
    moved = tmp_path / "converted"
    shutil.copytree(relative_conversion, moved)
    record_file = moved / CONVERSION_RECORD
    text = record_file.read_text()
    recorded = read_record(record_file)["source_path"]
    record_file.write_text(text.replace(recorded, str(relative_conversion.parent / "b" / "teacher")))
    assert "is not the model" in refused(["kv-cache", str(moved)], capsys)
    assert main(["kv-cache", str(relative_conversion)]) == 0  # the true source: compared as before
    assert "against" in capsys.readouterr().out


# ---- 6, 7. weights that are not finite floating-point numbers -------------------------------------------------------
def _with_tensor(source: Path, name: str, change) -> None:
    weights = source / "model.safetensors"
    tensors = load_file(weights)
    tensors[name] = change(tensors[name])
    save_file(tensors, weights, metadata={"format": "pt"})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused_by_every_reader(source, tmp_path, capsys, bad):
    name = "model.layers.1.self_attn.k_proj.weight"
    _with_tensor(source, name, lambda t: t.index_fill(0, torch.tensor([3]), bad))
    for argv in (
        ["convert", str(source), str(tmp_path / "a"), *QUICK],
        ["convert", str(source), str(tmp_path / "b"), "--format", "mla-ref", *QUICK],
        ["convert", str(source), str(tmp_path / "c"), "--budget", "0.5", *QUICK],
        ["eval", str(source), "--eval-tokens", "256", "--seq-len", "32"],
        ["export", str(source), str(tmp_path / "d"), "--format", "deepseek-v3"],
    ):
        line = refused(argv, capsys)
        assert name in line and "NaN or infinite" in line, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parent"]


def test_integer_weights_are_refused_naming_the_tensor_and_dtype(source, tmp_path, capsys):
    name = "model.layers.0.mlp.up_proj.weight"
    _with_tensor(source, name, lambda t: (t * 1000).to(torch.int16))
    line = refused(["convert", str(source), str(tmp_path / "out"), "--budget", "0.5", *QUICK], capsys)
    assert name in line and "I16" in line and "floating point" in line
    line = refused(["eval", str(source), "--eval-tokens", "256", "--seq-len", "32"], capsys)
    assert name in line and "I16" in line


def test_an_mla_ref_checkpoint_with_integer_weights_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(TEACHER, ckpt)
    _with_tensor(ckpt, "norm.weight", lambda t: t.to(torch.int32))
    with pytest.raises(ValueError, match="'norm.weight' is stored as torch.int32; weights must be floating point"):
        checkpoint.load(ckpt)


# ---- 8. the file system refuses -------------------------------------------------------------------------------------
def test_a_full_disk_is_one_line_and_leaves_nothing(source, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "model.safetensors"))

    monkeypatch.setattr(hf_models, "save_weights", full)
    line = refused(["export", str(source), str(tmp_path / "out"), "--format", "llama"], capsys, code=1)
    assert "No space left on device" in line and "model.safetensors" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parent"]


def test_an_unwritable_parent_is_refused_before_any_work(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hf_convert, "open_source", lambda *a: pytest.fail("the source was read before the check"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = refused(["convert", str(source), str(blocker / "out"), *QUICK], capsys)
    assert "is not a directory" in line
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    line = refused(["convert", str(source), str(tmp_path / "out"), *QUICK], capsys)
    assert f"{str(tmp_path)!r} is not writable" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to any folder whatever its mode")
def test_a_read_only_parent_is_refused_before_any_work(source, tmp_path, capsys):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert "is not writable" in refused(["convert", str(source), str(parent / "out"), *QUICK], capsys)
    finally:
        parent.chmod(0o755)


# ---- 9. arguments checked before anything is loaded -----------------------------------------------------------------
def test_a_rope_dim_the_written_form_cannot_hold_is_refused_before_the_text_is_read(
    source, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(hf_convert, "load_corpus", lambda *a: pytest.fail("the calibration text was read first"))
    start = time.perf_counter()
    line = refused(["convert", str(source), str(tmp_path / "out"), "--rope-dim", "48", *QUICK], capsys)
    assert "--rope-dim 48 is more than the source's head size d_h = 32" in line and "use recipe" not in line
    assert time.perf_counter() - start < 30  # no conversion ran (a generous bound: a check, not a timing)


def test_an_out_that_is_a_file_is_refused_before_the_source_is_read(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hf_convert, "open_source", lambda *a: pytest.fail("the source was read before the check"))
    target = tmp_path / "a-file"
    target.write_text("keep me")
    line = refused(["convert", str(source), str(target), "--overwrite", *QUICK], capsys)
    assert "exists and is not a directory" in line and target.read_text() == "keep me"


# ---- 10. wording --------------------------------------------------------------------------------------------------
def test_messages_name_what_the_user_typed_not_internal_parameters(source, tmp_path, capsys):
    line = refused(["eval", str(TEACHER), "--eval-tokens", "8", "--seq-len", "32"], capsys)
    assert "max_tokens" not in line and "no evaluation window fits" in line
    afile = tmp_path / "a-file"
    afile.write_text("")
    line = refused(["train-teacher", "--attention", "gqa", "--out", str(afile)], capsys)
    assert "exists and is not a directory" in line and "not empty" not in line
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    for argv in (
        ["convert", str(source), str(out), *QUICK],
        ["export", str(source), str(out), "--format", "llama"],
        ["train-teacher", "--attention", "gqa", "--out", str(out)],
    ):
        line = refused(argv, capsys)
        assert "exists and is not empty; pass --overwrite" in line and "overwrite=True" not in line, argv


def test_eval_refuses_an_mla_path_for_a_model_without_mla(capsys):
    line = refused(["eval", str(TEACHER), "--path", "absorbed", "--eval-tokens", "256", "--seq-len", "32"], capsys)
    assert "'absorbed' is an MLA execution path" in line and "'gqa'" in line


def test_check_output_accepts_a_new_path_under_missing_folders(tmp_path):
    assert check_output(tmp_path / "new" / "deeper" / "out") == tmp_path / "new" / "deeper" / "out"


def test_too_few_calibration_tokens_for_the_refit_are_refused_before_the_text_is_read(
    source, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(hf_convert, "load_corpus", lambda *a: pytest.fail("the calibration text was read first"))
    argv = [
        "convert",
        str(source),
        str(tmp_path / "out"),
        "--budget",
        "0.5",
        "--calib-tokens",
        "256",
        "--seq-len",
        "32",
    ]
    line = refused(argv, capsys)
    assert "method 'recipe' needs at least 512 calibration tokens" in line and "got 256" in line

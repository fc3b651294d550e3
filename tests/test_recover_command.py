"""The ``recover`` command on the GQA teacher converted at 25%: it writes a complete OUT in CONVERTED's format that
reloads as trained, or nothing with one error line."""

import json

import pytest
import torch

from mla_ref.__main__ import main as mla_ref_main
from mla_ref.cli.recover import main
from mla_ref.data import load_corpus, validation_windows
from mla_ref.hf import load_model
from mla_ref.pipelines import ConvertOptions, convert_checkpoint
from mla_ref.pipelines.recover import RecoverOptions, layerwise_share, recover_checkpoint
from mla_ref.records import read_record
from mla_ref.train import TEACHERS_DIR

SEQ = 64  # tokens (bytes) per window in these tests
pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread (conftest)


@pytest.fixture(scope="module")
def held_out():
    """8 windows of the validation split with their next bytes: (8, SEQ + 1)."""
    return validation_windows(load_corpus().val, SEQ, 8 * SEQ)


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    """The GQA teacher converted at 25% by ``convert`` (stock DeepSeek-V3, CONVERSION.md naming its source)."""
    out = tmp_path_factory.mktemp("recover") / "converted"
    # 512 calibration tokens, the fewest the output refit takes (2 per unknown): a conversion that the few training
    # steps of these tests can still improve on their held-back windows
    options = ConvertOptions(budget=0.25, calib_tokens=512, eval_tokens=0, seq_len=SEQ)
    convert_checkpoint(TEACHERS_DIR / "gqa", out, options)
    return out


SMALL = ["--tokens", str(16 * SEQ), "--steps", "6", "--batch-tokens", str(4 * SEQ), "--seq-len", str(SEQ),
         "--eval-tokens", str(4 * SEQ), "--quiet"]  # fmt: skip


def test_the_command_writes_a_complete_output(converted_dir, tmp_path, capsys):
    out = tmp_path / "recovered"
    assert main([str(converted_dir), str(out), *SMALL]) == 0
    assert capsys.readouterr().out == ""  # --quiet
    assert sorted(p.name for p in out.iterdir()) == ["CONVERSION.md", "RECOVERY.md", "config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == json.loads((converted_dir / "config.json").read_text())
    record = read_record(out / "RECOVERY.md")
    assert record["source"] == str(TEACHERS_DIR / "gqa") and record["mode"] == "layerwise"
    assert record["kept"] == ["q_proj.bias"]  # stock DeepSeek-V3 cannot store a q_proj bias
    assert len(record["layerwise"]["layers"]) == 4 and record["layerwise"]["steps"] == 24
    quality = record["quality"]
    assert list(quality) == ["source", "converted", "recovered"]
    assert quality["recovered"]["kl_to_teacher"] < quality["converted"]["kl_to_teacher"]
    check = record["check"]  # the last 2 of the 16 calibration windows, trained on by no phase
    assert check["converted"]["tokens"] == 2 * SEQ
    assert check["recovered"]["kl_to_teacher"] < check["converted"]["kl_to_teacher"]
    assert record["warning"] is None
    text = (out / "RECOVERY.md").read_text()
    assert "python -m mla_ref recover" in text and "| recovered |" in text and "## Layer errors" in text


def test_the_written_model_reloads_as_trained(converted_dir, tmp_path, held_out):
    out = tmp_path / "recovered"
    options = RecoverOptions(tokens=16 * SEQ, steps=6, batch_tokens=4 * SEQ, seq_len=SEQ, eval_tokens=4 * SEQ)
    report = recover_checkpoint(converted_dir, out, options)
    reloaded = load_model(out)
    trained = report.model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        # the report's model is already rounded to the storage dtype (bf16 here), so storing it is exact
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0, msg=name)
    with torch.no_grad():
        # the DeepSeek-V3 reader builds the same modules: the same logits to fp32 rounding
        torch.testing.assert_close(reloaded(held_out[:2, :-1]), report.model(held_out[:2, :-1]), rtol=1e-5, atol=1e-5)
    assert report.quality["recovered"].kl_to_teacher < report.quality["converted"].kl_to_teacher


def refused(argv, capsys, parent) -> str:
    before = sorted(p.name for p in parent.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert sorted(p.name for p in parent.iterdir()) == before  # nothing written, no staging folder left
    return err


def test_the_command_refuses_bad_input_and_writes_nothing(converted_dir, tmp_path, capsys):
    out = tmp_path / "out"
    err = refused([str(tmp_path / "missing"), str(out), *SMALL], capsys, tmp_path)
    assert "does not exist" in err
    err = refused(
        [str(TEACHERS_DIR / "gqa"), str(out), "--source", str(TEACHERS_DIR / "mha"), *SMALL], capsys, tmp_path
    )
    assert "is not an MLA model (its attention is 'gqa')" in err
    err = refused(
        [str(TEACHERS_DIR / "gqa"), str(out), "--source", str(TEACHERS_DIR / "gqa"), *SMALL], capsys, tmp_path
    )
    assert "is CONVERTED itself" in err
    # a converted directory whose record names a source that has gone
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    for path in converted_dir.iterdir():
        (orphan / path.name).write_bytes(path.read_bytes())
    record = (orphan / "CONVERSION.md").read_text().replace(str(TEACHERS_DIR / "gqa"), str(tmp_path / "gone"))
    (orphan / "CONVERSION.md").write_text(record)
    err = refused([str(orphan), str(out), *SMALL], capsys, tmp_path)
    assert "is not there" in err and "--source" in err
    (orphan / "CONVERSION.md").unlink()
    err = refused([str(orphan), str(out), *SMALL], capsys, tmp_path)
    assert "has no CONVERSION.md" in err
    err = refused([str(converted_dir), str(out), "--source", str(tmp_path / "gone"), *SMALL], capsys, tmp_path)
    assert "does not exist" in err
    err = refused([str(converted_dir), str(out), "--mode", "all", *SMALL], capsys, tmp_path)
    assert "--mode" in err and "layerwise" in err
    err = refused([str(converted_dir), str(out), *SMALL, "--steps", "0"], capsys, tmp_path)
    assert "--steps must be a positive integer" in err
    err = refused([str(converted_dir), str(converted_dir), *SMALL, "--overwrite"], capsys, tmp_path)
    assert "is the input" in err
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = refused([str(converted_dir), str(out), *SMALL], capsys, tmp_path)
    assert "exists and is not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    if not torch.cuda.is_available():
        err = refused([str(converted_dir), str(tmp_path / "gpu"), *SMALL, "--device", "cuda"], capsys, tmp_path)
        assert "no CUDA device" in err


def test_python_m_mla_ref_lists_and_runs_recover(converted_dir, tmp_path, capsys):
    assert mla_ref_main(["--help"]) == 0
    assert "recover" in capsys.readouterr().out
    assert mla_ref_main(["recover", str(converted_dir), str(tmp_path / "out"), *SMALL, "--steps", "0"]) == 2
    assert "--steps must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_both_phases_share_the_time_limit(converted_dir, tmp_path):
    """--mode both with --minutes: each phase is cut short, and the training stays within the limit."""
    options = RecoverOptions(
        mode="both", minutes=0.1, steps=100_000, distill_steps=100_000, tokens=16 * SEQ, batch_tokens=4 * SEQ,
        distill_batch_tokens=4 * SEQ, seq_len=SEQ, eval_tokens=4 * SEQ,
    )  # fmt: skip
    report = recover_checkpoint(converted_dir, tmp_path / "out", options)
    assert report.layerwise.time_limited and report.distill.time_limited
    assert report.layerwise.steps > 0 and report.distill.steps > 0
    # 6 s in all; a step and the last layer's measurement may run past it on a busy CPU
    assert report.facts["train_wall_seconds"] < 6.0 + 2.0, report.facts["train_wall_seconds"]
    record = read_record(tmp_path / "out" / "RECOVERY.md")
    assert record["layerwise"]["time_limited"] and record["distill"]["time_limited"]


def test_the_layerwise_share_follows_the_work_of_each_phase(converted_dir):
    model = load_model(converted_dir)
    share = layerwise_share(model, RecoverOptions(mode="both", steps=100, distill_steps=100))
    assert 0 < share < 1
    # twice the layerwise steps: twice its work against the same distillation work, w / (w + d) with w doubled
    doubled = layerwise_share(model, RecoverOptions(mode="both", steps=200, distill_steps=100))
    assert doubled == pytest.approx(2 * share / (1 + share), rel=1e-12)


def test_a_recovery_that_makes_the_model_worse_is_refused(converted_dir, tmp_path, capsys):
    """A learning rate far too large for distillation wrecks the model: nothing is written, unless --force."""
    wreck = [
        "--mode",
        "distill",
        "--distill-lr",
        "0.05",
        "--distill-steps",
        "4",
        "--distill-batch-tokens",
        str(4 * SEQ),
    ]
    err = refused([str(converted_dir), str(tmp_path / "out"), *SMALL, *wreck], capsys, tmp_path)
    assert "further from its source than the converted one on 128 held-back calibration tokens" in err
    assert "--force" in err
    forced = tmp_path / "forced"
    assert main([str(converted_dir), str(forced), *SMALL, *wreck, "--force"]) == 0
    text = (forced / "RECOVERY.md").read_text()
    assert text.splitlines()[2].startswith("**Warning: the recovered model is further from its source")
    record = read_record(forced / "RECOVERY.md")
    assert record["check"]["recovered"]["kl_to_teacher"] > record["check"]["converted"]["kl_to_teacher"]


def test_too_few_calibration_windows_are_refused(converted_dir, tmp_path, capsys):
    err = refused([str(converted_dir), str(tmp_path / "out"), *SMALL, "--tokens", str(4 * SEQ)], capsys, tmp_path)
    assert "gives 4 windows of 64; at least 8 are needed" in err


def test_an_mla_ref_conversion_is_recovered_into_the_same_format(tmp_path):
    converted = tmp_path / "converted"
    options = ConvertOptions(budget=0.25, calib_tokens=512, eval_tokens=0, seq_len=SEQ, format="mla-ref")  # as above
    convert_checkpoint(TEACHERS_DIR / "gqa", converted, options)
    out = tmp_path / "recovered"
    report = recover_checkpoint(converted, out, RecoverOptions(tokens=16 * SEQ, steps=6, batch_tokens=4 * SEQ,
                                                               seq_len=SEQ, eval_tokens=4 * SEQ))  # fmt: skip
    assert report.facts["format"] == "mla-ref" and not (out / "checkpoint").exists()
    assert "model_type" not in json.loads((out / "config.json").read_text())  # mla_ref's own config, not a HF one
    reloaded = load_model(out).state_dict()
    for name, tensor in report.model.state_dict().items():
        torch.testing.assert_close(reloaded[name], tensor, rtol=0, atol=0, msg=name)

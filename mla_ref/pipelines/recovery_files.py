"""The directories a recovery reads and writes: SRC found and checked, CONVERTED's format and what that format cannot
hold, the tokenizer both must share, and OUT written in CONVERTED's format (``mla_ref.pipelines.recover``)."""

from __future__ import annotations

from pathlib import Path

from mla_ref.hf.deepseek import MLA_MODEL_TYPE
from mla_ref.hf.files import copy_carried_files, read_config, write_json
from mla_ref.hf.models import save_mla_weights
from mla_ref.model import TinyLM
from mla_ref.outputs import staged_output
from mla_ref.pipelines.recovery_record import RECOVERY_RECORD
from mla_ref.provenance import check_source, recorded_source
from mla_ref.records import CONVERSION_RECORD


def find_source(converted: Path, given: str | None) -> Path:
    """The source to recover towards: ``given`` (--source), else the one CONVERTED's CONVERSION.md records by its
    absolute path; either is checked against the fingerprint the record holds (``mla_ref.provenance``)."""
    recorded_path, expected = recorded_source(converted)
    if given is not None:
        source = Path(given)
    elif recorded_path is None:
        raise ValueError(
            f"{str(converted)!r} has no {CONVERSION_RECORD} naming its source by an absolute path; pass --source SRC "
            "(the model it was converted from)"
        )
    elif not (recorded_path / "config.json").is_file():
        raise ValueError(
            f"the source {str(recorded_path)!r} recorded in {str(converted / CONVERSION_RECORD)!r} is not there "
            "(no config.json); pass --source SRC"
        )
    else:
        source = recorded_path
    read_config(source)  # a clear error for a missing directory or config.json
    check_source(converted, source, expected)
    return source


def written_format(converted: Path, model: TinyLM) -> str:
    """ "deepseek-v3" or "mla-ref": how CONVERTED is stored, and so how OUT will be."""
    model_type = read_config(converted).get("model_type")
    if model.config.attention != "mla":
        raise ValueError(
            f"{str(converted)!r} is not an MLA model (its attention is {model.config.attention!r}); recover trains "
            "what `python -m mla_ref convert` wrote"
        )
    if model_type == MLA_MODEL_TYPE:
        return "deepseek-v3"
    if model_type is None:
        return "mla-ref"
    raise ValueError(f"{str(converted)!r}: model_type {model_type!r} is not an MLA format; allowed: {MLA_MODEL_TYPE}")


def kept_parameters(model: TinyLM, model_format: str) -> tuple[str, ...]:
    """Attention parameters the output format cannot hold when changed: stock DeepSeek-V3 has no q_proj bias."""
    if model_format != "deepseek-v3":
        return ()
    names = dict(model.layers[0].self_attn.named_parameters())
    return ("q_proj.bias",) if "q_proj.bias" in names else ()


def same_tokenizer(a: Path, b: Path) -> None:
    """Refuse a source and a converted model that read text differently (their tokenizer.json files differ)."""
    ta, tb = a / "tokenizer.json", b / "tokenizer.json"
    if ta.is_file() != tb.is_file() or (ta.is_file() and ta.read_bytes() != tb.read_bytes()):
        raise ValueError(
            f"{str(a)!r} and {str(b)!r} do not share a tokenizer.json; the source must be the model CONVERTED was "
            "converted from"
        )


def write_output(
    output: Path, student: TinyLM, converted: Path, source: Path, model_format: str, dtype, markdown: str, overwrite
) -> None:
    """OUT in CONVERTED's format, with RECOVERY.md, CONVERTED's CONVERSION.md and the source's tokenizer files."""
    with staged_output(output, overwrite=overwrite) as staging:
        if model_format == "deepseek-v3":
            # the architecture is CONVERTED's, so its config.json (token ids and positions included) still holds
            write_json(staging / "config.json", read_config(converted))
        save_mla_weights(student, staging, model_format, dtype)
        carried = copy_carried_files(source, staging)
        if not carried:  # a source without tokenizer files: CONVERTED carries the same ones, if any
            copy_carried_files(converted, staging)
        if (converted / CONVERSION_RECORD).is_file():
            (staging / CONVERSION_RECORD).write_bytes((converted / CONVERSION_RECORD).read_bytes())
        (staging / RECOVERY_RECORD).write_text(markdown, encoding="utf-8")

"""Recovering a converted checkpoint directory: CONVERTED trained back towards its source, written as CONVERTED is.

    CONVERTED (written by ``convert``)   SRC (its source, named in CONVERTED's CONVERSION.md unless given)
        │  calibration: windows spread evenly over the corpus's train split (the text ``convert`` calibrates on)
        │  layerwise: each attention layer trained to reproduce the source layer on the source's own inputs
        │  distill:   then (or instead) the whole source distilled into the attention layers
        ▼
    OUT: CONVERTED's format (stock DeepSeek-V3, or mla_ref's own), RECOVERY.md, CONVERSION.md and the tokenizer
         files carried over; written only when complete.

Before OUT is written, the recovered model is compared with CONVERTED on the last eighth of the calibration windows,
which no phase trains on: a recovery that leaves the model further from its source there (KL per token) is refused
and nothing is written, unless forced — on SmolLM2 at 12.5% of its cache, every layer's own error fell while the
whole model got worse.  Perplexity and KL to the source are then measured on the validation split (the text
``convert`` reports on) for the model as it came and as written.  ``python -m mla_ref recover`` (``mla_ref.cli.recover``) is the command.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from mla_ref._checks import require_choice, require_number, require_positive_int, resolve_device
from mla_ref.data import load_corpus
from mla_ref.hf.deepseek import MLA_MODEL_TYPE
from mla_ref.hf.files import copy_carried_files, read_config, write_json
from mla_ref.hf.models import load_model, save_mla_weights, storage_dtype
from mla_ref.model import TinyLM
from mla_ref.outputs import check_output, staged_output
from mla_ref.pipelines.calibration import first_windows, spread_windows
from mla_ref.pipelines.recovery_record import RECOVERY_RECORD, recovery_markdown
from mla_ref.provenance import check_source, recorded_source, source_facts
from mla_ref.records import CONVERSION_RECORD
from mla_ref.recovery.distill import Comparison, DistillResult, compare_with_teacher, recover_distill
from mla_ref.recovery.layerwise import CHECK_FRACTION, LayerwiseResult, recover_layerwise

MODES: tuple[str, ...] = ("layerwise", "distill", "both")
DEVICES: tuple[str, ...] = ("cpu", "cuda")
CALIBRATION_PIECES = 16  # evenly spaced stretches of the train split the calibration windows come from
HELD_OUT_TOKENS = 2048  # validation tokens on which each layer's error is also measured (layerwise)
CHECK_TOLERANCE = 1e-3  # relative KL slack of the check before writing: rounding, not a worse model
DISTILL_ALPHA, DISTILL_TEMPERATURE = 0.5, 2.0  # recovery_config's: half next-token CE, half softened KL


# ---- inputs ---------------------------------------------------------------------------------------------------------
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


# ---- writing and training -------------------------------------------------------------------------------------------
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


@dataclasses.dataclass
class RecoverOptions:
    """What ``recover_checkpoint`` does; the defaults are the command line's."""

    source: str | None = None  # None: the source CONVERTED's CONVERSION.md names
    mode: str = "layerwise"  # one of MODES
    tokens: int = 32768  # calibration tokens from the train split
    steps: int = 300  # layerwise steps per layer
    lr: float = 1e-3  # layerwise peak learning rate
    batch_tokens: int = 1024  # token positions per layerwise batch (whole windows)
    first_weight: float = 1.0  # layerwise: weight of the windows' first position (the attention sink) in the loss
    distill_steps: int = 100
    distill_lr: float = 3e-5
    distill_batch_tokens: int = 1024
    minutes: float | None = None  # wall-clock limit on the training
    device: str = "cpu"
    calib_dir: str | None = None  # None: the Python standard library
    eval_tokens: int = 8192  # validation tokens for perplexity and KL
    seq_len: int = 256
    seed: int = 0

    def __post_init__(self):
        require_choice("mode", self.mode, MODES)
        require_choice("device", self.device, DEVICES)
        # each value named as the command line names it
        for name in ("tokens", "steps", "batch_tokens", "distill_steps", "distill_batch_tokens", "eval_tokens"):
            require_positive_int(f"--{name.replace('_', '-')}", getattr(self, name))
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"--seq-len must be an integer of at least 2, got {self.seq_len!r}")
        require_number("--lr", self.lr, lambda v: 0 < v < 1, "lie in (0, 1)")
        require_number("--distill-lr", self.distill_lr, lambda v: 0 < v < 1, "lie in (0, 1)")
        require_number("--first-weight", self.first_weight, lambda w: w >= 0, "be a non-negative number")
        if self.minutes is not None:
            require_number("--minutes", self.minutes, lambda m: m > 0, "be a positive number")


class RecoveryWorseError(ValueError):
    """The recovered model is further from its source than CONVERTED was, on the check windows; nothing written."""

    def __init__(self, message: str, converted_kl: float, recovered_kl: float, n_tokens: int):
        super().__init__(message)
        self.converted_kl, self.recovered_kl, self.n_tokens = converted_kl, recovered_kl, n_tokens


def check_recovered(check: dict[str, Comparison], *, force: bool) -> str | None:
    """Refuse (``RecoveryWorseError``) a recovered model whose KL to the source on the check windows is above
    CONVERTED's, unless ``force``; returns the warning RECOVERY.md opens with when forced through, else None.

    ``check``: ``compare_with_teacher``'s result on the check windows, with "converted" and "recovered".  A layer
    put back as it was (``recover_layerwise``) differs from CONVERTED by fp32 rounding after ``balance_latent``, so
    a recovery that changed nothing passes: ``CHECK_TOLERANCE`` of relative slack.
    """
    before, after = check["converted"].kl_to_teacher, check["recovered"].kl_to_teacher
    if after <= before * (1 + CHECK_TOLERANCE):
        return None
    message = (
        f"the recovered model is further from its source than the converted one on {check['converted'].tokens:,} "
        f"held-back calibration tokens (KL to the source {before:.4g} -> {after:.4g} nats/token): training each "
        "layer lowered its own error but not the model's; try fewer --steps, a lower --lr or --mode distill"
    )
    if not force:
        raise RecoveryWorseError(
            message + "; --force writes it anyway. Nothing was written.", before, after, check["converted"].tokens
        )
    return message + "; written anyway because of --force."


@dataclasses.dataclass
class RecoveryReport:
    """What ``recover_checkpoint`` did: the trained model (as written), the facts of RECOVERY.md, the quality."""

    model: TinyLM  # the recovered model, its weights rounded to the storage dtype: what OUT holds
    facts: dict  # RECOVERY.md's record
    quality: dict[str, Comparison]  # "source", "converted", "recovered"
    check: dict[str, Comparison]  # the same on the check windows (held back from training), which decided the write
    layerwise: LayerwiseResult | None
    distill: DistillResult | None
    seconds: float


def _check_paths(converted: Path, output: Path, options: RecoverOptions, overwrite: bool) -> Path:
    """Refuse, before any work, a bad CONVERTED, SRC or OUT; returns SRC."""
    read_config(converted)  # a clear error for a missing directory or config.json
    source = find_source(converted, options.source)
    if source.resolve() == converted.resolve():
        raise ValueError(f"--source {str(source)!r} is CONVERTED itself; pass the model it was converted from")
    check_output(output, inputs=[converted, source, options.calib_dir], overwrite=overwrite)
    resolve_device(options.device, name="--device")
    same_tokenizer(source, converted)
    return source


def recover_checkpoint(
    converted_dir,
    output_dir,
    options: RecoverOptions | None = None,
    *,
    overwrite: bool = False,
    force: bool = False,
    quiet: bool = True,
    command: str | None = None,
    log=None,
) -> RecoveryReport:
    """Recover the converted model in ``converted_dir`` into ``output_dir`` (see the module docstring).

    ``converted_dir`` and its source are never modified; ``output_dir`` appears only when complete, and an
    existing one is refused unless ``overwrite``.  ``log`` gets one line of text per step worth reporting.
    """
    options = options or RecoverOptions()
    log = log or (lambda line: None)
    converted, output = Path(converted_dir), Path(output_dir)
    source = _check_paths(converted, output, options, overwrite)
    student = load_model(converted)
    model_format = written_format(converted, student)
    dtype = storage_dtype(converted)
    teacher = load_model(source)
    keep = kept_parameters(student, model_format)
    corpus = load_corpus(options.calib_dir)
    vocab, seq_len = student.config.vocab_size, options.seq_len
    windows = spread_windows(converted, corpus.train, vocab, options.tokens, seq_len, CALIBRATION_PIECES)
    n_check = len(windows) // CHECK_FRACTION  # the last windows: trained on by no phase, they decide the write
    if not n_check:
        raise ValueError(
            f"--tokens {options.tokens} gives {len(windows)} windows of {seq_len}; at least {CHECK_FRACTION} are "
            f"needed (the last 1/{CHECK_FRACTION} check the result): raise --tokens"
        )
    evaluation = first_windows(converted, corpus.val, vocab, options.eval_tokens, seq_len)  # (m, s + 1)
    log(
        f"calibration {windows.shape[0]} windows of {seq_len} tokens; evaluation {evaluation.shape[0]} windows; "
        f"training {options.mode} on {options.device}"
    )
    facts = {
        "converted": str(converted),
        "source": str(source),
        **source_facts(source),
        "source_checked": recorded_source(converted)[1] is not None,
        "command": command or f"recover_checkpoint({str(converted)!r}, {str(output)!r})",
        "options": dataclasses.asdict(options),
        "mode": options.mode,
        "kept": list(keep),
        "device": options.device,
        "format": model_format,
        "dtype": str(dtype).removeprefix("torch."),
        "calibration": f"{windows.shape[0] * seq_len:,} tokens of the train split of {corpus.root}, "
        f"{windows.shape[0]} windows of {seq_len} from {min(CALIBRATION_PIECES, windows.shape[0])} evenly "
        f"spaced stretches; the last {n_check} windows are trained on by no phase and check the result",
    }
    limit = None if options.minutes is None else 60.0 * options.minutes
    start, cpu_start = time.perf_counter(), time.process_time()
    layerwise = None
    if options.mode in ("layerwise", "both"):
        share = limit
        if limit is not None and options.mode == "both":
            share = limit * layerwise_share(student, options)
        layerwise = recover_layerwise(
            student,
            teacher,
            windows[:, :-1],
            steps=options.steps,
            lr=options.lr,
            batch_tokens=options.batch_tokens,
            device=options.device,
            quiet=quiet,
            time_limit_s=share,
            held_out=evaluation[: max(1, HELD_OUT_TOKENS // seq_len), :-1],
            keep=keep,
            seed=options.seed,
            first_weight=options.first_weight,
            log=log,
        )
        facts["layerwise"] = {
            "steps_per_layer": options.steps,
            "lr": options.lr,
            "batch_tokens": options.batch_tokens,
            "first_weight": options.first_weight,
            **{k: v for k, v in dataclasses.asdict(layerwise).items() if k != "layers"},
            "steps": layerwise.steps,
            "layers": [dataclasses.asdict(layer) for layer in layerwise.layers],
        }
    distill = None
    if options.mode in ("distill", "both"):
        left = None if limit is None else max(1.0, limit - (time.perf_counter() - start))
        distill = recover_distill(
            student,
            teacher,
            windows[:-n_check],
            steps=options.distill_steps,
            lr=options.distill_lr,
            batch_tokens=options.distill_batch_tokens,
            device=options.device,
            quiet=quiet,
            time_limit_s=left,
            keep=keep,
            alpha=DISTILL_ALPHA,
            temperature=DISTILL_TEMPERATURE,
            seed=options.seed,
        )
        facts["distill"] = {
            "lr": options.distill_lr,
            "batch_tokens": options.distill_batch_tokens,
            "alpha": DISTILL_ALPHA,
            "temperature": DISTILL_TEMPERATURE,
            **dataclasses.asdict(distill),
        }
        log(f"distill: loss {distill.first_loss:.4f} -> {distill.last_loss:.4f} in {distill.steps} steps")
    facts["train_wall_seconds"] = time.perf_counter() - start
    facts["train_cpu_seconds"] = time.process_time() - cpu_start

    student = student.to(dtype).float().eval()  # measured as it will be stored: rounded to the storage dtype
    models = {"converted": load_model(converted), "recovered": student}
    check = compare_with_teacher(teacher, models, windows[-n_check:], device=options.device)
    check = {"source": check.pop("teacher"), **check}
    facts["check"] = {name: dataclasses.asdict(q) for name, q in check.items()}
    facts["warning"] = check_recovered(check, force=force)
    quality = compare_with_teacher(teacher, models, evaluation, device=options.device)
    quality = {"source": quality.pop("teacher"), **quality}
    facts["evaluation"] = (
        f"{evaluation.shape[0] * seq_len:,} tokens of the validation split of {corpus.root}, windows of {seq_len}"
    )
    facts["quality"] = {name: dataclasses.asdict(q) for name, q in quality.items()}
    markdown = recovery_markdown(facts, layerwise, quality)
    write_output(output, student, converted, source, model_format, dtype, markdown, overwrite)
    return RecoveryReport(student, facts, quality, check, layerwise, distill, time.perf_counter() - start)


def layerwise_share(model: TinyLM, options: RecoverOptions) -> float:
    """The part of a --mode both time limit that goes to the layerwise phase: its estimated share of the work.

    Work is counted in multiply-adds per token position: a distillation step runs the teacher forward and the
    student forward and backward (≈ 4 × the model's parameters, the backward through the frozen weights included);
    a layerwise step runs one attention layer forward and backward on its batch for every layer, ≈ 3 × its
    parameters plus the scores over the window, counted as 5 × its parameters (measured on SmolLM2, one thread:
    0.135 CPU-s per layer for a layerwise step of 1,024 tokens, 13.8 CPU-s for a distillation step).
    """
    attention = sum(p.numel() for p in model.layers[0].self_attn.parameters())
    layerwise = options.steps * options.batch_tokens * model.config.n_layers * 5 * attention
    distill = options.distill_steps * options.distill_batch_tokens * 4 * model.num_parameters()
    return layerwise / (layerwise + distill)

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
``convert`` reports on) for the model as it came and as written.

``python -m mla_ref recover`` (``mla_ref.cli.recover``) is the command; ``recovery_files`` finds SRC and writes OUT,
``recovery_record`` writes RECOVERY.md.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from mla_ref._checks import require_choice, require_number, require_positive_int, resolve_device
from mla_ref.data import Corpus, load_corpus
from mla_ref.hf.files import read_config
from mla_ref.hf.models import load_model, storage_dtype
from mla_ref.model import TinyLM
from mla_ref.outputs import check_output
from mla_ref.pipelines.calibration import first_windows, spread_windows
from mla_ref.pipelines.recovery_files import find_source, kept_parameters, same_tokenizer, write_output, written_format
from mla_ref.pipelines.recovery_record import recovery_markdown
from mla_ref.provenance import recorded_source, source_facts
from mla_ref.recovery.distill import Comparison, DistillResult, compare_with_teacher, recover_distill
from mla_ref.recovery.layerwise import CHECK_FRACTION, LayerwiseResult, recover_layerwise

MODES: tuple[str, ...] = ("layerwise", "distill", "both")
DEVICES: tuple[str, ...] = ("cpu", "cuda")
CALIBRATION_PIECES = 16  # evenly spaced stretches of the train split the calibration windows come from
HELD_OUT_TOKENS = 2048  # validation tokens on which each layer's error is also measured (layerwise)
CHECK_TOLERANCE = 1e-3  # relative KL slack of the check before writing: rounding, not a worse model
DISTILL_ALPHA, DISTILL_TEMPERATURE = 0.5, 2.0  # recovery_config's: half next-token CE, half softened KL


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

    read the inputs → train (layerwise, distill or both) → measure against the source (the check windows decide
    whether OUT is written) → write OUT.  ``converted_dir`` and its source are never modified; ``output_dir``
    appears only when complete, and an existing one is refused unless ``overwrite``.  ``log`` gets one line of text
    per step worth reporting.
    """
    options = options or RecoverOptions()
    log = log or (lambda line: None)
    converted, output = Path(converted_dir), Path(output_dir)
    job = _read_inputs(converted, output, options, overwrite)
    log(
        f"calibration {job.windows.shape[0]} windows of {options.seq_len} tokens; evaluation "
        f"{job.evaluation.shape[0]} windows; training {options.mode} on {options.device}"
    )
    facts = _input_facts(job, converted, options, command or f"recover_checkpoint({str(converted)!r}, {str(output)!r})")
    start = time.perf_counter()
    layerwise, distill = _train(job, options, facts, quiet, log)
    recovered = job.student.to(job.dtype).float().eval()  # measured as it will be stored: rounded to the storage dtype
    models = {"converted": load_model(converted), "recovered": recovered}
    check = _against_source(job.teacher, models, job.windows[-job.n_check :], options.device)
    facts["check"] = {name: dataclasses.asdict(q) for name, q in check.items()}
    facts["warning"] = check_recovered(check, force=force)  # raises RecoveryWorseError unless it passes or is forced
    quality = _against_source(job.teacher, models, job.evaluation, options.device)
    facts["evaluation"] = (
        f"{job.evaluation.shape[0] * options.seq_len:,} tokens of the validation split of {job.corpus.root}, "
        f"windows of {options.seq_len}"
    )
    facts["quality"] = {name: dataclasses.asdict(q) for name, q in quality.items()}
    markdown = recovery_markdown(facts, layerwise, quality)
    write_output(output, recovered, converted, job.source, job.model_format, job.dtype, markdown, overwrite)
    return RecoveryReport(recovered, facts, quality, check, layerwise, distill, time.perf_counter() - start)


@dataclasses.dataclass
class _Inputs:
    """What ``recover_checkpoint`` reads before it trains."""

    source: Path  # SRC
    student: TinyLM  # CONVERTED's model, trained in place
    teacher: TinyLM  # SRC's model
    model_format: str  # how CONVERTED is stored, and OUT will be: "deepseek-v3" or "mla-ref"
    dtype: torch.dtype  # CONVERTED's storage dtype
    keep: tuple[str, ...]  # attention parameters the format cannot hold when changed
    corpus: Corpus
    windows: torch.Tensor  # (n, s + 1) calibration windows from the train split
    n_check: int  # the last windows: trained on by no phase, they decide the write
    evaluation: torch.Tensor  # (m, s + 1) windows of the validation split


def _read_inputs(converted: Path, output: Path, options: RecoverOptions, overwrite: bool) -> _Inputs:
    """Refuse, before any work, a bad CONVERTED, SRC, OUT or device; then load both models and cut the windows."""
    read_config(converted)  # a clear error for a missing directory or config.json
    source = find_source(converted, options.source)
    if source.resolve() == converted.resolve():
        raise ValueError(f"--source {str(source)!r} is CONVERTED itself; pass the model it was converted from")
    check_output(output, inputs=[converted, source, options.calib_dir], overwrite=overwrite)
    resolve_device(options.device, name="--device")
    same_tokenizer(source, converted)
    student = load_model(converted)
    model_format = written_format(converted, student)
    dtype = storage_dtype(converted)
    teacher = load_model(source)
    corpus = load_corpus(options.calib_dir)
    vocab, seq_len = student.config.vocab_size, options.seq_len
    windows = spread_windows(converted, corpus.train, vocab, options.tokens, seq_len, CALIBRATION_PIECES)
    n_check = len(windows) // CHECK_FRACTION
    if not n_check:
        raise ValueError(
            f"--tokens {options.tokens} gives {len(windows)} windows of {seq_len}; at least {CHECK_FRACTION} are "
            f"needed (the last 1/{CHECK_FRACTION} check the result): raise --tokens"
        )
    evaluation = first_windows(converted, corpus.val, vocab, options.eval_tokens, seq_len)  # (m, s + 1)
    keep = kept_parameters(student, model_format)
    return _Inputs(source, student, teacher, model_format, dtype, keep, corpus, windows, n_check, evaluation)


def _input_facts(job: _Inputs, converted: Path, options: RecoverOptions, command: str) -> dict:
    """RECOVERY.md's record of what the recovery starts from; the phases and measurements add theirs."""
    n, seq_len = job.windows.shape[0], options.seq_len
    return {
        "converted": str(converted),
        "source": str(job.source),
        **source_facts(job.source),
        "source_checked": recorded_source(converted)[1] is not None,
        "command": command,
        "options": dataclasses.asdict(options),
        "mode": options.mode,
        "kept": list(job.keep),
        "device": options.device,
        "format": job.model_format,
        "dtype": str(job.dtype).removeprefix("torch."),
        "calibration": f"{n * seq_len:,} tokens of the train split of {job.corpus.root}, {n} windows of {seq_len} "
        f"from {min(CALIBRATION_PIECES, n)} evenly spaced stretches; the last {job.n_check} windows are trained on "
        "by no phase and check the result",
    }


def _train(
    job: _Inputs, options: RecoverOptions, facts: dict, quiet: bool, log
) -> tuple[LayerwiseResult | None, DistillResult | None]:
    """The training phases ``options.mode`` asks for, layerwise first; each adds its facts to ``facts``.

    With --minutes and --mode both, the layerwise phase gets its estimated share of the work (``layerwise_share``)
    and distillation what is left.
    """
    limit = None if options.minutes is None else 60.0 * options.minutes
    start, cpu_start = time.perf_counter(), time.process_time()
    layerwise = distill = None
    if options.mode in ("layerwise", "both"):
        share = limit
        if limit is not None and options.mode == "both":
            share = limit * layerwise_share(job.student, options)
        layerwise = _layerwise_phase(job, options, share, quiet, log)
        facts["layerwise"] = {
            "steps_per_layer": options.steps,
            "lr": options.lr,
            "batch_tokens": options.batch_tokens,
            "first_weight": options.first_weight,
            **{k: v for k, v in dataclasses.asdict(layerwise).items() if k != "layers"},
            "steps": layerwise.steps,
            "layers": [dataclasses.asdict(layer) for layer in layerwise.layers],
        }
    if options.mode in ("distill", "both"):
        left = None if limit is None else max(1.0, limit - (time.perf_counter() - start))
        distill = _distill_phase(job, options, left, quiet)
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
    return layerwise, distill


def _layerwise_phase(job: _Inputs, options: RecoverOptions, time_limit_s, quiet: bool, log) -> LayerwiseResult:
    """Each attention layer against its source layer on every calibration window (the last eighth checks each
    layer), its error also measured on the first validation windows."""
    return recover_layerwise(
        job.student,
        job.teacher,
        job.windows[:, :-1],
        steps=options.steps,
        lr=options.lr,
        batch_tokens=options.batch_tokens,
        device=options.device,
        quiet=quiet,
        time_limit_s=time_limit_s,
        held_out=job.evaluation[: max(1, HELD_OUT_TOKENS // options.seq_len), :-1],
        keep=job.keep,
        seed=options.seed,
        first_weight=options.first_weight,
        log=log,
    )


def _distill_phase(job: _Inputs, options: RecoverOptions, time_limit_s, quiet: bool) -> DistillResult:
    """The whole source distilled into the attention layers, on the calibration windows less the check windows."""
    return recover_distill(
        job.student,
        job.teacher,
        job.windows[: -job.n_check],
        steps=options.distill_steps,
        lr=options.distill_lr,
        batch_tokens=options.distill_batch_tokens,
        device=options.device,
        quiet=quiet,
        time_limit_s=time_limit_s,
        keep=job.keep,
        alpha=DISTILL_ALPHA,
        temperature=DISTILL_TEMPERATURE,
        seed=options.seed,
    )


def _against_source(teacher: TinyLM, models: dict[str, TinyLM], windows, device: str) -> dict[str, Comparison]:
    """Perplexity and KL to the source of the source itself and of ``models`` on ``windows`` (n, s + 1)."""
    measured = compare_with_teacher(teacher, models, windows, device=device)
    return {"source": measured.pop("teacher"), **measured}


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

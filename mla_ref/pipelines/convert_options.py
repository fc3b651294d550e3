"""What ``convert`` is asked to do (``ConvertOptions``), and every check of it that can be made before any work.

``plan_conversion`` refuses, with one clear error, whatever would fail later — an output format that cannot hold
the asked dtype, a missing text folder, sizes the source cannot take, a d_R the one RoPE table of a DeepSeek-V3
config cannot hold, too few calibration tokens for the method — and returns the candidate sizes every layer will be
converted at (``mla_ref.convert.methods.base.plan_sizes``), reading nothing of the source but its config and first layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mla_ref import checkpoint
from mla_ref._checks import require_choice, require_non_negative_int, require_positive_int, resolve_device
from mla_ref.convert.methods import LOSSY_METHODS, METHODS
from mla_ref.convert.methods.base import PROFILES, plan_sizes
from mla_ref.convert.stock_form import NORM_MODES
from mla_ref.dtypes import DTYPES
from mla_ref.model import ModelConfig
from mla_ref.pipelines.calibration import CalibrationText

FORMATS: tuple[str, ...] = ("deepseek-v3", "mla-ref")


@dataclass
class ConvertOptions:
    """What ``convert_checkpoint`` does; the defaults are the command line's."""

    method: str | None = None  # a name in mla_ref.convert.METHODS; None: "recipe" when a size is given, else "exact"
    budget: float | None = None  # fraction of the source's cache per token; sizes then follow the method's rule
    kv_lora_rank: int | None = (
        None  # d_c; default: from the budget (half the source's cache), less d_R (not with a budget)
    )
    rope_dim: int | None = None  # d_R; default: the method's own rule
    profile: str | None = None  # "engine": the 512 + 64 latent that vLLM's and SGLang's MLA kernels accept
    q_lora_rank: int | None = None  # low-rank query bottleneck, or None for a full q_proj
    freqfold: int = 1  # TransMLA's FreqFold F (transmla, recipe)
    norm: str | None = None  # stock DeepSeek-V3's latent RMSNorm: "anchor" (exact, one element more) or "gain";
    # None: "anchor", or "gain" for --profile engine (the engines take no attention bias, which the anchor needs)
    force: bool = False  # write a DeepSeek-V3 form that is materially worse than the conversion (and say so)
    format: str = "deepseek-v3"
    dtype: str | None = None  # fp32 / bf16 / fp16; None: the source's storage dtype
    calib_dir: str | None = None  # folder of text (None: the Python standard library)
    calib_tokens: int = 16384  # one window of seq_len from each of as many stretches of the train split
    calib_extra_dir: str | None = None  # a second folder of text, read whole, its windows spaced among the first's
    calib_extra_tokens: int | None = None  # tokens from calib_extra_dir; None: as many as calib_tokens
    eval_tokens: int = 4096  # 0 skips the quality report (the written form is still checked on calibration text)
    seq_len: int = 256
    device: str = "cpu"  # where pass 1 converts each layer: "cpu", "cuda" or "cuda:N" (the rest streams on the CPU)

    def __post_init__(self):
        if self.norm is None:
            self.norm = "gain" if self.profile is not None else "anchor"
        if self.profile is not None:
            require_choice("profile", self.profile, PROFILES)
            if self.norm == "anchor":
                raise ValueError(
                    "--profile engine cannot use --norm anchor: the anchor is an attention bias, which the engines' "
                    "MLA kernels do not accept"
                )
            if self.kv_lora_rank is not None or self.rope_dim is not None or self.budget is not None:
                raise ValueError(
                    "--profile engine chooses d_c and d_R itself: drop --kv-lora-rank, --rope-dim, --budget"
                )
            if self.format != "deepseek-v3":
                raise ValueError(f"--profile engine needs --format deepseek-v3; got {self.format!r}")
        sized = any(v is not None for v in (self.kv_lora_rank, self.rope_dim, self.budget, self.profile))
        if self.method is None:
            self.method = "recipe" if sized else "exact"
        require_choice("method", self.method, tuple(METHODS))
        require_choice("format", self.format, FORMATS)
        require_choice("norm", self.norm, NORM_MODES)
        if self.dtype is not None:
            require_choice("dtype", self.dtype, tuple(DTYPES))
        for name in ("kv_lora_rank", "rope_dim", "q_lora_rank"):
            if getattr(self, name) is not None:
                (require_non_negative_int if name == "rope_dim" else require_positive_int)(name, getattr(self, name))
        require_positive_int("freqfold", self.freqfold)
        require_positive_int("calib_tokens", self.calib_tokens)
        if self.calib_extra_tokens is not None:
            if self.calib_extra_dir is None:
                raise ValueError("--calib-extra-tokens needs --calib-extra-dir, the folder they are taken from")
            require_positive_int("calib_extra_tokens", self.calib_extra_tokens)
        require_non_negative_int("eval_tokens", self.eval_tokens)
        require_positive_int("seq_len", self.seq_len)
        if self.method == "exact" and sized:
            raise ValueError(
                "method 'exact' keeps the source's cache (d_c = d_R = n_kv·d_h); --kv-lora-rank, --rope-dim, "
                f"--budget and --profile need a lossy method: {', '.join(LOSSY_METHODS)}"
            )
        if self.freqfold != 1 and "freqfold" not in METHODS[self.method].options:
            raise ValueError(f"--freqfold is TransMLA's (methods transmla, recipe); got method {self.method!r}")

    def method_options(self) -> dict:
        """The options of the chosen method's converter (e.g. TransMLA's freqfold)."""
        return {"freqfold": self.freqfold} if "freqfold" in METHODS[self.method].options else {}

    def reserved_elements(self) -> int:
        """Cache elements per token the written form adds to d_c + d_R: the anchored latent coordinate."""
        return 1 if self.format == "deepseek-v3" and self.norm == "anchor" else 0


def plan_conversion(options: ConvertOptions, source, calibration_text: CalibrationText | None = None) -> list[dict]:
    """Check ``options`` against ``source`` (``mla_ref.hf.sources.open_source``) before any work; return the
    candidate sizes of every layer (all layers share the first one's shape)."""
    _check_output_options(options)
    resolve_device(options.device, "--device")  # a GPU asked for where there is none: refused before any work
    if calibration_text is not None and options.calib_extra_dir is not None:
        raise ValueError("give calibration_text or a second calibration folder (calib_extra_dir), not both")
    for folder in (options.calib_dir, options.calib_extra_dir):
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"text folder {str(folder)!r} does not exist or is not a directory")
    first_attention = source.block(0).self_attn
    method = METHODS[options.method]
    candidate_sizes = plan_sizes(
        method,
        first_attention,
        budget=options.budget,
        kv_lora_rank=options.kv_lora_rank,
        rope_dim=options.rope_dim,
        reserve=options.reserved_elements(),
        profile=options.profile,
        **options.method_options(),
    )
    _check_one_rope_table(options, candidate_sizes, source.config)
    _check_calibration_amount(options, calibration_text, method.calibration_tokens_needed(first_attention))
    return candidate_sizes


def _check_output_options(options: ConvertOptions) -> None:
    """Refuse, before any work, what the chosen output format cannot hold."""
    if options.format != "mla-ref":
        return
    if options.dtype == "fp16":
        raise ValueError(f"--format mla-ref stores {', '.join(checkpoint.STORAGE_DTYPES)}; got dtype 'fp16'")


def _check_one_rope_table(options: ConvertOptions, candidate_sizes: list[dict], source_config: ModelConfig) -> None:
    """Refuse, before any work, a d_R that the one RoPE table of a DeepSeek-V3 config cannot hold exactly.

    The table turns d_R/2 pairs at distinct frequencies, and the source has d_h/2 of them: a d_R above d_h repeats
    a frequency, which the written form could only approximate (the guard would refuse it after the work).
    """
    if options.format != "deepseek-v3" or options.force:
        return
    head_dim = source_config.head_dim
    for sizes in candidate_sizes:
        rope_dim = sizes.get("rope_dim", 2 * sizes.get("rope_pairs", 0) * source_config.kv_heads)
        if rope_dim > head_dim and options.rope_dim is not None:
            raise ValueError(
                f"--rope-dim {rope_dim} is more than the source's head size d_h = {head_dim}: the one RoPE table of a "
                f"DeepSeek-V3 config turns each of the source's {head_dim // 2} frequencies once, so it holds at most "
                f"d_R = {head_dim}; choose --rope-dim {head_dim} or less, or --format mla-ref (which keeps any d_R), "
                "or --force to write the approximate table anyway"
            )


def _check_calibration_amount(options: ConvertOptions, calibration_text: CalibrationText | None, needed: int) -> None:
    """Refuse, before any work, fewer calibration tokens than the method needs (the recipe's output refit)."""
    if calibration_text is not None:
        given = calibration_text.windows.shape[0] * (calibration_text.windows.shape[1] - 1)
    else:
        windows = math.ceil(options.calib_tokens / options.seq_len)
        if options.calib_extra_dir is not None:
            windows += math.ceil((options.calib_extra_tokens or options.calib_tokens) / options.seq_len)
        given = windows * options.seq_len
    if given < needed:
        raise ValueError(
            f"method {options.method!r} needs at least {needed:,} calibration tokens for this source (its output "
            f"refit solves h·d_v weights per output, two tokens each), got {given:,}: raise --calib-tokens, or use "
            "a method without the refit (transmla)"
        )

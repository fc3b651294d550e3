"""Convert a whole checkpoint directory to MLA, one layer at a time, and measure what it cost.

    source (llama / qwen2 / mistral directory, or an mla_ref GQA-family checkpoint)
      │  pass 1, per layer: read the layer's tensors, run it on calibration and evaluation tokens,
      │          convert its attention by the chosen method (``mla_ref.convert.methods``) at every candidate
      │          split of the budget — the recipe tries two, the others one — and keep only the results
      │  then, with two candidates: run each whole converted model on the first calibration windows and keep
      │          the split with the lower KL to the source (``mla_ref.convert.split_choice``)
      ▼
    exact-form MLA layers (no latent norm, each key pair turning with its source frequency)
      │  pass 2, per layer: bring the layer into stock DeepSeek-V3 form (``mla_ref.convert.stock_form``) and run the
      │          converted and the stock stream on the evaluation tokens
      ▼
    OUT: DeepSeek-V3 layout (default) or mla_ref's own format, CONVERSION.md, the source's tokenizer files

Only one source layer is in memory at a time, beside the converted model (one per candidate split, each a small
part of the model: the attention layers): peak memory stays well under two copies of the model.  The hidden states of the source, the converted and the stock model are carried through
the layers side by side, so the quality report (max logit error, KL to the source, perplexity) needs no
second copy either.  OUT is written into a temporary folder beside it and renamed into place at the end.

Biases (Qwen2's q/k/v): a layer with biases is converted as the bias-free layer on [x; 1] — each bias is the
weight of a constant input — so every conversion method handles them; the biases come back as the MLA's
``q_proj`` / ``kv_a_proj_with_mqa`` biases (exact).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import TqdmExperimentalWarning, TqdmWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", (TqdmWarning, TqdmExperimentalWarning))
    from tqdm.auto import tqdm

from mla_ref import checkpoint
from mla_ref._checks import require_choice, require_non_negative_int, require_positive_int
from mla_ref.calculator import DTYPES
from mla_ref.convert.biased import convert_layer
from mla_ref.convert.methods import LOSSY_METHODS, METHODS
from mla_ref.convert.model import mla_config
from mla_ref.convert.sizes import PROFILES, plan_sizes
from mla_ref.convert.split_choice import SplitSearch
from mla_ref.convert.stock_form import (
    DEEPSEEK_NORM_EPS,
    NORM_MODES,
    anchor_constant,
    fit_norm,
    fit_rope_theta,
    input_bound,
    layer_table,
    low_rank_query,
    stock_mla,
)
from mla_ref.data import load_corpus, read_text_folder
from mla_ref.hf.build import block_from_state, tinylm_from_state
from mla_ref.hf.deepseek import deepseek_config
from mla_ref.hf.files import copy_carried_files, write_json
from mla_ref.hf.models import save_mla_weights
from mla_ref.hf.sources import open_source
from mla_ref.mla import MultiHeadLatentAttention
from mla_ref.model import ModelConfig
from mla_ref.outputs import check_output, staged_output
from mla_ref.pipelines.calibration import CalibrationText, calibration_windows, first_windows, interleave_windows
from mla_ref.pipelines.guard import GUARD_TOKENS, REFERENCE_FORM, WRITTEN_FORM, check_written_form
from mla_ref.pipelines.report import ConversionReport, Streams, describe_source
from mla_ref.pipelines.serving import serving_verdict
from mla_ref.provenance import source_facts
from mla_ref.records import CONVERSION_RECORD

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


# ---- the whole model ------------------------------------------------------------------------------------------
def _mla_config(source: ModelConfig, layers: list[MultiHeadLatentAttention], *, stock: bool) -> ModelConfig:
    return mla_config(source, layers, rope_tables=not stock)


def _block_state(attention: torch.nn.Module, rest: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**{f"self_attn.{k}": v for k, v in attention.state_dict().items()}, **rest}


def _rounded(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The module with its weights rounded to the storage dtype (computing stays fp32)."""
    return module.to(dtype).float()


def _check_output_options(options: ConvertOptions, source_config: ModelConfig) -> None:
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


def _release_freed_memory() -> None:
    """Hand memory freed by the last layer back to the operating system.

    glibc keeps freed blocks of up to tens of MB for reuse; over a model's layers those add up to several
    layers' worth of transients on top of the converted model.  ``malloc_trim`` returns them (elsewhere: no-op).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the enclosed work on one torch thread.

    Converting a layer means small dense algebra (eigen-decompositions of a few hundred rows), where the
    thread pool that serves the large matmuls only adds contention: on a busy 2-core machine an fp64
    ``eigh`` of 224 rows took ~1 s inside the pool's wake and ~3 ms on one thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Layers:
    """What pass 1 keeps of every layer: the exact-form attention, the rest of the block, and the stock fits."""

    attention: list  # exact-form MLA modules, at the output dtype
    rest: list[dict[str, torch.Tensor]]  # norms and MLP of each block, at the output dtype
    fits: list  # NormFit of each layer's latent (DeepSeek-V3 output only)
    bounds: list[float]  # input_bound of each layer's input norm


@torch.no_grad()
def _convert_layers(
    source, options: ConvertOptions, candidate_sizes: list[dict], dtype, hidden, n_calibration: int, quiet: bool
):
    """Pass 1: run the source layer by layer on ``hidden`` (calibration windows first), converting each layer at
    every candidate split of ``candidate_sizes`` (``SplitSearch``; one split unless the method measures its choice).

    Returns the rest of each block (``kept``, its attention still empty), the search holding every candidate's
    layers and fits, and the source's final hidden states.
    Shapes: hidden (n, s, D), fp32.
    """
    kept = _Layers([], [], [], [])
    search = SplitSearch(candidate_sizes)
    for i in tqdm(range(source.config.n_layers), desc="convert", disable=quiet, leave=False):
        block = source.block(i)
        calibration_inputs = block.input_layernorm(hidden[:n_calibration])  # (n_c, s, D): what the layer reads
        bound = input_bound(block.input_layernorm.weight)

        def convert(sizes: dict, attention=block.self_attn, inputs=calibration_inputs, bound=bound):
            module = convert_layer(attention, inputs, options.method, sizes)
            if options.q_lora_rank is not None:
                module = low_rank_query(module, inputs, options.q_lora_rank, mode=options.norm, bound=bound)
            return module

        def keep(module, inputs=calibration_inputs, bound=bound):
            fit = None
            if options.format == "deepseek-v3":
                d_c, down = module.kv_lora_rank, module.kv_a_proj_with_mqa
                latent = down(inputs)[..., :d_c].flatten(0, 1)  # (T, d_c), before any norm
                bias = None if down.bias is None else down.bias[:d_c]
                fit = fit_norm(latent, anchor=anchor_constant(down.weight[:d_c], bias, bound))
            return module.to(dtype), fit

        with _one_thread():
            search.add_layer(block.self_attn, calibration_inputs, convert, keep)
        hidden = block(hidden)
        kept.bounds.append(bound)
        kept.rest.append(
            {k: v.to(dtype).clone() for k, v in block.state_dict().items() if not k.startswith("self_attn.")}
        )
        del block, calibration_inputs
        _release_freed_memory()
    return kept, search, hidden


@torch.no_grad()
def _model_kl(config: ModelConfig, layers: list, rest: list, guard: Streams, source_hidden, embed, final_norm, head):
    """The whole converted model's KL to the source on the guard windows (calibration text), with ``layers`` (one
    candidate's kept (module, fit) per layer).  Shapes: source_hidden (n_guard, s, D), the source's final hidden
    states there."""
    streams = Streams(guard.inputs, guard.targets)
    streams.hidden["source"] = source_hidden
    modules = [module.float() for module, _ in layers]
    exact_config = _mla_config(config, modules, stock=False)
    hidden = F.embedding(guard.inputs, embed).float()
    for i, module in enumerate(modules):
        layer_rest = {name: tensor.float() for name, tensor in rest[i].items()}
        hidden = block_from_state(exact_config, i, _block_state(module, layer_rest))(hidden)
    streams.hidden["candidate"] = hidden
    return streams.quality(final_norm, head, config.norm_eps)["candidate"].kl_to_source


@torch.no_grad()
def _finish_layers(config: ModelConfig, kept: _Layers, options, dtype, rope_fit, all_streams, quiet: bool) -> list:
    """Pass 2: bring each layer into its written form and run the evaluation streams through it.

    Every ``Streams`` of ``all_streams`` is carried through the layer in both forms.  Returns the written
    attention modules (exact form for mla-ref, stock form for DeepSeek-V3), at ``dtype``;
    ``kept.attention`` is emptied as it goes, so one copy of the model is held.
    """
    stock = options.format == "deepseek-v3"
    exact_config = _mla_config(config, kept.attention, stock=False)
    stock_bias = exact_config.attention_bias or options.norm == "anchor"
    written = []
    for i in tqdm(range(config.n_layers), desc="evaluate", disable=quiet, leave=False):
        exact = kept.attention[i].float()
        kept.attention[i] = None
        rest = {k: v.float() for k, v in kept.rest[i].items()}
        layer = exact
        if stock:
            layer = stock_mla(
                exact, theta=rope_fit.theta, mode=options.norm, fit=kept.fits[i], bound=kept.bounds[i], bias=stock_bias
            )
            layer = _rounded(layer, dtype)  # evaluated as it will be stored
        exact_block = block_from_state(exact_config, i, _block_state(exact, rest))
        if stock:
            stock_config = _mla_config(config, [layer], stock=True)
            stock_block = block_from_state(
                stock_config, i, _block_state(layer, rest), latent_norm_eps=DEEPSEEK_NORM_EPS
            )
        for streams in all_streams:
            streams.hidden[REFERENCE_FORM] = exact_block(streams.hidden[REFERENCE_FORM])
            if stock:
                streams.hidden[WRITTEN_FORM] = stock_block(streams.hidden[WRITTEN_FORM])
        written.append(layer.to(dtype))
        del exact, rest, layer
        _release_freed_memory()
    return written


def _folder_calibration(source_root, corpus, options: ConvertOptions, vocab_size: int) -> tuple[torch.Tensor, str]:
    """Calibration windows (n, seq_len + 1) from the train split of ``corpus``, and from every text file of
    ``options.calib_extra_dir`` spaced evenly among them; and where they came from, in words for CONVERSION.md.

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


def convert_checkpoint(
    source_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    options: ConvertOptions | None = None,
    *,
    overwrite: bool = False,
    quiet: bool = True,
    command: str | None = None,
    calibration_text: CalibrationText | None = None,
) -> ConversionReport:
    """Convert ``source_dir`` into ``output_dir`` (see the module docstring); returns the report it wrote.

    ``source_dir`` is never modified; ``output_dir`` appears only when complete, and an existing one is
    refused unless ``overwrite``.  ``calibration_text``: windows to calibrate on in place of
    ``options.calib_tokens`` tokens of the calibration folder's train split (which then only gives the evaluation
    text): a mix of code and prose, say (``benchmarks/calibration_text.py``).
    """
    start = time.perf_counter()
    options = options or ConvertOptions()
    output = check_output(
        output_dir, inputs=[source_dir, options.calib_dir, options.calib_extra_dir], overwrite=overwrite
    )
    source = open_source(source_dir)
    config = source.config
    _check_output_options(options, config)
    if calibration_text is not None and options.calib_extra_dir is not None:
        raise ValueError("give calibration_text or a second calibration folder (calib_extra_dir), not both")
    for folder in (options.calib_dir, options.calib_extra_dir):
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"text folder {str(folder)!r} does not exist or is not a directory")
    # the sizes every layer will be converted at, from layer 0 (all layers share their shape): a size the source
    # cannot take is refused here, before the calibration text is read
    first_attention = source.block(0).self_attn
    candidate_sizes = plan_sizes(
        METHODS[options.method],
        first_attention,
        budget=options.budget,
        kv_lora_rank=options.kv_lora_rank,
        rope_dim=options.rope_dim,
        reserve=options.reserved_elements(),
        profile=options.profile,
        **options.method_options(),
    )
    _check_one_rope_table(options, candidate_sizes, config)
    _check_calibration_amount(
        options, calibration_text, METHODS[options.method].calibration_tokens_needed(first_attention)
    )
    dtype = DTYPES[options.dtype] if options.dtype else source.storage_dtype()
    dtype = dtype if dtype in DTYPES.values() else torch.float32
    stock = options.format == "deepseek-v3"

    # calibration windows (train split) and evaluation windows (validation split), as token ids
    corpus = load_corpus(options.calib_dir)
    if calibration_text is None:
        calibration, where = _folder_calibration(source.root, corpus, options, config.vocab_size)
    else:
        calibration = calibration_text.checked(config.vocab_size, options.seq_len)
        where = f"given by the caller: {calibration_text.description}"
    # the written form is checked against the conversion on (up to) the first GUARD_TOKENS calibration tokens
    n_guard = max(1, GUARD_TOKENS // options.seq_len)  # windows
    guard = Streams(calibration[:n_guard, :-1], calibration[:n_guard, 1:])
    calibration = calibration[:, :-1]  # (n_c, s): inputs only
    streams = None
    if options.eval_tokens:
        windows = first_windows(source.root, corpus.val, config.vocab_size, options.eval_tokens, options.seq_len)
        streams = Streams(windows[:, :-1], windows[:, 1:])
    inputs = calibration if streams is None else torch.cat([calibration, streams.inputs])

    embed = source.stored("embed_tokens.weight")  # (vocab, D) as stored: the largest tensor, kept once
    kept, search, hidden = _convert_layers(
        source, options, candidate_sizes, dtype, F.embedding(inputs, embed).float(), len(calibration), quiet
    )
    final_norm = source.tensor("norm.weight")
    head = embed if config.tie_embeddings else source.stored("lm_head.weight")
    guard_hidden = hidden[: len(guard.inputs)]
    search.choose(lambda _k, layers: _model_kl(config, layers, kept.rest, guard, guard_hidden, embed, final_norm, head))
    for module, fit in search.chosen():
        kept.attention.append(module)
        if fit is not None:
            kept.fits.append(fit)
    rope_fit = None
    if stock:  # the one RoPE table of the DeepSeek-V3 config
        hint = config.rope_theta ** (kept.attention[0].qk_rope_head_dim / config.head_dim)
        rope_fit = fit_rope_theta([layer_table(m) for m in kept.attention], options.seq_len, hint=hint)
    all_streams = [(guard, hidden[: len(guard.inputs)])]
    if streams is not None:
        all_streams.append((streams, hidden[len(calibration) :]))
    for each, source_hidden in all_streams:
        each.hidden["source"] = source_hidden
        each.hidden[REFERENCE_FORM] = F.embedding(each.inputs, embed).float()
        if stock:
            each.hidden[WRITTEN_FORM] = each.hidden[REFERENCE_FORM].clone()
    del hidden
    written = _finish_layers(config, kept, options, dtype, rope_fit, [each for each, _ in all_streams], quiet)
    quality = {} if streams is None else streams.quality(final_norm, head, config.norm_eps)
    guard_quality = guard.quality(final_norm, head, config.norm_eps)
    warning = (
        check_written_form(guard_quality, guard.targets.numel(), options.norm, rope_fit, force=options.force)
        if stock
        else None
    )
    _release_freed_memory()

    out_config = _mla_config(config, written, stock=stock)
    state = {"embed_tokens.weight": embed.to(dtype), "norm.weight": final_norm.to(dtype)}
    if not config.tie_embeddings:
        state["lm_head.weight"] = head.to(dtype)
    for i, (attention, rest) in enumerate(zip(written, kept.rest, strict=True)):
        state.update({f"layers.{i}.{k}": v for k, v in _block_state(attention, rest).items()})
    model = tinylm_from_state(out_config, state)
    source_elements = 2 * config.kv_heads * config.head_dim
    output_elements = written[0].cache_elements_per_token()
    fits = kept.fits
    report = ConversionReport(
        source=str(source_dir),
        provenance=source_facts(source_dir),
        output=str(output_dir),
        command=command or f"convert_checkpoint({str(source_dir)!r}, {str(output_dir)!r})",
        options={**dataclasses.asdict(options), "dtype": str(dtype).removeprefix("torch.")},
        source_description=describe_source(source),
        method_title=METHODS[options.method].title,
        method_steps=METHODS[options.method].steps,
        serving=serving_verdict(out_config) if stock else None,
        mla_sizes={
            "d_c": written[0].kv_lora_rank,
            "d_R": written[0].qk_rope_head_dim,
            "d_N": written[0].qk_nope_head_dim,
            "d_v": written[0].v_head_dim,
            "q_lora_rank": written[0].q_lora_rank,
        },
        cache={
            "dtype": str(dtype).removeprefix("torch."),
            "source_elements": source_elements,
            "output_elements": output_elements,
            "source_bytes": source_elements * config.n_layers * dtype.itemsize,
            "output_bytes": output_elements * config.n_layers * dtype.itemsize,
        },
        rope=None if rope_fit is None else dataclasses.asdict(rope_fit),
        norm_errors=None if not fits else {k: sum(f.errors[k] for f in fits) / len(fits) for k in fits[0].errors},
        quality=quality,
        warning=warning,
        calibration=f"{calibration.numel():,} tokens in {len(calibration)} windows of {options.seq_len} {where}",
        split=search.describe(),
        evaluation=""
        if streams is None
        else f"{streams.targets.numel():,} tokens of the validation split of {corpus.root}, windows of {options.seq_len}",
    )
    with staged_output(output, overwrite=overwrite) as staging:
        if stock:
            token_ids = {
                k: source.hf_config[k]
                for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if k in source.hf_config
            }
            config_json = deepseek_config(
                out_config,
                dtype=dtype,
                attention_bias=out_config.attention_bias,
                max_positions=source.max_positions,
                token_ids=token_ids,
            )
            write_json(staging / "config.json", config_json)
        save_mla_weights(model, staging, options.format, dtype)
        copy_carried_files(source.root, staging)
        report.seconds = time.perf_counter() - start
        (staging / CONVERSION_RECORD).write_text(report.markdown(), encoding="utf-8")
    return report

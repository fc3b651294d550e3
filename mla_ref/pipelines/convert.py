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

import ctypes
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mla_ref._checks import resolve_device
from mla_ref.convert.methods import METHODS
from mla_ref.convert.model import mla_config
from mla_ref.convert.rope_table import fit_rope_theta, layer_table
from mla_ref.convert.split_choice import SplitSearch
from mla_ref.convert.stock_form import (
    DEEPSEEK_NORM_EPS,
    anchor_constant,
    fit_norm,
    input_bound,
    low_rank_query,
    stock_mla,
)
from mla_ref.data import Corpus, load_corpus
from mla_ref.dtypes import DTYPES
from mla_ref.hf.build import block_from_state, tinylm_from_state
from mla_ref.hf.deepseek import deepseek_config
from mla_ref.hf.files import copy_carried_files, write_json
from mla_ref.hf.models import save_mla_weights
from mla_ref.hf.sources import open_source
from mla_ref.model import ModelConfig
from mla_ref.outputs import check_output, staged_output
from mla_ref.pipelines.calibration import CalibrationText, first_windows, folder_calibration
from mla_ref.pipelines.convert_options import ConvertOptions, plan_conversion
from mla_ref.pipelines.guard import GUARD_TOKENS, REFERENCE_FORM, WRITTEN_FORM, check_written_form
from mla_ref.pipelines.report import ConversionReport, Streams, build_report
from mla_ref.progress import tqdm
from mla_ref.records import CONVERSION_RECORD
from mla_ref.threads import one_thread


# ---- the whole model ------------------------------------------------------------------------------------------
def _block_state(attention: torch.nn.Module, rest: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**{f"self_attn.{k}": v for k, v in attention.state_dict().items()}, **rest}


def _release_freed_memory() -> None:
    """Hand memory freed by the last layer back to the operating system.

    glibc keeps freed blocks of up to tens of MB for reuse; over a model's layers those add up to several
    layers' worth of transients on top of the converted model.  ``malloc_trim`` returns them (elsewhere: no-op).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
    method = METHODS[options.method]
    search = SplitSearch(candidate_sizes)
    # --device: the layer being converted, the hidden states and every solve there; what is kept goes back to the CPU
    device = resolve_device(options.device, "--device")
    hidden = hidden.to(device)
    for i in tqdm(range(source.config.n_layers), desc="convert", disable=quiet, leave=False):
        block = source.block(i).to(device)
        calibration_inputs = block.input_layernorm(hidden[:n_calibration])  # (n_c, s, D): what the layer reads
        bound = input_bound(block.input_layernorm.weight)

        def keep(module, inputs=calibration_inputs, bound=bound):
            fit = None
            if options.format == "deepseek-v3":
                d_c, down = module.kv_lora_rank, module.kv_a_proj_with_mqa
                latent = down(inputs)[..., :d_c].flatten(0, 1)  # (T, d_c), before any norm
                bias = None if down.bias is None else down.bias[:d_c]
                fit = fit_norm(latent, anchor=anchor_constant(down.weight[:d_c], bias, bound))
                fit = dataclasses.replace(fit, gain=fit.gain.cpu())
            return module.to(device="cpu", dtype=dtype), fit

        target = search.target(block.self_attn, calibration_inputs)  # y_l, when there is a split to choose
        with one_thread():  # small dense algebra; its large products take the threads back (mla_ref.threads)
            modules = method.convert_layer(block.self_attn, calibration_inputs, candidate_sizes, target)
            modules = [module.to(device) for module in modules]  # a method that builds on the CPU (partial RoPE)
            if options.q_lora_rank is not None:
                modules = [
                    low_rank_query(module, calibration_inputs, options.q_lora_rank, mode=options.norm, bound=bound)
                    for module in modules
                ]
            search.add_layer(modules, calibration_inputs, target, keep)
        hidden = block(hidden)
        kept.bounds.append(bound)
        kept.rest.append(
            {
                k: v.to(device="cpu", dtype=dtype, copy=True)
                for k, v in block.state_dict().items()
                if not k.startswith("self_attn.")
            }
        )
        del block, calibration_inputs, target, modules
        _release_freed_memory()
    return kept, search, hidden.cpu()


@torch.no_grad()
def _model_kl(config: ModelConfig, layers: list, rest: list, guard: Streams, source_hidden, embed, final_norm, head):
    """The whole converted model's KL to the source on the guard windows (calibration text), with ``layers`` (one
    candidate's kept (module, fit) per layer).  Shapes: source_hidden (n_guard, s, D), the source's final hidden
    states there."""
    streams = Streams(guard.inputs, guard.targets)
    streams.hidden["source"] = source_hidden
    modules = [module.float() for module, _ in layers]
    exact_config = mla_config(config, modules)
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
    exact_config = mla_config(config, kept.attention)
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
            layer = layer.to(dtype).float()  # its weights rounded as they will be stored; computing stays fp32
        exact_block = block_from_state(exact_config, i, _block_state(exact, rest))
        if stock:
            stock_config = mla_config(config, [layer], rope_tables=False)
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


@dataclass
class _Text:
    """The token windows of one conversion: calibration inputs, the guard's windows (the first calibration windows,
    on which the written form and each candidate split are checked) and the evaluation windows (None without a
    quality report).  Shapes: calibration (n_c, s); the Streams hold inputs and targets (n, s)."""

    calibration: torch.Tensor
    where: str  # where the calibration came from, in words for CONVERSION.md
    guard: Streams
    evaluation: Streams | None
    corpus: Corpus

    def inputs(self) -> torch.Tensor:
        """Every window the source runs on in pass 1: calibration first, then evaluation.  (n, s)"""
        return self.calibration if self.evaluation is None else torch.cat([self.calibration, self.evaluation.inputs])


def _conversion_text(source, options: ConvertOptions, calibration_text: CalibrationText | None) -> _Text:
    """Calibration windows (train split, or the caller's) and evaluation windows (validation split), as token ids."""
    corpus = load_corpus(options.calib_dir)
    vocab_size = source.config.vocab_size
    if calibration_text is None:
        calibration, where = folder_calibration(source.root, corpus, options, vocab_size)
    else:
        calibration = calibration_text.checked(vocab_size, options.seq_len)
        where = f"given by the caller: {calibration_text.description}"
    # the written form is checked against the conversion on (up to) the first GUARD_TOKENS calibration tokens
    n_guard = max(1, GUARD_TOKENS // options.seq_len)  # windows
    guard = Streams(calibration[:n_guard, :-1], calibration[:n_guard, 1:])
    evaluation = None
    if options.eval_tokens:
        windows = first_windows(source.root, corpus.val, vocab_size, options.eval_tokens, options.seq_len)
        evaluation = Streams(windows[:, :-1], windows[:, 1:])
    return _Text(calibration[:, :-1], where, guard, evaluation, corpus)


def _start_streams(text: _Text, hidden: torch.Tensor, embed: torch.Tensor, stock: bool) -> list[Streams]:
    """The guard and evaluation streams, each holding the source's final hidden states (from pass 1) and the
    embeddings the written forms start from.  Shapes: hidden (n_c [+ n_e], s, D)."""
    all_streams = [(text.guard, hidden[: len(text.guard.inputs)])]
    if text.evaluation is not None:
        all_streams.append((text.evaluation, hidden[len(text.calibration) :]))
    for each, source_hidden in all_streams:
        each.hidden["source"] = source_hidden
        each.hidden[REFERENCE_FORM] = F.embedding(each.inputs, embed).float()
        if stock:
            each.hidden[WRITTEN_FORM] = each.hidden[REFERENCE_FORM].clone()
    return [each for each, _ in all_streams]


def _assemble(config: ModelConfig, written: list, rest: list, embed, final_norm, head, dtype, stock: bool):
    """The written model (TinyLM at ``dtype``) and its config, from the written attention and the kept blocks."""
    out_config = mla_config(config, written, rope_tables=not stock)
    state = {"embed_tokens.weight": embed.to(dtype), "norm.weight": final_norm.to(dtype)}
    if not config.tie_embeddings:
        state["lm_head.weight"] = head.to(dtype)
    for i, (attention, block_rest) in enumerate(zip(written, rest, strict=True)):
        state.update({f"layers.{i}.{k}": v for k, v in _block_state(attention, block_rest).items()})
    return tinylm_from_state(out_config, state), out_config


def _write(output: Path, source, options, out_config, model, dtype, report, start: float, overwrite: bool) -> None:
    """OUT, through a staging folder: config.json (DeepSeek-V3 form), the weights, the tokenizer files, CONVERSION.md."""
    with staged_output(output, overwrite=overwrite) as staging:
        if options.format == "deepseek-v3":
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
    candidate_sizes = plan_conversion(options, source, calibration_text)  # every check, before any work
    config, stock = source.config, options.format == "deepseek-v3"
    dtype = DTYPES[options.dtype] if options.dtype else source.storage_dtype()
    dtype = dtype if dtype in DTYPES.values() else torch.float32
    text = _conversion_text(source, options, calibration_text)

    # pass 1: every layer converted at every candidate split; then the split whose whole model is closest
    embed = source.stored("embed_tokens.weight")  # (vocab, D) as stored: the largest tensor, kept once
    hidden = F.embedding(text.inputs(), embed).float()  # (n, s, D)
    kept, search, hidden = _convert_layers(
        source, options, candidate_sizes, dtype, hidden, len(text.calibration), quiet
    )
    final_norm = source.tensor("norm.weight")
    head = embed if config.tie_embeddings else source.stored("lm_head.weight")
    guard_hidden = hidden[: len(text.guard.inputs)]
    search.choose(
        lambda _k, layers: _model_kl(config, layers, kept.rest, text.guard, guard_hidden, embed, final_norm, head)
    )
    for module, fit in search.chosen():
        kept.attention.append(module)
        if fit is not None:
            kept.fits.append(fit)
    rope_fit = None
    if stock:  # the one RoPE table of the DeepSeek-V3 config
        hint = config.rope_theta ** (kept.attention[0].qk_rope_head_dim / config.head_dim)
        rope_fit = fit_rope_theta([layer_table(m) for m in kept.attention], options.seq_len, hint=hint)

    # pass 2: each layer in its written form, the guard and evaluation text carried through both forms
    all_streams = _start_streams(text, hidden, embed, stock)
    del hidden
    written = _finish_layers(config, kept, options, dtype, rope_fit, all_streams, quiet)
    quality = {} if text.evaluation is None else text.evaluation.quality(final_norm, head, config.norm_eps)
    guard_quality = text.guard.quality(final_norm, head, config.norm_eps)
    warning = None
    if stock:
        warning = check_written_form(
            guard_quality, text.guard.targets.numel(), options.norm, rope_fit, force=options.force
        )
    _release_freed_memory()

    model, out_config = _assemble(config, written, kept.rest, embed, final_norm, head, dtype, stock)
    report = build_report(source, source_dir, output_dir, options, command, dtype, out_config, written, kept, text,
                     search, rope_fit, quality, warning)  # fmt: skip
    _write(output, source, options, out_config, model, dtype, report, start, overwrite)
    return report

"""What a conversion cost: the logits of the converted models against the source's, and CONVERSION.md.

``Streams`` carries the hidden states of several models on the same evaluation windows (the source's first);
``Streams.quality`` applies the final norm and the head in chunks and compares: perplexity, the mean
KL(p_source ‖ p_model) per token, and the largest logit difference.  ``ConversionReport`` gathers these with
the sizes, the KV-cache saving and the DeepSeek-V3 fits, prints a summary and writes CONVERSION.md;
``build_report`` fills it in from what a conversion kept and measured.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mla_ref.calculator import gqa_elements_per_token_per_layer
from mla_ref.convert.methods import METHODS
from mla_ref.dtypes import dtype_name
from mla_ref.measures import kl_from_log_probs
from mla_ref.pipelines.serving import serving_verdict
from mla_ref.provenance import source_facts
from mla_ref.records import record_section


@dataclass
class Quality:
    """A model's logits against the source's on the evaluation tokens."""

    perplexity: float
    kl_to_source: float  # mean over tokens of KL(p_source ‖ p_model), nats
    max_logit_error: float  # max |logit − source logit|


@dataclass
class ConversionReport:
    """What ``convert_checkpoint`` did and measured; ``markdown()`` is CONVERSION.md."""

    source: str
    output: str
    command: str
    options: dict
    source_description: str
    mla_sizes: dict
    cache: dict  # elements per token per layer, bytes per token (all layers) at the output dtype
    rope: dict | None = None  # the DeepSeek-V3 RoPE fit
    norm_errors: dict | None = None  # mean over layers of each latent-norm choice's relative error
    quality: dict = field(default_factory=dict)  # name -> Quality, "source" first
    evaluation: str = ""
    calibration: str = ""  # which tokens the method calibrated on
    split: str = ""  # how the budget's split into d_R and d_c was chosen, when the method measured it
    seconds: float = 0.0
    warning: str | None = None  # why the written form was refused, when --force wrote it anyway
    method_title: str = ""  # the method's one-line description (mla_ref.convert.METHODS)
    method_steps: tuple[str, ...] = ()
    serving: tuple[bool, list[str]] | None = None  # DeepSeek-V3 output: servable by the engines' kernels, and why not
    provenance: dict = field(default_factory=dict)  # the source's absolute path and fingerprint (mla_ref.provenance)

    def summary_lines(self) -> list[str]:
        lines = [f"WARNING: {self.warning}"] if self.warning else []
        lines += [
            f"method {self.options['method']}: {self.method_title}",
            f"KV cache per token: {self.cache['source_bytes']:,} B -> {self.cache['output_bytes']:,} B "
            f"({self.cache['output_bytes'] / self.cache['source_bytes']:.1%} of the source) at {self.cache['dtype']}",
        ]
        if self.split:
            lines.append(f"split chosen by the {self.split}")
        if self.rope is not None:
            state = (
                "exact"
                if self.rope["exact"]
                else f"nearest; max relative frequency change {self.rope['max_relative_change']:.3g}"
            )
            lines.append(f"RoPE: θ' = {self.rope['theta']:.6g} ({state})")
        if self.norm_errors is not None:
            chosen = "anchor" if self.options["norm"] == "anchor" else "per-coordinate gains"
            lines.append(f"latent norm ({self.options['norm']}): relative latent error {self.norm_errors[chosen]:.3g}")
        if self.serving is not None:
            lines.append(self.serving_line())
        for name, q in self.quality.items():
            lines.append(
                f"{name:<28} perplexity {q.perplexity:.4f}   KL to source {q.kl_to_source:.3g} nats   "
                f"max |Δlogit| {q.max_logit_error:.3g}"
            )
        return lines

    def serving_line(self) -> str:
        servable, reasons = self.serving
        if servable:
            return "serving engines (vLLM, SGLang MLA kernels): servable"
        return "serving engines (vLLM, SGLang MLA kernels): not servable — " + "; ".join(reasons)

    def markdown(self) -> str:
        out = ["# Conversion record", ""]
        if self.warning:
            out += [f"> **Warning: {self.warning}**", ""]
        out += [
            f"Converted `{self.source}` ({self.source_description}) to MLA with exactly this command:",
            "",
            "```",
            self.command,
            "```",
            "",
            f"- method `{self.options['method']}`: {self.method_title}; MLA sizes: "
            + ", ".join(f"{k} {v}" for k, v in self.mla_sizes.items()),
            *(f"  {n}. {step}" for n, step in enumerate(self.method_steps, 1)),
            *([f"- calibration: {self.calibration}"] if self.calibration else []),
            *([f"- split of the budget chosen by the {self.split}"] if self.split else []),
            f"- format `{self.options['format']}`, weights stored as {self.cache['dtype']}",
            f"- KV cache per token per layer: {self.cache['source_elements']} elements in the source, "
            f"{self.cache['output_elements']} here; over all layers {self.cache['source_bytes']:,} B -> "
            f"{self.cache['output_bytes']:,} B ({self.cache['output_bytes'] / self.cache['source_bytes']:.1%})",
        ]
        if self.rope is not None:
            out.append(
                f"- DeepSeek-V3 RoPE: θ' = {self.rope['theta']:.8g}, "
                + (
                    "exact (every layer's sorted key frequencies are the standard table)"
                    if self.rope["exact"]
                    else f"the nearest standard table: max relative frequency change {self.rope['max_relative_change']:.3g}, "
                    f"mean 1 − cos(Δ·δω) over gaps < {self.options['seq_len']}: {self.rope['phase_error']:.3g}"
                )
            )
        if self.norm_errors is not None:
            out.append(
                f"- DeepSeek-V3 latent RMSNorm, mode `{self.options['norm']}`; relative latent error "
                "E‖ĉ − c‖²/E‖c‖² on the calibration tokens (mean over layers) for each choice: "
                + ", ".join(f"{k} {v:.3g}" for k, v in self.norm_errors.items())
            )
        if self.serving is not None:
            out.append("- " + self.serving_line())
        if self.quality:
            out += [
                "",
                f"## Quality against the source ({self.evaluation})",
                "",
                "| model | perplexity | KL to source (nats/token) | max abs logit error |",
                "|---|---:|---:|---:|",
            ]
            out += [
                f"| {name} | {q.perplexity:.4f} | {q.kl_to_source:.4g} | {q.max_logit_error:.4g} |"
                for name, q in self.quality.items()
            ]
        record = {
            "source": self.source,
            **self.provenance,
            "command": self.command,
            "options": self.options,
            "mla_sizes": self.mla_sizes,
            "cache": self.cache,
            "rope": self.rope,
            "norm_errors": self.norm_errors,
            "warning": self.warning,
            "serving": None if self.serving is None else {"servable": self.serving[0], "reasons": self.serving[1]},
            "quality": {k: dataclasses.asdict(v) for k, v in self.quality.items()},
            "evaluation": self.evaluation,
            "calibration": self.calibration,
            "split": self.split,
            "seconds": round(self.seconds, 1),
        }
        out += record_section(record)
        return "\n".join(out)


class Streams:
    """Hidden states of several models on the same evaluation windows, and their final comparison.

    ``hidden`` maps a model's name to its final hidden states (n, s, D); the first entry is the reference.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets
        self.hidden: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def quality(self, norm_weight: torch.Tensor, head: torch.Tensor, eps: float) -> dict[str, Quality]:
        """Perplexity, KL to the source and max logit error of every stream ("source" is the reference).

        norm_weight (D,) and eps: the final RMSNorm; head (vocab, D) in any float dtype.  The m streams' logits
        are made together, about 2²³ at a time (32 MiB, one buffer reused for every chunk of tokens): one
        matrix product per chunk, of m · chunk rows.  A head stored in another dtype than fp32 is converted one
        block of rows at a time (16 MiB each), so a large vocabulary costs no more than a few blocks of memory.
        """
        vocab, d_model = head.shape
        names = list(self.hidden)
        m = len(names)
        chunk = max(1, 2**23 // (m * vocab))  # tokens per step
        block = vocab if head.dtype == torch.float32 else max(1, 2**22 // d_model)  # head rows per product
        targets = self.targets.flatten()
        flat = [h.flatten(0, 1) for h in self.hidden.values()]
        totals = {name: [0.0, 0.0, 0.0] for name in names}  # nll, kl, max error
        buffer = torch.empty(m * chunk * vocab)  # every chunk's logits, allocated once
        for start in range(0, targets.numel(), chunk):
            rows = slice(start, start + chunk)
            n = len(targets[rows])
            hidden = torch.stack([h[rows] for h in flat]).flatten(0, 1)  # (m · n, D), stream by stream
            # the final RMSNorm, then logits = h W_headᵀ, block by block of the vocabulary
            normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps) * norm_weight
            logits = buffer[: m * n * vocab].view(m * n, vocab)
            for first in range(0, vocab, block):
                weight = head[first : first + block].float()  # (block, D)
                if block == vocab:  # an fp32 head: one product straight into the buffer
                    torch.mm(normed, weight.T, out=logits)
                else:
                    logits[:, first : first + block] = normed @ weight.T
            logits = logits.view(m, n, vocab)
            log_probs = logits.log_softmax(-1)  # (m, n, vocab)
            for i, name in enumerate(names):
                totals[name][0] += F.nll_loss(log_probs[i], targets[rows], reduction="sum").item()
                totals[name][1] += kl_from_log_probs(log_probs[0], log_probs[i]).sum().item()  # KL(p_source ‖ p)
                totals[name][2] = max(totals[name][2], (logits[i] - logits[0]).abs().max().item())
        n = targets.numel()
        return {
            name: Quality(perplexity=math.exp(nll / n), kl_to_source=max(kl / n, 0.0), max_logit_error=err)
            for name, (nll, kl, err) in totals.items()
        }


def describe_source(source) -> str:
    """One line on a conversion source: its type, depth, width and attention."""
    c = source.config
    kind = source.hf_config.get("model_type", "mla_ref checkpoint")
    return (
        f"{kind}, {c.n_layers} layers, d_model {c.d_model}, {c.attention.upper()}: {c.n_heads} query heads over "
        f"{c.kv_heads} KV heads of {c.head_dim}" + (", q/k/v biases" if c.attention_bias else "")
    )


def build_report(source, source_dir, output_dir, options, command, dtype, out_config, written, kept, text, search,
            rope_fit, quality, warning) -> ConversionReport:  # fmt: skip
    """What CONVERSION.md and the command's summary say: method, sizes, cache, calibration, quality."""
    stock = options.format == "deepseek-v3"
    source_elements = gqa_elements_per_token_per_layer(source.config.kv_heads, source.config.head_dim)
    output_elements = written[0].cache_elements_per_token()
    n_layers, fits = source.config.n_layers, kept.fits
    evaluation = text.evaluation
    return ConversionReport(
        source=str(source_dir),
        provenance=source_facts(source_dir),
        output=str(output_dir),
        command=command or f"convert_checkpoint({str(source_dir)!r}, {str(output_dir)!r})",
        options={**dataclasses.asdict(options), "dtype": dtype_name(dtype)},
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
            "dtype": dtype_name(dtype),
            "source_elements": source_elements,
            "output_elements": output_elements,
            "source_bytes": source_elements * n_layers * dtype.itemsize,
            "output_bytes": output_elements * n_layers * dtype.itemsize,
        },
        rope=None if rope_fit is None else dataclasses.asdict(rope_fit),
        norm_errors=None if not fits else {k: sum(f.errors[k] for f in fits) / len(fits) for k in fits[0].errors},
        quality=quality,
        warning=warning,
        calibration=f"{text.calibration.numel():,} tokens in {len(text.calibration)} windows of {options.seq_len} "
        f"{text.where}",
        split=search.describe(),
        evaluation=""
        if evaluation is None
        else f"{evaluation.targets.numel():,} tokens of the validation split of {text.corpus.root}, windows of "
        f"{options.seq_len}",
    )

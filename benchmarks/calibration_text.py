"""Which calibration text generalises: code alone, code with the model's own samples, code with English prose.

    python -m mla_ref fetch smollm2-135m          # once
    python benchmarks/calibration_text.py         # four conversions at 25%: about 40 minutes on two threads

SmolLM2-135M converted at 25% of its cache by the converter's default (``recipe``, the split of the budget chosen
by the KL, stock DeepSeek-V3 form), each time calibrated on a different mix of text, then loaded by stock
``transformers`` and measured on the same two held-out texts as ``real_model.py``: code (the first 4,096 tokens of
the standard library's validation split) and prose (the first 4,096 tokens of the Python language reference's text
in ``pydoc_data.topics``).  No calibration reads either.  The mixes (windows of 256 tokens, interleaved so that the
first windows, on which the split is chosen and the written form checked, hold every kind):

- ``code``: the converter's default, 16,384 tokens spread over the standard library's train split less the prose's
  file (``held_out.train_without_prose``);
- ``code+samples``: the same and 8,192 tokens the source writes itself: each window starts from a token drawn
  uniformly from the vocabulary and goes on sampled at temperature 1 (``TinyLM.generate``), so no text at all is
  needed, and the text is whatever the model itself expects;
- ``code+prose-4k``, ``code+prose-8k``: the same code and 4,096 or 8,192 tokens of English prose about Python that
  ships with the standard library beside its sources (IDLE's news, history and read-me files, the email package's
  architecture notes, the licence: ``held_out.CALIBRATION_PROSE_FILES``), other documents than the reference the
  prose text comes from.

Writes ``results/calibration_text.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from held_out import calibration_prose_files
from real_model import RESULTS, SEQ_LEN, compare, load, log_probs, text_windows

MIXES = {"code": (0, 0), "code+samples": (8192, 0), "code+prose-4k": (0, 4096), "code+prose-8k": (0, 8192)}
CODE_TOKENS = 16384


def prose_windows(source_dir: Path, stdlib: Path) -> tuple[torch.Tensor, list[str]]:
    """Every window of 256 tokens of ``held_out.CALIBRATION_PROSE_FILES`` (those this Python has), shuffled with a
    fixed seed."""
    from mla_ref.data import validation_windows
    from mla_ref.hf import text_tokens

    found = calibration_prose_files(stdlib)
    text = "\n\n".join((stdlib / name).read_text(encoding="utf-8") for name in found)
    windows = validation_windows(text_tokens(source_dir, text.encode("utf-8"), vocab_size=10**9), SEQ_LEN, 10**9)
    return windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))], found


def own_samples(source_dir: Path, n_tokens: int) -> torch.Tensor:
    """(n, SEQ_LEN + 1) windows the source writes itself: a uniformly drawn first token, then sampled (T = 1)."""
    from mla_ref.hf import load_model

    model = load_model(source_dir)
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, model.config.vocab_size, (n_tokens // SEQ_LEN, 1), generator=generator)  # (n, 1)
    windows = [model.generate(part, SEQ_LEN, temperature=1.0, generator=generator) for part in first.split(16)]
    return torch.cat(windows)  # (n, SEQ_LEN + 1)


def main(argv: list[str] | None = None) -> int:
    from held_out import calibration_folder, prose_text, train_without_prose

    from mla_ref.data import load_corpus, stdlib_folder
    from mla_ref.hf.files import read_config
    from mla_ref.pipelines import CalibrationText, ConvertOptions, convert_checkpoint
    from mla_ref.pipelines.calibration import calibration_windows, interleave_windows
    from mla_ref.pipelines.fetch import fetched_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="SmolLM2 directory (default: where `fetch` puts it)")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--mixes", default=",".join(MIXES), help=f"some of {', '.join(MIXES)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "calibration_text.md"))
    args = parser.parse_args(argv)
    mixes = args.mixes.split(",")
    unknown = [m for m in mixes if m not in MIXES]
    if unknown:
        print(f"error: unknown mix {', '.join(unknown)}; allowed: {', '.join(MIXES)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        source_dir = fetched_model_dir("smollm2-135m", args.model)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    corpus = load_corpus()
    vocab = read_config(source_dir)["vocab_size"]
    code, _ = calibration_windows(source_dir, train_without_prose(corpus), vocab, CODE_TOKENS, SEQ_LEN)
    prose, prose_found = prose_windows(source_dir, stdlib_folder())
    n_samples = max(MIXES[m][0] for m in mixes)
    start = time.perf_counter()
    samples = own_samples(source_dir, n_samples) if n_samples else None
    sampling_seconds = time.perf_counter() - start

    windows = {
        "code": text_windows(source_dir, corpus.val.numpy().tobytes().decode("utf-8", "replace"), 4096),
        "prose": text_windows(source_dir, prose_text(), 4096),
    }
    source_model = load(source_dir)
    reference = {text: log_probs(source_model, w) for text, w in windows.items()}
    source_ppl = {text: compare(reference[text], reference[text], w)[0] for text, w in windows.items()}
    del source_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="calibration_text_") as work:
        folder = calibration_folder(corpus, Path(work) / "calibration")  # gives the converter its evaluation text
        for mix in mixes:
            n_samples, n_prose = MIXES[mix]
            if n_prose:
                other = prose[: n_prose // SEQ_LEN]
            elif n_samples:
                other = samples[: n_samples // SEQ_LEN]
            else:
                other = code[:0]
            if len(other) * SEQ_LEN < max(n_prose, n_samples):
                print(f"error: {mix} needs {max(n_prose, n_samples):,} tokens; found {len(other) * SEQ_LEN:,}")
                return 2
            description = f"{CODE_TOKENS:,} tokens of code"
            if len(other):
                kind = "English prose" if n_prose else "the model's own samples"
                description += f" and {len(other) * SEQ_LEN:,} of {kind}"
            text = CalibrationText(interleave_windows(code, other), description)
            out = Path(work) / mix
            begun = time.perf_counter()
            report = convert_checkpoint(
                source_dir,
                out,
                ConvertOptions(budget=args.budget, calib_dir=str(folder), eval_tokens=0),
                calibration_text=text,
            )
            seconds = time.perf_counter() - begun
            model = load(out)
            measured = {t: compare(reference[t], log_probs(model, w), w) for t, w in windows.items()}
            del model
            rows.append((mix, text.description, report.mla_sizes["d_R"], seconds, measured))
            print(
                mix,
                report.mla_sizes,
                {t: f"{p:.3f} ({p / source_ppl[t]:.3f}x), KL {k:.3f}" for t, (p, k) in measured.items()},
                flush=True,
            )

    lines = [
        "# Which calibration text generalises (SmolLM2-135M at 25% of its cache)",
        "",
        f"Reproduce: `python benchmarks/calibration_text.py --mixes {args.mixes}` ({args.threads} threads of a shared "
        f"2-core x86-64 CPU, torch {torch.__version__}); the converter's default method and split search, stock "
        "DeepSeek-V3 form, loaded and measured by stock `transformers`.",
        "",
        f"Held out from every calibration: code, the first 4,096 tokens of the validation split of {corpus.root}; "
        "prose, the first 4,096 tokens of the Python language reference's text in pydoc_data.topics. "
        f"Prose for calibration: {', '.join(prose_found)}. "
        + (f"The model's own samples took {sampling_seconds:.0f} s to write." if samples is not None else ""),
        "",
        f"Source: code perplexity {source_ppl['code']:.3f}, prose {source_ppl['prose']:.3f}.",
        "",
        "| calibration | d_R chosen | conversion s | code ppl (× source) | KL code | prose ppl (× source) | KL prose |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mix, description, d_r, seconds, measured in rows:
        (code_ppl, code_kl), (prose_ppl, prose_kl) = measured["code"], measured["prose"]
        lines.append(
            f"| {mix}: {description} | {d_r} | {seconds:.0f} | {code_ppl:.2f} ({code_ppl / source_ppl['code']:.2f}×) "
            f"| {code_kl:.3f} | {prose_ppl:.2f} ({prose_ppl / source_ppl['prose']:.2f}×) | {prose_kl:.3f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How a cache budget is best split between the roped key (d_R) and the latent (d_c): SmolLM2-135M, recipe method.

    python -m mla_ref fetch smollm2-135m     # once
    python benchmarks/rope_split.py          # about 25 CPU-minutes on one thread: 11 conversions of ~2 each

At each budget the recipe is run with several d_R (``python -m mla_ref convert SRC OUT --budget F --rope-dim D``,
d_c taking the rest of the budget, one element of it the anchor), and two things are read for each:

- the perplexity and KL to the source that ``convert`` itself reports for its written DeepSeek-V3 form, on the first
  4,096 tokens of the standard library's validation split (files the calibration never sees);
- the mean over layers of E_l = Σ‖y_MLA − y_source‖² / Σ‖y_source‖², each converted attention layer against its
  source layer on the source's own inputs, over 2,048 tokens of the train split (the calibration text): a measure
  that needs no evaluation text, to see whether it ranks the splits as the perplexity does.

Conversions already in ``--work`` with the same source and sizes are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# budget -> the d_R tried, the recipe's rule d_R = min(B/2, d_h) first
SPLITS: dict[float, tuple[int, ...]] = {0.5: (64, 48, 32), 0.25: (48, 40, 32, 24, 16), 0.125: (24, 16, 12)}
PROXY_TOKENS = 2048


def converted(source: Path, work: Path, budget: float, rope_dim: int, threads: int) -> Path:
    """The recipe conversion of ``source`` at ``budget`` with d_R = ``rope_dim``, reused when already in ``work``."""
    out = work / f"budget{budget:g}-rope{rope_dim}"
    if (out / "CONVERSION.md").is_file() and (out / "config.json").is_file():
        from mla_ref.pipelines import ConvertOptions
        from mla_ref.records import read_record

        record, written = read_record(out / "CONVERSION.md"), json.loads((out / "config.json").read_text())
        cache = record["cache"]
        if (
            record["source"] == str(source)
            and record.get("calibration")  # written by the current converter, with its default calibration
            and record["options"]["calib_tokens"] == ConvertOptions.calib_tokens
            and written.get("qk_rope_head_dim") == rope_dim
            and cache["output_elements"] == round(budget * cache["source_elements"])
        ):
            return out
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "mla_ref", "convert", str(source), str(out), "--budget", str(budget),
               "--rope-dim", str(rope_dim), "--eval-tokens", "4096", "--quiet", "--overwrite"]  # fmt: skip
    subprocess.run(command, check=True, env=env)
    return out


@torch.no_grad()
def mean_layer_error(model, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Mean over layers of E_l on the source's attention inputs ``inputs`` and outputs ``targets``."""
    errors = []
    for layer, x, y in zip(model.layers, inputs, targets, strict=True):
        errors.append(((layer.self_attn(x) - y).double().pow(2).sum() / y.double().pow(2).sum()).item())
    return sum(errors) / len(errors)


def main(argv: list[str] | None = None) -> int:
    from mla_ref.data import load_corpus
    from mla_ref.hf import load_model
    from mla_ref.pipelines import ConvertOptions
    from mla_ref.pipelines.calibration import spread_windows
    from mla_ref.pipelines.fetch import fetched_model_dir
    from mla_ref.records import read_record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="SmolLM2 directory (default: where `fetch` puts it)")
    parser.add_argument("--work", default="/tmp/rope_split", help="the conversions (kept)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--budgets",
        default=",".join(f"{b:g}" for b in SPLITS),
        help="a subset of " + ", ".join(f"{b:g}" for b in SPLITS),
    )
    parser.add_argument("--out", default=str(RESULTS / "rope_split.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        source_dir = fetched_model_dir("smollm2-135m", args.model)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    source = load_model(source_dir).eval()
    windows = spread_windows(source_dir, load_corpus().train, source.config.vocab_size, PROXY_TOKENS, 256, 8)
    with torch.no_grad():
        inputs = source.attention_inputs(windows[:, :-1])  # (n, s, D) per layer
        targets = [layer.self_attn(x) for layer, x in zip(source.layers, inputs, strict=True)]

    rows = []
    budgets = [float(b) for b in args.budgets.split(",")]
    for budget in budgets:
        if budget not in SPLITS:
            print(f"error: budget {budget:g} has no splits to try; allowed: {', '.join(f'{b:g}' for b in SPLITS)}",
                  file=sys.stderr)  # fmt: skip
            return 2
    for budget, rope_dims in ((b, SPLITS[b]) for b in budgets):
        for rope_dim in rope_dims:
            out = converted(source_dir, work, budget, rope_dim, args.threads)
            record = read_record(out / "CONVERSION.md")
            written = record["quality"]["as written (DeepSeek-V3)"]
            row = {
                "budget": budget,
                "rope_dim": rope_dim,
                "d_c": record["mla_sizes"]["d_c"],
                "perplexity": written["perplexity"],
                "ratio": written["perplexity"] / record["quality"]["source"]["perplexity"],
                "kl": written["kl_to_source"],
                "mean_error": mean_layer_error(load_model(out).eval(), inputs, targets),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)

    lines = [
        "# Splitting the cache budget between d_R and d_c (SmolLM2-135M, recipe)",
        "",
        f"Reproduce: `python benchmarks/rope_split.py --budgets {args.budgets}` (one thread of a shared 2-core x86-64 CPU, torch "
        f"{torch.__version__}). Source: SmolLM2-135M-Instruct as `python -m mla_ref fetch smollm2-135m` writes it. "
        "Each row is `python -m mla_ref convert SRC OUT --budget F --rope-dim D --eval-tokens 4096` (the recipe, "
        "stock DeepSeek-V3 form; d_c written includes the anchor; the converter's default calibration, "
        f"{ConvertOptions.calib_tokens:,} tokens spread one window per stretch over the train split). Perplexity and KL: the written form on the "
        "first 4,096 tokens of the standard library's validation split, as `convert` reports them. Mean E_l: each "
        f"converted attention layer against its source layer on the source's inputs, {PROXY_TOKENS:,} tokens of "
        "the train split, averaged over the 30 layers. *rule*: the d_R the recipe picks from a budget alone.",
        "",
        "| cache | d_R | d_c | perplexity | × source | KL (nats/token) | mean E_l |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        best = min((r for r in rows if r["budget"] == row["budget"]), key=lambda r: r["perplexity"])
        marks = [m for m, on in (("rule", row["rope_dim"] == SPLITS[row["budget"]][0]), ("best", row is best)) if on]
        mark = f" ({', '.join(marks)})" if marks else ""
        lines.append(
            f"| {row['budget']:.1%} | {row['rope_dim']}{mark} | {row['d_c']} | {row['perplexity']:.2f} | "
            f"{row['ratio']:.2f}× | {row['kl']:.3f} | {row['mean_error']:.4f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

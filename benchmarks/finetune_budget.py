"""How many fine-tuning tokens does a converted model need?  One conversion at one cache size, several budgets.

    python benchmarks/finetune_budget.py --teacher gqa --fraction 0.25 --budgets 0.01,0.02,0.04,0.08

The conversion is one of the table's (``conversion_quality.py``), on the same calibration and validation slices:
``--method transmla`` (the default) is TransMLA as published — the start that fine-tunes best in the table, though
it is far from the best before training — and ``--method mla_ref`` is mla_ref's training-free recipe.  Each
budget then fine-tunes its own copy of that model with the table's fine-tune settings (the same flags and defaults
as conversion_quality.py: distillation α 0.5, τ 2, hidden-state term β 3, batch 4 × 128, lr 5e-4, all parameters) for
⌊budget · pre-training tokens / (batch · 128)⌋ steps, the same seed.  The table stops at 2% of the teacher's
pre-training tokens; this script goes past it to show where the curve meets a target.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from conversion_quality import (
    SEQ_LEN,
    Lab,
    _windows,
    add_finetune_arguments,
    finetune_config,
    registered,
)

from mla_ref import checkpoint
from mla_ref.data import load_corpus, validation_windows
from mla_ref.recovery import budget_steps, pretraining_tokens, recover
from mla_ref.train import TEACHERS_DIR, evaluate

METHODS = {"transmla": registered("transmla"), "mla_ref": registered("recipe")}  # the table's builders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", choices=("mha", "gqa"), default="gqa")
    parser.add_argument("--fraction", type=float, default=0.25, help="KV cache as a fraction of the teacher's")
    parser.add_argument("--method", choices=tuple(METHODS), default="transmla", help="the conversion to fine-tune")
    parser.add_argument("--budgets", default="0.01,0.02,0.04,0.08", help="fractions of pre-training tokens")
    add_finetune_arguments(parser)  # the table's fine-tune settings and defaults
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        budgets = sorted({float(b) for b in args.budgets.split(",") if b.strip()})
    except ValueError:
        parser.error(f"--budgets must be comma-separated numbers in (0, 1], got {args.budgets!r}")
    if not budgets or not all(0 < b <= 1 for b in budgets):
        parser.error(f"--budgets must be numbers in (0, 1], got {args.budgets!r}")
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must lie in (0, 1], got {args.fraction}")
    torch.set_num_threads(args.threads)

    directory = TEACHERS_DIR / args.teacher
    teacher = checkpoint.load(directory)
    corpus = load_corpus()
    # the table's slices: conversion_quality.py's default calibration, selection and validation sizes and seeds
    lab = Lab(
        name=args.teacher,
        teacher=teacher,
        corpus=corpus,
        calibration=_windows(corpus.train, 2048, seed=args.seed)[:, :-1],
        selection=_windows(corpus.train, 4096, seed=args.seed + 1),
        cache=teacher.layers[0].self_attn.cache_elements_per_token(),
    )
    validation = validation_windows(corpus.val, SEQ_LEN, args.eval_tokens)
    base = evaluate(teacher, validation).perplexity
    pretraining = pretraining_tokens(directory)
    built = METHODS[args.method](lab, args.fraction)
    if built is None:
        parser.error(f"--fraction {args.fraction} leaves no room for both a roped key and a latent")
    converted, settings = built
    start = evaluate(converted, validation).perplexity
    print(
        f"{args.teacher.upper()} teacher perplexity {base:.3f}; {args.method} at {args.fraction:.1%} of the cache "
        f"({settings}): {start:.3f} = {start / base:.3f}× before any training",
        flush=True,
    )
    print()
    print("| fine-tune budget | tokens | steps | perplexity | × teacher | wall s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for budget in budgets:
        steps = budget_steps(budget, pretraining, batch_size=args.finetune_batch, seq_len=SEQ_LEN)
        began = time.perf_counter()
        result = recover(
            copy.deepcopy(converted), corpus, finetune_config(args, steps), teacher=teacher, trainable=args.trainable
        )
        after = result.after.perplexity
        print(
            f"| {budget * 100:g}% | {result.tokens:,} | {steps} | {after:.3f} | {after / base:.3f}× | "
            f"{time.perf_counter() - began:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

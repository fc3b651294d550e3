"""How good can an MLA model with a small cache be at all?  Train one from scratch on the teacher's own budget.

    python benchmarks/mla_from_scratch.py --teacher gqa --kv-lora-rank 16 --rope-dim 16 --threads 1

A conversion followed by a short fine-tune ends up as an MLA model with d_c + d_R cached numbers per token and
layer.  This script trains exactly that architecture from random weights — the teacher's widths, depth, MLP and
vocabulary, MLA attention with the given d_c (latent) and d_R (shared roped key), d_N = d_v = the teacher's head
size — with the teacher's own training recipe (its TRAINING.md record: steps, batch, sequence, learning-rate
schedule, seed) and the same validation slice.  Its final perplexity, beside the teacher's, says how much the
smaller cache costs a model that was free to learn around it with the full budget: a converted model fine-tuned
on 2% of that budget should not be expected to do better than this by much.

The printed table gives both validation curves step by step, and the ratio of perplexities at each step.
Nothing is written to disk unless ``--out`` names a new directory (a checkpoint with its TRAINING.md).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, replace

import torch

from mla_ref.calculator import gqa_elements_per_token_per_layer, mla_elements_per_token_per_layer
from mla_ref.data import load_corpus, validation_windows
from mla_ref.model import ModelConfig, TinyLM
from mla_ref.train import TEACHERS_DIR, TrainConfig, evaluate, read_record, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", choices=("mha", "gqa"), default="gqa")
    parser.add_argument("--kv-lora-rank", type=int, required=True, help="d_c, the cached latent")
    parser.add_argument("--rope-dim", type=int, required=True, help="d_R, the shared roped key (even)")
    parser.add_argument("--steps", type=int, default=None, help="default: the teacher's own")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    record = read_record(TEACHERS_DIR / args.teacher)
    teacher_config = ModelConfig(**record["model_config"])
    train_config = TrainConfig(**{**record["train_config"], "betas": tuple(record["train_config"]["betas"])})
    if args.steps is not None:
        train_config = replace(train_config, steps=args.steps)
    config = replace(
        teacher_config,
        attention="mla",
        n_kv_heads=None,
        kv_lora_rank=args.kv_lora_rank,
        qk_rope_head_dim=args.rope_dim,
        qk_nope_head_dim=teacher_config.head_dim,
        v_head_dim=teacher_config.head_dim,
    )
    teacher_cache = gqa_elements_per_token_per_layer(
        teacher_config.n_kv_heads or teacher_config.n_heads, teacher_config.head_dim
    )
    mla_cache = mla_elements_per_token_per_layer(args.kv_lora_rank, args.rope_dim)
    corpus = load_corpus(None)
    torch.manual_seed(train_config.seed)
    model = TinyLM(config)
    print(
        f"MLA from scratch: d_c {args.kv_lora_rank} + d_R {args.rope_dim} = {mla_cache} cached numbers per token "
        f"and layer ({mla_cache / teacher_cache:.1%} of the {args.teacher.upper()} teacher's {teacher_cache}); "
        f"{model.num_parameters():,} parameters (teacher {record['parameters']:,}); "
        f"{train_config.steps} steps × {train_config.batch_size} × {train_config.seq_len}",
        flush=True,
    )
    result = train(model, corpus, train_config, quiet=True, log=lambda line: print(line, flush=True))
    # Like the teacher's record: the weights as they would be stored (bf16), on the same validation slice.
    stored = TinyLM(config)
    stored.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    final = evaluate(stored, validation_windows(corpus.val, train_config.seq_len, train_config.eval_tokens))

    teacher_curve = {row["step"]: row["val_loss"] for row in record["val_loss_curve"]}
    print()
    print("| step | teacher val loss | MLA val loss | perplexity ratio MLA / teacher |")
    print("|---:|---:|---:|---:|")
    for row in result.history:
        if row["step"] in teacher_curve:
            ratio = math.exp(row["val_loss"] - teacher_curve[row["step"]])
            print(f"| {row['step']} | {teacher_curve[row['step']]:.4f} | {row['val_loss']:.4f} | {ratio:.3f}× |")
    print()
    print(
        f"stored (bf16) weights: MLA perplexity {final.perplexity:.3f} vs teacher {record['val_perplexity']:.3f} "
        f"= {final.perplexity / record['val_perplexity']:.3f}× at {mla_cache / teacher_cache:.1%} of the cache; "
        f"{result.wall_seconds / 60:.1f} min; config {asdict(config)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m mla_ref recover CONVERTED OUT …``: win back, by a short training, what a conversion lost.

The work is ``mla_ref.pipelines.recover.recover_checkpoint``; this module reads the command line and prints.  Prints one
``error: …`` line and returns 2 on bad input, 0 on success.
"""

from __future__ import annotations

import dataclasses
import shlex

from mla_ref.cli.common import Parser, run
from mla_ref.pipelines.recover import DEVICES, MODES, RecoverOptions, recover_checkpoint
from mla_ref.pipelines.recovery_record import minutes
from mla_ref.records import CONVERSION_RECORD


def main(argv: list[str] | None = None) -> int:
    """``python -m mla_ref recover CONVERTED OUT [--source SRC] [--mode …] …``"""
    defaults = RecoverOptions()
    parser = Parser(
        prog="python -m mla_ref recover",
        description="Train the attention layers of a converted model towards its source (layer by layer, then "
        "optionally by distilling the whole model) and write the result in the converted model's format.",
    )
    parser.add_argument("converted", metavar="CONVERTED", help="a directory written by `python -m mla_ref convert`")
    parser.add_argument("output", metavar="OUT", help="output directory (written only when complete)")
    parser.add_argument("--source", default=None, help="the model CONVERTED was converted from (default: the "
                        f"source its {CONVERSION_RECORD} names)")  # fmt: skip
    parser.add_argument("--mode", choices=MODES, default=defaults.mode, help="layerwise: each attention layer "
                        "against the source layer on the source's inputs; distill: the whole source's logits; both: "
                        f"layerwise, then distill (default {defaults.mode})")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=defaults.tokens, help="calibration tokens, from the train "
                        f"split (default {defaults.tokens})")  # fmt: skip
    parser.add_argument("--steps", type=int, default=defaults.steps, help="layerwise steps per layer "
                        f"(default {defaults.steps})")  # fmt: skip
    parser.add_argument("--lr", type=float, default=defaults.lr, help="layerwise peak learning rate "
                        f"(default {defaults.lr:g})")  # fmt: skip
    parser.add_argument("--batch-tokens", type=int, default=defaults.batch_tokens, help="token positions per "
                        f"layerwise batch, in whole windows (default {defaults.batch_tokens})")  # fmt: skip
    parser.add_argument("--first-weight", type=float, default=defaults.first_weight, help="layerwise: weight of "
                        "each window's first position in the loss, where a real model keeps its attention sink "
                        f"(default {defaults.first_weight:g})")  # fmt: skip
    parser.add_argument("--distill-steps", type=int, default=defaults.distill_steps, help="distillation steps "
                        f"(default {defaults.distill_steps})")  # fmt: skip
    parser.add_argument("--distill-lr", type=float, default=defaults.distill_lr, help="distillation peak "
                        f"learning rate (default {defaults.distill_lr:g})")  # fmt: skip
    parser.add_argument("--distill-batch-tokens", type=int, default=defaults.distill_batch_tokens, help="tokens "
                        f"per distillation batch (default {defaults.distill_batch_tokens})")  # fmt: skip
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock limit on the training (with "
                        "--mode both, shared by the two phases' estimated work); default: none")  # fmt: skip
    parser.add_argument("--device", choices=DEVICES, default=defaults.device, help="where to train "
                        f"(default {defaults.device})")  # fmt: skip
    parser.add_argument("--calib-dir", default=None, help="folder of text (default: the Python standard library)")
    parser.add_argument("--eval-tokens", type=int, default=defaults.eval_tokens, help="validation tokens for "
                        f"perplexity and KL (default {defaults.eval_tokens})")  # fmt: skip
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="window length "
                        f"(default {defaults.seq_len}, as convert's)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seeds the batch sampler "
                        f"(default {defaults.seed})")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--force", action="store_true", help="write OUT even when the recovered model is further "
                        "from the source than CONVERTED on the held-back calibration windows (RECOVERY.md then "
                        "says so at the top)")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no report on stdout")

    def action(args, argv):
        options = RecoverOptions(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(RecoverOptions)},
        )
        report = recover_checkpoint(
            args.converted,
            args.output,
            options,
            overwrite=args.overwrite,
            force=args.force,
            quiet=args.quiet,
            command="python -m mla_ref recover " + shlex.join(argv),
            log=None if args.quiet else print,
        )
        if not args.quiet:
            if report.facts["warning"]:
                print(f"warning: {report.facts['warning']}")
            print(f"wrote {args.output} ({report.facts['format']}, {minutes(report.seconds)})")
            source_ppl = report.quality["source"].perplexity
            for name, q in report.quality.items():
                print(
                    f"  {name:<10} perplexity {q.perplexity:.4f} ({q.perplexity / source_ppl:.3f}× the source)   "
                    f"KL to source {q.kl_to_teacher:.4g} nats/token"
                )

    return run(parser, argv, action)

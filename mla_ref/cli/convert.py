"""``python -m mla_ref convert …`` and ``python -m mla_ref export …``: checkpoints to MLA, and to other layouts.

Both print one ``error: …`` line and return 2 on bad input, and 0 on success.
"""

from __future__ import annotations

import shlex

from mla_ref.cli.common import Parser, run
from mla_ref.convert.methods import METHODS
from mla_ref.convert.methods.base import PROFILES
from mla_ref.convert.stock_form import NORM_MODES
from mla_ref.dtypes import DTYPES
from mla_ref.hf.models import EXPORT_FORMATS, export_model
from mla_ref.pipelines.convert import ConvertOptions, convert_checkpoint
from mla_ref.pipelines.convert_options import FORMATS


def convert_parser() -> Parser:
    """The options of ``python -m mla_ref convert``."""
    parser = Parser(
        prog="python -m mla_ref convert",
        description="Convert a llama / qwen2 / mistral checkpoint (or an mla_ref GQA-family checkpoint) to MLA, "
        "layer by layer, and report what it costs against the source.",
    )
    parser.add_argument("source", metavar="SRC", help="Hugging Face checkpoint directory, or an mla_ref checkpoint")
    parser.add_argument("output", metavar="OUT", help="output directory (written only when complete)")
    parser.add_argument(
        "--method",
        choices=tuple(METHODS),
        default=None,
        help="conversion method (default: recipe when a size or budget is given, else exact): "
        + "; ".join(f"{name}: {method.title}" for name, method in METHODS.items()),
    )
    parser.add_argument("--budget", type=float, default=None, help="cache as a fraction of the source's, in (0, 1]; "
                        "d_c and d_R then follow the method's own rule (the recipe tries two splits and keeps the one "
                        "closer to the source on the calibration tokens), or d_c takes what --rope-dim leaves")  # fmt: skip
    parser.add_argument("--kv-lora-rank", type=int, default=None, help="d_c, the cached latent")
    parser.add_argument("--rope-dim", type=int, default=None, help="d_R, the shared roped key")
    parser.add_argument("--profile", choices=PROFILES, default=None, help="engine: the 512 + 64 latent of vLLM's "
                        "and SGLang's MLA kernels (sources caching more than 576 elements per token and layer)")  # fmt: skip
    parser.add_argument("--q-lora-rank", type=int, default=None, help="low-rank query bottleneck (default: none)")
    parser.add_argument("--freqfold", type=int, default=1, help="TransMLA's FreqFold F (transmla, recipe; default 1)")
    parser.add_argument(
        "--norm", choices=NORM_MODES, default=None, help="stock DeepSeek-V3's latent RMSNorm: an anchored extra "
        "coordinate that keeps it exact for one more cached element, or least-squares gains (default: anchor; "
        "gain with --profile engine)"
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="write the DeepSeek-V3 form even when it is materially "
                        "worse than the conversion on calibration text (CONVERSION.md then says so at the top)")  # fmt: skip
    parser.add_argument("--calib-dir", default=None, help="folder of text (default: the Python standard library)")
    parser.add_argument("--calib-tokens", type=int, default=ConvertOptions.calib_tokens,
                        help=f"calibration tokens, spread over the train split (default {ConvertOptions.calib_tokens})")  # fmt: skip
    parser.add_argument("--calib-extra-dir", default=None, help="a second folder of text, read whole, whose windows "
                        "are spaced evenly among the first's: text of another kind the model will read (English "
                        "prose beside code, say); the evaluation stays on --calib-dir's validation split")  # fmt: skip
    parser.add_argument("--calib-extra-tokens", type=int, default=None,
                        help="calibration tokens from --calib-extra-dir (default: as many as --calib-tokens)")  # fmt: skip
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens of the quality report (0: skip it)")
    parser.add_argument("--seq-len", type=int, default=256, help="window length of calibration and evaluation")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="stored weights (default: the source's)")
    parser.add_argument("--format", choices=FORMATS, default="deepseek-v3", help="output layout (default deepseek-v3)")
    parser.add_argument(
        "--device", default="cpu", help="where each layer is converted: cpu, cuda or cuda:N (default cpu)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no report on stdout")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    return parser


def convert_command(argv: list[str] | None = None) -> int:
    """``python -m mla_ref convert SRC OUT [--method …] …``"""

    def action(args, argv):
        options = ConvertOptions(
            method=args.method,
            budget=args.budget,
            kv_lora_rank=args.kv_lora_rank,
            rope_dim=args.rope_dim,
            q_lora_rank=args.q_lora_rank,
            freqfold=args.freqfold,
            profile=args.profile,
            norm=args.norm,
            force=args.force,
            format=args.format,
            dtype=args.dtype,
            calib_dir=args.calib_dir,
            calib_tokens=args.calib_tokens,
            calib_extra_dir=args.calib_extra_dir,
            calib_extra_tokens=args.calib_extra_tokens,
            eval_tokens=args.eval_tokens,
            seq_len=args.seq_len,
            device=args.device,
        )
        report = convert_checkpoint(
            args.source,
            args.output,
            options,
            overwrite=args.overwrite,
            quiet=args.quiet,
            command="python -m mla_ref convert " + shlex.join(argv),
        )
        if not args.quiet:
            print(f"wrote {args.output} ({args.format}, {report.seconds:.1f} s)")
            for line in report.summary_lines():
                print("  " + line)

    return run(convert_parser(), argv, action)


def export_command(argv: list[str] | None = None) -> int:
    """``python -m mla_ref export SRC OUT --format llama|qwen2|deepseek-v3 [--dtype D] [--overwrite]``"""
    parser = Parser(
        prog="python -m mla_ref export",
        description="Write a model (e.g. a lab teacher) in a Hugging Face layout that transformers loads as it is.",
    )
    parser.add_argument("source", metavar="SRC", help="an mla_ref checkpoint or any directory mla_ref reads")
    parser.add_argument("output", metavar="OUT", help="output directory (written only when complete)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, required=True, help="Hugging Face layout")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="stored weights (default: the source's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")

    def action(args, _argv):
        dtype = None if args.dtype is None else DTYPES[args.dtype]
        export_model(args.source, args.output, args.format, dtype=dtype, overwrite=args.overwrite)
        print(f"wrote {args.output} ({args.format})")

    return run(parser, argv, action)

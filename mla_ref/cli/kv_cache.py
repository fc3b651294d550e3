"""``python -m mla_ref kv-cache MODEL [--context N] [--batch B] [--dtype D] [--compare SRC] [--json]``.

A model's own cache next to MLA caches of DeepSeek's size (512 + 64) and smaller, from ``mla_ref.calculator``.
``--compare SRC`` adds the saving against another model; a directory written by ``convert`` is compared with
the source its CONVERSION.md names unless told otherwise.
"""

from __future__ import annotations

import json

from mla_ref.calculator import format_table, recorded_source, report
from mla_ref.cli.common import Parser, run
from mla_ref.dtypes import DTYPES
from mla_ref.model_shapes import PRESETS, load_model_shape
from mla_ref.records import CONVERSION_RECORD


def parser() -> Parser:
    result = Parser(
        prog="python -m mla_ref kv-cache",
        description="KV-cache bytes of a model's own attention next to MLA caches of several latent sizes.",
        epilog=f"presets: {', '.join(PRESETS)}",
    )
    result.add_argument("model", metavar="MODEL", help="a preset name, a config.json, or a directory holding one")
    result.add_argument("--context", type=int, default=4096, help="cached tokens per sequence (default 4096)")
    result.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    result.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="cache element type (default bf16)")
    result.add_argument(
        "--compare",
        metavar="SRC",
        help="also show the saving against SRC (a preset, config.json or directory); default for a directory "
        f"written by convert: the source its {CONVERSION_RECORD} names, when it is still there",
    )
    result.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return result


def main(argv: list[str] | None = None) -> int:
    """Returns 0, or 2 after printing one ``error: …`` line on stderr for bad input."""

    def action(args, _argv):
        shape = load_model_shape(args.model)
        compare = args.compare or recorded_source(args.model)
        other = None if compare is None else load_model_shape(compare)
        result = report(shape, args.context, args.batch, args.dtype, compare=other)
        print(json.dumps(result) if args.json else format_table(result))

    return run(parser(), argv, action)

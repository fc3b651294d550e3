"""``python -m mla_ref fetch NAME [DIR]``: a real pretrained model from the package index, as a Llama directory.

Prints where the model is and the figures its MODEL.md records; one ``error: …`` line and exit status 2 on bad
input or a failed fetch.
"""

from __future__ import annotations

import sys

from mla_ref.cli.common import Parser, run
from mla_ref.pipelines.fetch import (
    REAL_MODELS,
    UNQUANTIZED_TYPES,
    default_model_dir,
    directory_bytes,
    fetch_model,
    read_fetch_record,
)


def _parser() -> Parser:
    parser = Parser(
        prog="python -m mla_ref fetch",
        description="Download a real pretrained model from the package index and write it as a Hugging Face "
        "Llama directory (nothing is written unless it completes; a complete directory is left as it is).",
    )
    parser.add_argument("name", metavar="NAME", help=f"the model: {', '.join(REAL_MODELS)}")
    parser.add_argument(
        "directory", metavar="DIR", nargs="?", default=None, help="where to write it (default: $MLA_REF_MODELS/NAME, "
        "else ~/.cache/mla_ref/models/NAME)"
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR that is not a fetch of NAME")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def summary_lines(directory) -> list[str]:
    """What a fetched directory's MODEL.md record says, in a few lines."""
    record = read_fetch_record(directory)
    source = record["source"]
    stored = record["stored_types"]
    quantized = ", ".join(
        f"{kind} ({', '.join(stored[kind]['kinds'])})" for kind in stored if kind not in UNQUANTIZED_TYPES
    )
    return [
        f"{record['name']}: {directory} ({directory_bytes(directory) / 1e6:,.0f} MB, {record['dtype']})",
        f"  from {source['package']} {source['version']} ({source['licence']}): {source['member']}, "
        f"SHA-256 {source['sha256'][:16]}…, dequantized from {quantized}",
        f"  validation perplexity {record['perplexity']:.3f} over {record['eval_tokens']:,} tokens of "
        f"{record['corpus']} (windows of {record['seq_len']})",
        f"  greedy sample: {record['sample']!r}",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 on success, 2 (with one ``error: …`` line on stderr) otherwise."""

    def action(args, _argv):
        if args.name not in REAL_MODELS:
            raise ValueError(f"unknown model {args.name!r}; allowed: {', '.join(REAL_MODELS)}")
        directory = args.directory if args.directory is not None else default_model_dir(args.name)
        path = fetch_model(args.name, directory, quiet=args.quiet, overwrite=args.overwrite)
        print("\n".join(summary_lines(path)))

    return run(_parser(), argv, action)


if __name__ == "__main__":
    sys.exit(main())

"""What every command shares: argparse errors reported as one line, and the exit codes.

A command returns 0 on success and 2 after printing one ``error: …`` line on stderr for bad input (a value
argparse rejects, or a ``ValueError`` from the library below).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class UsageError(Exception):
    """An argument argparse rejected; ``run`` prints it on one line."""


class Parser(argparse.ArgumentParser):
    """argparse, except that a bad argument raises ``UsageError`` instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(message)


def run(
    parser: argparse.ArgumentParser, argv: list[str] | None, action: Callable[[argparse.Namespace, list], None]
) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and call ``action(args, argv)``; the command's exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
        action(args, argv)
    except (UsageError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    return 0

"""What every command shares: every failure reported as one line, and the exit codes.

A command returns

- 0 on success;
- 2 after one ``error: …`` line on stderr for bad input (a value argparse rejects, or a ``ValueError`` from the
  library below, which names the value and what is allowed);
- 1 after one ``error: …`` line naming the path and the cause when the system refuses (an ``OSError``: a
  read-only file system, a full disk, a missing permission);
- 130 (Ctrl-C) or 143 (SIGTERM) after one ``error: interrupted …`` line.

Whatever ends a command, an output it was writing is removed (``mla_ref.outputs``): SIGTERM is turned into an
exception for the length of the command, so the same clean-up runs as for Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator


class UsageError(Exception):
    """An argument argparse rejected; ``run`` prints it on one line."""


class Parser(argparse.ArgumentParser):
    """argparse, except that a bad argument raises ``UsageError`` instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(message)


class Terminated(BaseException):
    """SIGTERM arrived: raised where the command was, so that what it was writing is cleaned up."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` (signal handlers can only be set in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def describe_os_error(error: OSError) -> str:
    """One line for an OSError: the path(s) it concerns and the cause, e.g. ``'/x/out': Read-only file system``."""
    cause = error.strerror or str(error)
    paths = [repr(str(p)) for p in (error.filename, error.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {cause}" if paths else cause


def run(
    parser: argparse.ArgumentParser, argv: list[str] | None, action: Callable[[argparse.Namespace, list], None]
) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and call ``action(args, argv)``; the command's exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with _sigterm_raises():
            args = parser.parse_args(argv)
            action(args, argv)
    except (UsageError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: {describe_os_error(error)}; nothing was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("error: interrupted (SIGTERM); nothing was written", file=sys.stderr)
        return 143
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    return 0

"""Writing an output directory so that nothing is lost: not a source, not an earlier output, not a half-written one.

Every command that writes a directory (``convert``, ``export``, ``recover``, ``fetch``, ``train-teacher``) goes
through the two steps here.

1. ``check_output(out, inputs=…, overwrite=…)``, before any work.  OUT must not be, hold or lie inside one of
   the command's inputs (a source model, a text folder), nor be the current directory or hold it.  An existing
   OUT must be a folder; a non-empty one is replaced only with ``overwrite``, and only when it is a model
   directory (it holds ``config.json``), so a mistyped OUT can never empty a folder of other things.  An empty
   folder is used as it is.  OUT's nearest existing ancestor must be a writable folder.

2. ``staged_output(out, overwrite=…)`` yields an empty staging folder ``.OUT.partial-PID-XXXXXXXX`` beside OUT;
   the work writes there, and only when it is complete is the folder renamed to OUT.  On any error — a full
   disk, Ctrl-C, SIGTERM (which the command line turns into an exception) — the staging folder is removed.
   Without ``overwrite`` the rename is the one step that creates OUT: ``rename(2)`` fails when OUT has appeared
   meanwhile with anything in it, so a second command writing the same OUT at the same time is refused instead
   of silently replacing the first one's output.  With ``overwrite`` the old OUT is moved aside to
   ``.OUT.replaced-PID-XXXXXXXX``, the new one renamed in, and the old one removed.

A SIGKILL cannot be caught: it can leave a staging folder, or (between the two renames of an overwrite) an old
OUT moved aside.  The next command writing the same OUT clears both before it starts: a staging folder whose
process has gone is removed, and an old OUT moved aside by a process that has gone is put back where it was
when no new OUT took its place.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

STAGING = "partial"  # .OUT.partial-PID-…: an output being written
REPLACED = "replaced"  # .OUT.replaced-PID-…: an old output moved aside while its replacement lands
MODEL_MARKER = "config.json"  # what makes a directory a model directory that --overwrite may replace


def _leftover_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.({STAGING}|{REPLACED})-(\d+)-")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to another user
        return True
    return True


def clear_leftovers(out: str | os.PathLike) -> list[str]:
    """Remove what killed writers of ``out`` left beside it; return one line per thing cleared.

    A staging folder of a process that has gone is removed.  An old output moved aside by a process that has gone
    is put back at ``out`` when ``out`` is missing (the kill fell between the two renames), else removed (the new
    output landed).  Leftovers of running processes are left alone.
    """
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return []
    cleared = []
    pattern = _leftover_pattern(out.name)
    for path in sorted(parent.iterdir()):
        match = pattern.match(path.name)
        if match is None or not path.is_dir() or _process_alive(int(match.group(2))):
            continue
        kind = match.group(1)
        if kind == REPLACED and not out.exists():
            path.rename(out)
            cleared.append(f"restored {str(out)!r} from {path.name}, which a killed command had moved aside")
        else:
            shutil.rmtree(path, ignore_errors=True)
            what = "a half-written output" if kind == STAGING else "an old output already replaced"
            cleared.append(f"removed {path.name}, {what} of a command that was killed")
    return cleared


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_output(
    out: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    name: str = "OUT",
) -> Path:
    """Refuse, before any work, an output path that would lose data or could not be written; returns it as a Path.

    ``inputs``: what the command reads (None entries are skipped).  ``name``: how the messages call the output
    (``OUT``, ``--out``, ``DIR``).  Raises ValueError naming the path and what is allowed.
    """
    out = Path(out)
    if not str(out).strip():
        raise ValueError(f"{name} is empty; give a directory to write")
    resolved = out.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if _within(resolved, source) or _within(source, resolved):
            relation = "is" if resolved == source else ("lies inside" if _within(resolved, source) else "holds")
            raise ValueError(
                f"{name} {str(out)!r} {relation} the input {str(given)!r}; write the output somewhere else, "
                "so that no input is changed"
            )
    if _within(Path.cwd().resolve(), resolved):
        raise ValueError(f"{name} {str(out)!r} is the current directory or holds it; write the output to a new folder")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ValueError(f"{name} {str(out)!r} exists and is not a directory; give a directory to write")
        if any(out.iterdir()):
            if not overwrite:
                raise ValueError(f"{name} {str(out)!r} exists and is not empty; pass --overwrite to replace it")
            if not (out / MODEL_MARKER).is_file():
                raise ValueError(
                    f"{name} {str(out)!r} is not a model directory (it has no {MODEL_MARKER}); --overwrite replaces "
                    "only a model directory, so remove this one yourself or write elsewhere"
                )
    ancestor = _nearest_existing(resolved.parent)
    if not ancestor.is_dir():
        raise ValueError(f"{name} {str(out)!r} cannot be made: {str(ancestor)!r} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {str(out)!r} cannot be written: {str(ancestor)!r} is not writable")
    return out


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out``; on success it becomes ``out``, on any error it is removed.

    Without ``overwrite``, an ``out`` that some other writer filled meanwhile is never replaced: a ValueError
    says so and nothing is written.  See the module docstring for the steps.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for line in clear_leftovers(out):
        print(f"note: {line}", file=sys.stderr)
    pid = os.getpid()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{STAGING}-{pid}-", dir=out.parent))
    try:
        yield staging
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        staging.chmod(0o755)  # mkdtemp makes it private; a model directory is meant to be shared
        if overwrite and out.is_dir() and any(out.iterdir()):
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.{REPLACED}-{pid}-", dir=out.parent))
            aside.rmdir()  # only the unique name is wanted: out is renamed to it
            out.rename(aside)
            staging.rename(out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            try:
                # rename(2) onto a directory succeeds only when that directory is empty
                staging.rename(out)
            except OSError as error:
                raise ValueError(
                    f"{str(out)!r} appeared while this command ran (another command writing it?); it was left as "
                    f"it is and nothing was written ({error.strerror})"
                ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

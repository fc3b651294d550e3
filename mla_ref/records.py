"""The machine-readable end of a Markdown record (TRAINING.md, CONVERSION.md).

A record is prose for the reader followed by one section a program can read back:

    ## Record

    ```json
    { ...the facts... }
    ```
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CONVERSION_RECORD = "CONVERSION.md"  # what ``python -m mla_ref convert`` writes beside its output

_BLOCK = re.compile(r"## Record\s+```json\n(.*?)\n```", flags=re.DOTALL)


def record_section(facts: dict) -> list[str]:
    """The lines of the ``## Record`` section holding ``facts`` as indented JSON."""
    return ["", "## Record", "", "```json", json.dumps(facts, indent=2), "```", ""]


def read_record(path: str | Path) -> dict:
    """The facts of the ``## Record`` section of the Markdown file ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no record file {str(path)!r}")
    match = _BLOCK.search(path.read_text(encoding="utf-8"))
    if match is None:
        raise ValueError(f"{str(path)!r} has no '## Record' JSON block")
    try:
        return json.loads(match.group(1))
    except json.JSONDecodeError as exc:
        raise ValueError(f"the '## Record' block of {str(path)!r} is not valid JSON: {exc}") from exc

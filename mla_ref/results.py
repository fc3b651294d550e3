"""Read the figures a benchmark wrote: the markdown tables of a file in ``benchmarks/results``.

A lesson that cannot afford a measurement (a conversion at the converter's defaults takes minutes) reads it from the
results file the benchmark wrote, and names the command.  Each file is markdown: a ``Reproduce:`` line with the
command, then pipe tables, one header row, one separator row, then rows; a table of greedy samples follows the line
``Prompt `...`:`` that names its prompt.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"  # in a clone of the repository


def results_file(name: str) -> Path:
    """The path of ``benchmarks/results/NAME`` in this clone, checked to exist."""
    path = RESULTS_DIR / name
    if not path.is_file():
        known = sorted(p.name for p in RESULTS_DIR.glob("*.md")) if RESULTS_DIR.is_dir() else []
        raise FileNotFoundError(
            f"no results file {path}: the benchmarks' results ship with a clone of the repository, not with the "
            f"package; files there: {', '.join(known) or 'none'}"
        )
    return path


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def read_tables(path: str | Path) -> list[dict]:
    """Every pipe table of a results file, in order: {"title", "header", "rows", "lines"}.

    "title" is the nearest non-empty line above the table that is not itself a table line (a heading, or the
    ``Prompt `...`:`` line of a sample table); "header" the column names; "rows" the cells of each row as strings, in
    the header's order (a header may repeat a name, as "× source" does for two texts, so rows are lists); "lines" the
    rows as written (a sample may itself hold a "|").
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    tables, title, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|?[\s:|-]+\|?", lines[i + 1].strip()):
            header, rows, raw = _cells(line), [], []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                raw.append(lines[i])
                i += 1
            tables.append({"title": title, "header": header, "rows": rows, "lines": raw})
            continue
        if line.strip():
            title = line.strip()
        i += 1
    return tables


def reproduce_command(path: str | Path) -> str:
    """The command a results file says wrote it (the first `...` after "Reproduce:")."""
    text = Path(path).read_text(encoding="utf-8")
    match = re.search(r"Reproduce: `([^`]+)`", text)
    if match is None:
        raise ValueError(f"{path} names no command (no 'Reproduce: `...`' line)")
    return match[1]


def perplexity_rows(path: str | Path) -> list[dict]:
    """The quality table of a ``benchmarks/real_model.py`` results file, one dict per row: "method", "fraction"
    (cache kept, 1.0 for the source), "code" and "prose" (held-out perplexities), "seconds" (the conversion's, None
    for the source)."""
    table = next((t for t in read_tables(path) if t["header"][:2] == ["method", "cache"]), None)
    if table is None:
        raise ValueError(f"{path} holds no table with columns 'method | cache | ...'")
    column = {name: table["header"].index(name) for name in ("code ppl", "prose ppl", "convert s")}
    rows = []
    for cells in table["rows"]:
        seconds = cells[column["convert s"]].replace(",", "")
        rows.append(
            {
                "method": cells[0],
                "fraction": float(cells[1].rstrip("%")) / 100,
                "code": float(cells[column["code ppl"]].replace(",", "")),
                "prose": float(cells[column["prose ppl"]].replace(",", "")),
                "seconds": float(seconds) if seconds else None,
            }
        )
    return rows


def sample_tables(path: str | Path) -> dict[str, dict[str, str]]:
    """The greedy samples of a results file: {prompt: {model: continuation}}, the continuation unquoted."""
    samples = {}
    for table in read_tables(path):
        prompt = re.fullmatch(r"Prompt `(.*)`:", table["title"])
        if prompt and table["header"] == ["model", "continuation"]:
            rows = (re.fullmatch(r"\|\s*(.*?)\s*\|\s*(`.*`)\s*\|", line.strip()) for line in table["lines"])
            samples[prompt[1]] = {row[1]: _unquote(row[2]) for row in rows if row}
    return samples


def _unquote(cell: str) -> str:
    """`'…'` as the benchmark writes a continuation (Python's repr in backticks) -> the text itself."""
    text = cell.strip().strip("`")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, str) else text

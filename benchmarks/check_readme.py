"""Check that every number in the README's result tables comes from the result files it names.

Each result table in README.md is preceded by a marker line ``<!-- results: a.md b.json -->`` naming files
under benchmarks/results/; a table of settings or projections is preceded by ``<!-- not results: why -->``.
For every cell but the first of each row, every number must equal, at the precision the README prints it,
some number in the named files (Markdown or JSON): copied, or rounded, never typed in. Ratios printed with an
``x`` suffix are checked too when the files hold them; a number computed in the README alone fails.

    python benchmarks/check_readme.py           # exit 1 and one line per number that no file holds
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?:e-?\d+)?")
MARKER = re.compile(r"<!--\s*(results|not results):\s*(.*?)\s*-->")


def numbers(text: str) -> list[float]:
    out = []
    for tok in NUMBER.findall(text):
        try:
            out.append(float(tok.replace(",", "")))
        except ValueError:
            pass
    return out


def decimals(tok: str) -> int:
    tok = tok.replace(",", "")
    return len(tok.split(".")[1]) if "." in tok else 0


def tables(readme: str) -> list[tuple[str | None, str, list[str], int]]:
    """(marker kind, marker files, table rows, line number) for every table; marker None if there is none."""
    lines = readme.splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and set(lines[i + 1].replace("|", "").strip()) <= set("-: "):
            start = i
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            kind, files = None, ""
            for j in range(start - 1, max(start - 12, -1), -1):  # the nearest marker above, within the paragraph
                m = MARKER.search(lines[j])
                if m:
                    kind, files = m.group(1), m.group(2)
                    break
                if lines[j].startswith("|"):
                    break
            found.append((kind, files, rows[2:], start + 1))
            continue
        i += 1
    return found


def check(readme_path: Path = ROOT / "README.md", results: Path = RESULTS) -> list[str]:
    problems = []
    for kind, files, rows, line in tables(readme_path.read_text()):
        if kind is None:
            problems.append(f"README.md:{line}: table without a <!-- results: ... --> or <!-- not results: ... --> marker")
            continue
        if kind == "not results":
            continue
        pool: list[float] = []
        for name in files.split():
            path = results / name
            if not path.is_file():
                problems.append(f"README.md:{line}: marker names {name}, which is not in benchmarks/results/")
                continue
            pool += numbers(path.read_text())
        for row in rows:
            for cell in row.strip("|").split("|")[1:]:
                for tok in NUMBER.findall(cell):
                    x, d = float(tok.replace(",", "")), decimals(tok)
                    if not any(round(y, d) == x or (d == 0 and abs(y - x) <= 0.5) for y in pool):
                        problems.append(f"README.md:{line}: {tok!r} in row {row[:60]!r}... is in none of {files}")
    return problems


if __name__ == "__main__":
    bad = check()
    print("\n".join(bad) if bad else "every number in the README's result tables comes from its result files")
    sys.exit(1 if bad else 0)

"""The README's result tables hold only numbers their result files hold (benchmarks/check_readme.py)."""

import importlib
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _checker(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("check_readme")


def test_every_number_in_the_readmes_result_tables_is_in_its_result_files(monkeypatch):
    assert _checker(monkeypatch).check() == []


def test_the_check_catches_a_typed_in_number_and_an_unmarked_table(monkeypatch, tmp_path):
    check = _checker(monkeypatch).check
    (tmp_path / "r.md").write_text("| a | 12.34 | 1,227.51 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results: r.md -->\n| x | y | z |\n|---|---|---|\n| row | 12.3 | 1,228 |\n")
    assert check(readme, tmp_path) == []  # rounded from the file: fine
    readme.write_text("<!-- results: r.md -->\n| x | y |\n|---|---|\n| row | 12.5 |\n\n| u | v |\n|---|---|\n| 1 | 2 |\n")
    problems = check(readme, tmp_path)
    assert len(problems) == 2 and "'12.5'" in problems[0] and "without a" in problems[1]

"""CLI: user errors give one clear line and exit code 2, never a traceback."""

import pytest

from mixsparse.cli import main


@pytest.mark.parametrize("argv, message", [
    (["prune", "--sparsity", "1.5", "--out", "{tmp}/r"], "sparsity must be in [0, 1)"),
    (["prune", "--pattern", "4:2", "--out", "{tmp}/r"], "0 < N < M"),
    (["prune", "--pruner", "nope", "--model", "{tmp}/missing", "--out", "{tmp}/r"], "missing"),
    (["prune", "--set", "search.generatons=2", "--out", "{tmp}/r"], "search.generatons"),
    (["prune", "--allocation", "magic", "--out", "{tmp}/r"], "prune.allocation"),
    (["eval", "--model", "{tmp}/missing"], "missing"),
    (["report", "{tmp}/norun"], "run.json"),
])
def test_user_errors_exit_2_with_message(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixsparse: error:") and message in err
    assert "Traceback" not in err


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "sparsegpt" in out and "msp" in out

"""CLI: user errors give one clear line and exit code 2, never a traceback."""

import pytest

from mixsparse.cli import main


@pytest.mark.parametrize("argv, message", [
    (["prune", "--sparsity", "1.5", "--out", "{tmp}/r"], "sparsity must be in [0, 1)"),
    (["prune", "--pattern", "4:2", "--out", "{tmp}/r"], "0 < N < M"),
    (["prune", "--model", "{tmp}/missing", "--out", "{tmp}/r"], "missing"),
    (["prune", "--pruner", "nope", "--out", "{tmp}/r"], "nope"),
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


def _search_argv(model_dir, corpus, out):
    return ["search", "--model", str(model_dir), "--calibration", str(corpus), "--sparsity", "0.5",
            "--calib-samples", "2", "--seqlen", "32", "--device", "cpu", "--quiet",
            "--set", f"data.validation={corpus}", "--set", "search.fitness_seqlen=32",
            "--set", "search.fitness_windows=2", "--set", "search.stages=[[1,2],[2,1]]",
            "--set", "search.generations=2", "--set", "search.offspring=3", "--set", "search.population=2",
            "--set", "allocation.msp.samples=2", "--set", "allocation.msp.seqlen=32",
            "--set", "search.step=0.1", "--set", "search.max_shift=0.2", "--out", str(out)]


def test_search_under_torchrun_matches_one_process(tiny_llama_dir, word_corpus, tmp_path):
    """`torchrun -m mixsparse search` with 2 CPU processes (gloo) finds the one-process allocation."""
    import json
    import os
    import subprocess
    import sys

    corpus = word_corpus
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "mixsparse", *_search_argv(tiny_llama_dir, corpus, tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mixsparse", *_search_argv(tiny_llama_dir, corpus, tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "search.json").read_text()) for d in ("one", "two"))
    assert b["processes"] == 2 and a["processes"] == 1
    assert a["per_layer"] == b["per_layer"]
    assert a["search"]["evaluations"] == b["search"]["evaluations"]
    assert (tmp_path / "two" / "allocation.yaml").exists() and (tmp_path / "two" / "search_state.json").exists()

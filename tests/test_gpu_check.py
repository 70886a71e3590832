"""benchmarks/gpu_check.py end to end on the CPU with its tiny shape, so the GPU check cannot rot between
the sessions that have a GPU (it runs the placement tests on the simulated device here)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from .conftest import _tiny_tokenizer

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports its sibling `common`
    return importlib.import_module("gpu_check")


@pytest.fixture
def kit(tmp_path, word_corpus):
    d = tmp_path / "kit"
    _tiny_tokenizer().save_pretrained(d / "tokenizer")
    text = word_corpus.read_text()
    (d / "calibration.txt").write_text(text)
    (d / "validation.txt").write_text(text[::-1])
    return d


def test_the_gpu_check_runs_every_step_on_the_cpu(gpu_check, kit, tmp_path):
    out = tmp_path / "out"
    rc = gpu_check.main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--kit", str(kit),
                         "--out", str(out)])
    data = json.loads((out / "check.json").read_text())
    steps = data["steps"]
    failed = {n: s.get("error") or s.get("failed") or s.get("output_tail") for n, s in steps.items() if not s["ok"]}
    assert rc == 0 and not failed, failed
    assert list(steps) == ["placement_tests", "wanda_70", "sparsegpt_70", "msp_whole", "msp_blockwise", "moe_50",
                           "recovery_blockwise", "gptq_4bit", "export_compressed", "runtime_kernel", "runtime_model"]
    assert steps["moe_50"]["wanda"]["experts_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert steps["placement_tests"]["passed"] >= 20 and steps["placement_tests"]["device"] == "simulated"
    for pruner in ("wanda_70", "sparsegpt_70"):
        assert steps[pruner]["measured_sparsity"] == pytest.approx(0.7, abs=0.01)
    for mode in ("whole", "blockwise"):
        s = steps[f"msp_{mode}"]
        assert s["placement"] == mode and s["generations"] == 2 and s["average_sparsity"] == pytest.approx(0.7, abs=1e-9)
    assert steps["msp_blockwise"]["model_home"] == "cpu"
    assert steps["recovery_blockwise"]["zeros_unchanged"] and len(steps["recovery_blockwise"]["blocks"]) == 2
    assert steps["gptq_4bit"]["layers"] == 14 and steps["export_compressed"]["bit_exact"]
    kern = steps["runtime_kernel"]["128x64"]
    assert kern["bitmask-fp16"]["max_rel_error"] < 1e-5 and kern["bitmask-int4"]["bound_us"] > 0
    for fmt in ("fp16", "int4"):
        rt = steps["runtime_model"][f"bitmask-{fmt}@0.7"]
        assert rt["sparse_layers"] == 14 and rt["dense_layers"] == 0 and rt["same_greedy_tokens"] == "8/8"
    meta = data["meta"]
    assert meta["machine"]["cpu"] and meta["commit"] and meta["layers"] == 2
    md = (out / "check.md").read_text()
    assert "| export_compressed | yes |" in md and meta["command"] in md


def test_a_failing_step_is_recorded_and_fails_the_check(gpu_check, kit, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("planted")

    monkeypatch.setattr(gpu_check, "gptq_step", broken)
    out = tmp_path / "out"
    rc = gpu_check.main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--kit", str(kit),
                         "--out", str(out), "--skip", "placement_tests,msp_whole,msp_blockwise"])
    steps = json.loads((out / "check.json").read_text())["steps"]
    assert rc == 1 and steps["gptq_4bit"] == {**steps["gptq_4bit"], "ok": False, "error": "RuntimeError: planted"}
    assert steps["export_compressed"]["ok"]  # later steps still ran
    assert "| gptq_4bit | **no** |" in (out / "check.md").read_text()

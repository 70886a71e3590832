"""Smoke test of benchmarks/large_model.py on its tiny shape (a few seconds)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from mixsparse.errors import ConfigError

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

# tiny = hidden 64, intermediate 128, 2 layers, vocab 256 (untied head):
# embeddings + head 2*256*64, per block q/k/v/o 4*64*64 + MLP 3*64*128 + two norms 2*64, final norm 64.
TINY_PARAMS = 2 * 256 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
ROPE_BUFFER_BYTES = 2 * (64 // 4 // 2) * 4  # inv_freq and original_inv_freq, head_dim/2 float32 each


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports its sibling `common`
    return importlib.import_module("large_model")


def test_build_model_is_random_finite_and_has_real_rotary_buffers(bench):
    from transformers import AutoModelForCausalLM

    shape = bench.SHAPES["tiny"]
    model = bench.build_model(shape, torch.float16, seed=0)
    assert all(p.dtype == torch.float16 and p.device.type == "cpu" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == TINY_PARAMS == 115008
    assert bench.model_bytes(model) == 2 * TINY_PARAMS + ROPE_BUFFER_BYTES
    # meta + to_empty leaves buffers uninitialised: they must equal those of a normally built model
    ref = AutoModelForCausalLM.from_config(bench.llama_config(shape, torch.float16), dtype=torch.float16)
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.float16))
    w = model.model.layers[0].mlp.up_proj.weight.float()
    assert torch.isfinite(w).all() and 0.015 < w.std().item() < 0.025

    # re-randomising in place with the same seed restores the same dense weights
    before = {n: p.clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.data.zero_()
    bench.init_random_(model, seed=0, std=model.config.initializer_range)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_main_writes_and_appends_entries(bench, tmp_path):
    out = str(tmp_path / "lm")
    data = bench.main(["--shape", "tiny", "--device", "cpu", "--pruners", "wanda", "--out", out])
    (key,) = data["entries"]
    assert key == "tiny|cpu|float32|2x16|0.5|wanda"
    e = data["entries"][key]
    assert e["measured_sparsity"] == 0.5
    assert e["params"] == TINY_PARAMS and e["model_bytes"] == 4 * TINY_PARAMS + ROPE_BUFFER_BYTES
    assert e["cpu_working_mb"] == pytest.approx(e["peak_rss_mb"] - e["rss_before_mb"], abs=0.11)
    # the ratio is taken before rounding the MiB to 0.1
    assert e["cpu_working_ratio"] == pytest.approx(e["cpu_working_mb"] * 2**20 / e["model_bytes"],
                                                   abs=0.05 * 2**20 / e["model_bytes"] + 1e-4)
    assert e["peak_device_mb"] is None and e["peak_device_ratio"] is None
    assert e["seconds_per_block"] == pytest.approx(e["prune_seconds"] / 2, abs=1e-3)

    # a second run (other depth, other pruner) adds its row next to the first
    bench.main(["--shape", "tiny", "--layers", "3", "--device", "cpu", "--pruners", "magnitude", "--out", out])
    saved = json.loads(Path(out + ".json").read_text())
    assert set(saved["entries"]) == {key, "tiny-3L|cpu|float32|2x16|0.5|magnitude"}
    assert saved["entries"]["tiny-3L|cpu|float32|2x16|0.5|magnitude"]["layers"] == 3
    md = Path(out + ".md").read_text()
    assert "| tiny (2x64) |" in md and "| tiny-3L (3x64) |" in md
    assert "Not measured yet: LLaMA-7B shape on a GPU" in md
    assert "python benchmarks/large_model.py --shape 7b --device cuda" in md


def test_bad_arguments_raise_config_errors(bench):
    with pytest.raises(ConfigError, match="--layers"):
        bench.resolve(bench.parse_args(["--layers", "0"]))
    with pytest.raises(ConfigError, match="--seqlen"):
        bench.resolve(bench.parse_args(["--seqlen", "0"]))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            bench.resolve(bench.parse_args(["--device", "cuda"]))

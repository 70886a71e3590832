"""Run report: Markdown holds the run's numbers, plots are real PNGs, bad run.json is refused clearly."""

import json

import pytest

from mixsparse.errors import ConfigError, MixsparseError
from mixsparse.record import RunRecord
from mixsparse.report import plot_allocations, render_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KINDS = ["self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj"]


def _layers(blocks: int = 3) -> list[str]:
    return [f"model.layers.{b}.{k}" for b in range(blocks) for k in KINDS]


def full_run() -> dict:
    layers = _layers()
    per_layer = {name: round(0.6 + 0.05 * i / len(layers) * 4, 4) for i, name in enumerate(layers)}
    per_layer["model.layers.2.mlp.down_proj"] = "2:4"
    achieved = {n: (0.5 if isinstance(v, str) else v) for n, v in per_layer.items()}
    return {
        "command": "mixsparse prune --model embedded --pruner wanda --allocation msp --sparsity 0.7",
        "version": "0.1.0",
        "created": "2025-01-02T03:04:05",
        "config": {"model": "embedded", "pruner": "wanda", "sparsity": 0.7},
        "model": {"name": "SmolLM2-135M", "num_params": 134515008, "prunable_params": 106168320, "blocks": 3},
        "allocation": {
            "method": "msp",
            "target": 0.7,
            "per_layer": per_layer,
            "sensitivity": {n: 10.0 ** (i % 5 - 2) for i, n in enumerate(layers)},
            "sensitivity_kind": "fisher",
        },
        "search": {
            "history": [
                {"generation": g, "evaluations": 8 * (g + 1), "best_fitness": 2.0 / (g + 1), "seconds": 3.0 * g}
                for g in range(6)
            ],
            "fitness": "kl",
            "seconds": 123.4,
        },
        "pruning": {"pruner": "wanda", "achieved": achieved, "overall_sparsity": 0.69876, "seconds": 45.6},
        "perplexity": {"split": "test", "tokens": 20480, "seqlen": 512, "dense": 27.19, "pruned": 81.57},
        "zeroshot": {
            "sentiment": {"accuracy": 0.7125, "stderr": 0.0226, "n": 400},
            "cloze": {"accuracy": 0.3311, "stderr": 0.0149, "n": 1000},
        },
        "timings": {"load": 30.5, "search": 123.4, "prune": 45.6, "eval": 60.0},
        "peak_memory": {"cpu_rss_mb": 2345.6, "device_mb": None},
        "sizes": {
            "dense_bytes": 269030016,
            "compressed_bytes": 131072000,
            "ratio": 0.4872,
            "prunable_ratio": 0.3625,
            "prunable_dense_bytes": 212336640,
            "prunable_compressed_bytes": 76972032,
        },
        "artifacts": {"checkpoint": "model/", "compressed": "compressed/"},
    }


def _write(run_dir, run) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps(run))


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_full_report(tmp_path):
    _write(tmp_path, full_run())
    out = render_report(tmp_path)
    assert out == tmp_path / "report.md"
    md = out.read_text()
    for text in [
        "# mixsparse report: SmolLM2-135M",
        "| Pruner | wanda |",
        "| Allocation | msp |",
        "| Target sparsity | 70.00% |",
        "| Achieved overall sparsity | 69.88% |",
        "27.19",
        "81.57 (3.00x dense)",
        "| Search time | 123.4 s (2.1 min) |",
        "| Total time | 259.5 s (4.3 min) |",  # sum of the stages
        "2,345.6 MB",
        "| Peak device memory | n/a |",
        "256.57 MiB (269,030,016 B)",
        "0.487x / 0.362x",
        "| sentiment | 71.25% | 2.26% | 400 |",
        "| cloze | 33.11% | 1.49% | 1,000 |",
        "| **mean** | 52.18% |",
        "| load | 30.5 s |",
        "mixsparse prune --model embedded --pruner wanda --allocation msp --sparsity 0.7",
        "![Per-layer sparsity](plots/sparsity.png)",
        "![Per-layer sensitivity](plots/sensitivity.png)",
        "![Search curve](plots/search.png)",
        "![Checkpoint sizes](plots/sizes.png)",
        "- compressed: `compressed/`",
        '"pruner": "wanda"',
    ]:
        assert text in md, text
    # per-block table: block 2 holds the 2:4 layer; block 0 requested mean of 0.6, 0.6167, 0.6333, 0.65
    assert "| 0 | 4 | 62.50% | 60.00% – 65.00% | 62.50% |" in md
    block2 = next(line for line in md.splitlines() if line.startswith("| 2 | 4 |"))
    assert "68.75% (incl. 2:4)" in block2
    for name in ["sparsity", "sensitivity", "search", "sizes"]:
        assert _is_png(tmp_path / "plots" / f"{name}.png"), name
    assert not list(tmp_path.rglob(".*.tmp"))  # atomic writes left no temp files


def test_minimal_report(tmp_path):
    _write(tmp_path, {"config": {"model": "x"}})
    md = render_report(tmp_path).read_text()
    assert "# mixsparse report: model" in md
    assert "| Pruner | n/a |" in md and "| Total time | n/a |" in md
    assert "## Zero-shot" not in md and "## Plots" not in md and "## Timings" not in md
    assert '"model": "x"' in md
    assert not (tmp_path / "plots").exists() or not list((tmp_path / "plots").iterdir())


def test_partial_report_with_nulls(tmp_path):
    run = full_run()
    run.update(search=None, zeroshot=None, sizes=None)
    run["allocation"]["sensitivity"] = None
    run["perplexity"]["dense"] = None
    run["timings"]["total"] = 300.0
    _write(tmp_path, run)
    md = render_report(tmp_path).read_text()
    assert "Perplexity, pruned (test split, 20,480 tokens, seqlen 512) | 81.57 |" in md
    assert "| Total time | 300.0 s (5.0 min) |" in md
    assert "search.png" not in md and "sizes.png" not in md and "sensitivity.png" not in md
    assert _is_png(tmp_path / "plots" / "sparsity.png")


def test_missing_config_is_a_clear_error(tmp_path):
    run = full_run()
    del run["config"]
    _write(tmp_path, run)
    with pytest.raises(MixsparseError, match="no 'config' section"):
        render_report(tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_bad_run_json_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no run.json"):
        render_report(tmp_path)
    (tmp_path / "run.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        render_report(tmp_path)
    _write(tmp_path, {"config": {}, "perplexity": 5})
    with pytest.raises(ConfigError, match="'perplexity' must be a dict"):
        render_report(tmp_path)
    run = full_run()
    run["allocation"]["per_layer"]["model.layers.0.mlp.up_proj"] = 1.5
    _write(tmp_path, run)
    with pytest.raises(ConfigError, match="model.layers.0.mlp.up_proj"):
        render_report(tmp_path)


def test_load_run_fills_absent_sections(tmp_path):
    _write(tmp_path, {"config": {"a": 1}})
    run = RunRecord.load(tmp_path)
    assert run.config == {"a": 1} and run.search is None and run.sizes is None


def test_plot_allocations(tmp_path):
    layers = _layers(4)
    allocs = {
        "uniform": {n: 0.7 for n in layers},
        "owl": {n: 0.6 + 0.2 * i / len(layers) for i, n in enumerate(layers)},
        "nm": {n: "2:4" for n in layers},
    }
    sens = {"owl": {n: float(i + 1) for i, n in enumerate(layers)}, "uniform": None}
    path = plot_allocations(allocs, sens, tmp_path / "sub" / "alloc.png", "Allocation comparison")
    assert path == tmp_path / "sub" / "alloc.png" and _is_png(path)
    assert _is_png(plot_allocations(allocs, None, tmp_path / "only.png", "no sensitivity"))
    with pytest.raises(ConfigError):
        plot_allocations({}, None, tmp_path / "none.png", "empty")

"""End to end on the real embedded SmolLM2 with few tokens: the user's path through pipeline and CLI."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from mixsparse.cli import main
from mixsparse.config import load_config
from mixsparse.data import eval_windows, load_corpus
from mixsparse.evaluation import perplexity
from mixsparse.export import load_compressed
from mixsparse.modeling import param_counts
from mixsparse.allocation.methods.file import load_allocation
from mixsparse.pipeline import run
from mixsparse.record import RunRecord

pytestmark = pytest.mark.integration

FEW = {
    "data.calibration_samples": 2, "data.seqlen": 128, "data.eval_tokens": 1024,
    "allocation.msp.samples": 2, "allocation.msp.seqlen": 128,
    "search.generations": 1, "search.population": 2, "search.offspring": 2, "search.stages": [[1, 1]],
    "search.fitness_windows": 1, "search.fitness_seqlen": 128,
    "eval.zeroshot": ["sentiment", "cloze"], "eval.zeroshot_n": 6,
}


def test_msp_pipeline_end_to_end(embedded, tmp_path):
    model, tok = embedded
    model = copy.deepcopy(model)
    cfg = load_config(None, {**FEW, "prune.sparsity": 0.7, "prune.allocation": "msp", "prune.pruner": "wanda"})
    rec = run(cfg, tmp_path, model=model, tokenizer=tok, progress=False, command="test")
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["pruning"]["overall_sparsity"] == pytest.approx(0.7, abs=2e-3)
    assert saved["allocation"]["average_requested"] == pytest.approx(0.7, abs=1e-9)
    assert saved["search"]["generations"] == 1 and saved["search"]["history"]
    assert set(saved["zeroshot"]) == {"sentiment", "cloze"}
    assert saved["perplexity"]["pruned"] > saved["perplexity"]["dense"]
    for f in ("report.md", "allocation.yaml", "config.yaml", "model/config.json", "compressed/compression.json"):
        assert (tmp_path / f).exists(), f
    assert list((tmp_path / "plots").glob("*.png"))
    # the saved checkpoint is what was evaluated
    windows = eval_windows(tok, load_corpus("wiki", "test"), 128, 1024)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    assert perplexity(reloaded, windows, progress=False) == pytest.approx(rec.perplexity.pruned, rel=1e-5)
    assert reloaded.config.mixsparse["allocation"] == "msp"
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float16).eval()
    compressed = load_compressed(tmp_path / "compressed")
    ids = windows[:1, :64]
    assert torch.equal(half(ids).logits, compressed(ids).logits)
    # the allocation is reusable with any pruner
    assert load_allocation(tmp_path / "allocation.yaml", param_counts(model)).average() == pytest.approx(0.7, abs=1e-9)


def test_cli_prune_then_eval_reloads_same_perplexity(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--calib-samples", "2", "--seqlen", "128", "--eval-tokens", "512", "--quiet"]
    assert main(["prune", "--pruner", "sparsegpt", "--pattern", "2:4", "--no-zeroshot", "--out", str(out), *args,
                 "--set", "export.compressed=false"]) == 0
    rec = RunRecord.load(out)
    assert rec.pruning.overall_sparsity == pytest.approx(0.5, abs=1e-6)
    capsys.readouterr()
    assert main(["eval", "--model", str(out / "model"), *args, "--json", str(tmp_path / "eval.json")]) == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["perplexity"] == pytest.approx(rec.perplexity.pruned, rel=1e-5)
    assert ev["sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_quantized_run_exports_a_standard_checkpoint_with_the_same_perplexity(embedded, tmp_path):
    """A quick 50% uniform run + 4-bit GPTQ: model-quantized/ (compressed-tensors) reloads with plain
    from_pretrained and scores the in-memory model's perplexity; compressed/ restores the weights bit-exactly."""
    pytest.importorskip("compressed_tensors")
    model, tok = embedded
    model = copy.deepcopy(model)
    cfg = load_config(None, {**FEW, "prune.sparsity": 0.5, "eval.zeroshot": [], "quantize.method": "gptq",
                             "quantize.bits": 4, "quantize.group_size": 64})
    run(cfg, tmp_path, model=model, tokenizer=tok, progress=False, command="test")
    saved = json.loads((tmp_path / "run.json").read_text())
    windows = eval_windows(tok, load_corpus("wiki", "test"), 128, 1024)
    in_memory = perplexity(model, windows, progress=False)
    assert saved["perplexity"]["quantized"] == pytest.approx(in_memory, rel=1e-9)
    standard = AutoModelForCausalLM.from_pretrained(tmp_path / "model-quantized")
    assert standard.config.quantization_config is not None
    assert perplexity(standard, windows, progress=False) == pytest.approx(in_memory, rel=1e-9)
    packed = load_compressed(tmp_path / "compressed", dtype=torch.float32)
    for (n, a), (_, b) in zip(model.named_parameters(), packed.named_parameters()):
        if n.endswith("proj.weight"):
            assert torch.equal(a, b), n
    assert saved["sizes"]["bits_per_weight"] < 4

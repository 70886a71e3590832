"""Streaming a model larger than RAM from its checkpoint: the streamed run gives bit-identical pruned weights to
the in-memory run, never holds more than two blocks, and what needs the whole model says so."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from mixsparse.engine import prune_layerwise
from mixsparse.errors import ConfigError, ModelLoadError
from mixsparse.evaluation import perplexity
from mixsparse.modeling import measured_sparsity, param_counts
from mixsparse.sensitivity.owl import owl_outlier_ratios
from mixsparse.sparsity import NM, SparsityMap
from mixsparse.streaming import load_streamed, save_streamed, stream_of

from .tiny import tiny_ids, tiny_model

CALIB = tiny_ids(4, 16, seed=1)


@pytest.fixture
def saved(tmp_path):
    model = tiny_model("llama", num_hidden_layers=4)
    model.save_pretrained(tmp_path / "dense", max_shard_size="60KB")  # several shards, as a large checkpoint has
    return model, tmp_path / "dense"


@pytest.mark.parametrize("pruner, target", [("wanda", 0.6), ("sparsegpt", 0.5), ("magnitude", 0.7), ("wanda", NM(2, 4))])
def test_a_streamed_prune_equals_the_in_memory_one_bit_for_bit(saved, tmp_path, pruner, target):
    model, path = saved
    mem = copy.deepcopy(model)
    prune_layerwise(mem, CALIB, SparsityMap.uniform(target, param_counts(mem)), pruner, device="cpu", progress=False)
    streamed = load_streamed(path)
    assert all(p.is_meta for b in stream_of(streamed).blocks for p in b.parameters())  # no block in RAM after loading
    prune_layerwise(streamed, CALIB, SparsityMap.uniform(target, param_counts(streamed)), pruner, device="cpu",
                    progress=False)
    stream = stream_of(streamed)
    assert stream.peak_live <= 2 and not stream.live  # one block in flight (two while one is read)
    assert measured_sparsity(streamed) == measured_sparsity(mem)
    back = AutoModelForCausalLM.from_pretrained(save_streamed(streamed, tmp_path / "out"))
    theirs = dict(back.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in mem.named_parameters())


def test_owl_and_perplexity_stream_block_by_block(saved):
    model, path = saved
    streamed = load_streamed(path)
    assert owl_outlier_ratios(streamed, CALIB, progress=False) == owl_outlier_ratios(model, CALIB, progress=False)
    ev = tiny_ids(2, 16, seed=4)
    assert perplexity(streamed, ev, device="cpu") == pytest.approx(perplexity(model, ev, device="cpu", layerwise=True),
                                                                  rel=1e-12)
    assert stream_of(streamed).peak_live <= 2


def test_what_needs_the_whole_model_refuses_a_streamed_one(saved):
    from mixsparse.placement import Placement

    _, path = saved
    streamed = load_streamed(path)
    with pytest.raises(ConfigError, match="streamed from its checkpoint"), Placement(torch.device("cpu"), "whole").whole(streamed):
        pass


def test_a_checkpoint_under_other_names_is_refused_before_any_work(saved, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    model, path = saved
    single = tmp_path / "renamed"
    model.save_pretrained(single)
    state = load_file(str(single / "model.safetensors"))
    state = {k.replace("layers.2.mlp.up_proj", "layers.2.mlp.w3"): v for k, v in state.items()}
    save_file(state, str(single / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((single / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="model.layers.2.mlp.up_proj.weight"):
        load_streamed(single)


def test_the_temporary_work_directory_goes_with_the_model(saved):
    import gc

    _, path = saved
    streamed = load_streamed(path)
    prune_layerwise(streamed, CALIB, SparsityMap.uniform(0.5, param_counts(streamed)), "magnitude", progress=False)
    work = stream_of(streamed).work_dir
    assert len(list(work.glob("block-*.safetensors"))) == 4
    del streamed
    gc.collect()
    assert not work.exists()


@pytest.mark.parametrize("pruner, incremental", [("wanda", True), ("sparsegpt", False)])
def test_a_streamed_search_equals_the_in_memory_one_bit_for_bit(saved, pruner, incremental):
    """MSP on a streamed model: the Fisher seed, the level database (a mask-only pruner's masks on disk), every
    fitness value, the search's path and the stitched model are those of the in-memory run."""
    from mixsparse.search import Fitness, LevelDatabase, LevelSpace, SearchConfig, evolutionary_search
    from mixsparse.sensitivity import model_fingerprint
    from mixsparse.sensitivity.fisher import fisher_trace

    model, path = saved
    windows = tiny_ids(3, 16, seed=2)
    cfg = SearchConfig(generations=2, population=2, offspring=3, stages=[[1, 2], [3, 1]])

    def search(m):
        counts = param_counts(m)
        trace = fisher_trace(m, CALIB[:2], device="cpu", progress=False)
        space = LevelSpace.unstructured(0.6, counts, step=0.1, max_shift=0.2)
        with LevelDatabase.build(m, space, CALIB, pruner, device="cpu", progress=False) as db:
            ram = db.ram_bytes_used()
            fit = Fitness(db, windows, "kl", device="cpu", dtype="model", incremental=incremental)
            init = {n: (1 if i % 2 else -1) for i, n in enumerate(sorted(counts))}
            res = evolutionary_search(fit, space, [init, {n: 0 for n in counts}], cfg, progress=False)
            memo = dict(fit.memo)
            db.write(res.offsets)
        return trace, res, memo, ram

    mem = copy.deepcopy(model)
    streamed = load_streamed(path)
    fp = model_fingerprint(streamed)
    assert fp == model_fingerprint(load_streamed(path)) and fp != model_fingerprint(mem)  # blocks are hashed
    got, want = search(streamed), search(mem)
    assert got[0] == want[0]  # Fisher traces
    def path(res):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in res.history]

    assert got[1].offsets == want[1].offsets and path(got[1]) == path(want[1])
    assert got[2] == want[2]  # every fitness value
    if pruner == "wanda":
        assert got[3] == 0 < want[3]  # the streamed model's masks live on disk, not in RAM
    stream = stream_of(streamed)
    assert stream.peak_live <= 2 and not stream.live
    assert model_fingerprint(streamed) != fp  # the stitched blocks were written: the fingerprint follows them
    assert measured_sparsity(streamed) == measured_sparsity(mem)


RECOVER = ["--recover", "blockwise", "--set", "recover.blockwise.epochs=2", "--set", "recover.blockwise.samples=2"]


QUANT = ["--group-size", "16", "--set", "export.quantized_hf=false"]  # that export needs the quant extra


@pytest.mark.parametrize("extra", [RECOVER, ["--quantize", "gptq", *QUANT],
                                   ["--quantize", "rtn", *QUANT, "--set", "prune.allocation=owl"]],
                         ids=["msp-blockwise", "msp-gptq", "owl-rtn"])
def test_the_cli_prunes_a_streamed_model_like_an_in_memory_one(tiny_llama_dir, word_corpus, tmp_path, extra):
    """`mixsparse prune --set model.stream=always`: MSP (Fisher seed, level database, search) or OWL, pruning, block-wise
    recovery (the checkpoint is the dense teacher) or quantization, evaluation and the HF checkpoint, block by
    block; the same allocation, recovery, quantization and weights as the in-memory run."""
    import json

    from mixsparse.cli import main

    from .test_cli import _search_argv

    def prune(stream: str):
        out = tmp_path / stream
        argv = ["prune", *_search_argv(tiny_llama_dir, word_corpus, out)[1:], "--set", f"model.stream={stream}",
                "--set", f"data.evaluation={word_corpus}", "--set", "data.eval_tokens=256",
                "--set", "eval.zeroshot=[sentiment]", "--set", "eval.zeroshot_n=8", *extra]
        assert main(argv) == 0
        return json.loads((out / "run.json").read_text()), out

    (on, on_dir), (off, off_dir) = prune("always"), prune("never")
    assert on["placement"]["streamed"] is True and off["placement"]["streamed"] is False
    assert on["allocation"]["per_layer"] == off["allocation"]["per_layer"]
    assert on["pruning"]["achieved"] == off["pruning"]["achieved"]
    assert on["coverage"] == off["coverage"]
    quantized = "--quantize" in extra
    if quantized:
        assert on["quantization"]["scheme"] == off["quantization"]["scheme"]
        assert on["quantization"].get("fallbacks") == off["quantization"].get("fallbacks")
    else:
        assert on["recovery"]["blocks"] == off["recovery"]["blocks"] and on["recovery"]["zeros_unchanged"]
    for k in ("dense", "pruned", "quantized" if quantized else "recovered"):
        assert on["perplexity"][k] == pytest.approx(off["perplexity"][k], rel=1e-5)
    assert on["zeroshot"] == off["zeroshot"]
    if not quantized:  # the compressed export, block by block (a streamed run keeps no packed codes)
        assert on["sizes"] == off["sizes"]
        from safetensors.torch import load_file

        # the same tensors (the header's metadata order varies between writes)
        x, y = (load_file(str(d / "compressed" / "model.compressed.safetensors")) for d in (on_dir, off_dir))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        i, j = (json.loads((d / "compressed" / "compression.json").read_text()) for d in (on_dir, off_dir))
        assert i["tensors"] == j["tensors"] and i["aliases"] == j["aliases"]
    a = AutoModelForCausalLM.from_pretrained(on_dir / "model")
    b = dict(AutoModelForCausalLM.from_pretrained(off_dir / "model").named_parameters())
    assert all(torch.equal(p, b[n]) for n, p in a.named_parameters())
    assert a.config.mixsparse["per_layer"] == on["allocation"]["per_layer"]


def test_a_streamed_run_refuses_what_does_not_stream_before_any_work(tiny_llama_dir, word_corpus, tmp_path, capsys):
    from mixsparse.cli import main

    from .test_cli import _search_argv

    argv = ["prune", *_search_argv(tiny_llama_dir, word_corpus, tmp_path / "r")[1:], "--set", "model.stream=always",
            "--recover", "lora"]
    assert main(argv) == 2
    assert "recovery lora trains the whole model at once" in capsys.readouterr().err


def test_auto_streams_only_a_model_that_would_not_fit(saved, caplog):
    from mixsparse.streaming import should_stream

    _, path = saved
    assert not should_stream(path, torch.float32)  # a few hundred KB
    with caplog.at_level("WARNING"):
        assert should_stream(path, torch.float32, share=1e-9)  # as if RAM were tiny
    assert "streamed from the checkpoint" in caplog.text
    assert not should_stream(path.parent / "nowhere", torch.float32)  # not a safetensors checkpoint: load it whole

"""One placement policy, checked stage by stage on a simulated second device (``tests/simdevice.py``).

Every stage runs with ``device=simdev`` on a tiny model: any op that mixes the device with the CPU
raises, the numbers must equal the CPU run, and the model must be back at its home (the CPU) after
the stage. Two tests plant the bugs the policy exists to prevent and show they are caught.

``MIXSPARSE_TEST_DEVICE=cuda`` runs the same tests on a real accelerator in place of the simulated one
(``benchmarks/gpu_check.py`` does): real CUDA raises its own error when an op mixes devices.
"""

import copy

import pytest
import torch

from mixsparse.engine import LayerwiseRunner, prune_layerwise
from mixsparse.evaluation import perplexity
from mixsparse.modeling import param_counts
from mixsparse.placement import Placement
from mixsparse.search import Fitness, LevelDatabase, LevelSpace, SearchConfig, evolutionary_search
from mixsparse.sparsity import SparsityMap

from .numerics import assert_same_pruned
from .simdevice import MixedDeviceError, device_under_test, to_plain
from .tiny import tiny_ids, tiny_model

DEV, simulated_device, REAL = device_under_test()
MIXING = RuntimeError if REAL else MixedDeviceError  # what an op mixing the device with the CPU raises


def at_home(model) -> bool:
    return all(t.device.type == "cpu" and type(t).__name__ != "SimTensor"
               for t in list(model.parameters()) + list(model.buffers()))


def weights(model):
    return {n: to_plain(p).detach().clone() for n, p in model.named_parameters()}


def assert_same_weights(a, b):
    """Masks exactly, kept values within rounding of the sweep that wrote them (``tests/numerics.py``)."""
    assert_same_pruned(weights(a), weights(b))


def test_simulated_device_rejects_mixing_and_computes_like_the_cpu():
    model = tiny_model("llama")
    ids = tiny_ids(1, 8)
    ref = model(input_ids=ids).logits
    with simulated_device():
        moved = copy.deepcopy(model).to(DEV)
        out = moved(input_ids=ids.to(DEV)).logits
        assert out.device.type == DEV.type
        with pytest.raises(MIXING):
            moved(input_ids=ids)  # CPU ids, device weights
        with pytest.raises(MIXING):
            torch.ones(3, device=DEV) + torch.ones(3)
    torch.testing.assert_close(to_plain(out), ref)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_calibration_catch_leaves_the_model_home(arch):
    model = tiny_model(arch)
    with simulated_device():
        with Placement.stage(model):
            state = LayerwiseRunner(model, device=Placement(DEV)).catch([tiny_ids(2, 8)])
        assert state.hidden[0].device.type == "cpu"  # activations offloaded
    assert at_home(model)


@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sequential", [True, False])
def test_pruning_on_the_device_equals_the_cpu(pruner, sequential):
    model = tiny_model("llama")
    cpu = copy.deepcopy(model)
    smap = SparsityMap.uniform(0.5, param_counts(model))
    prune_layerwise(cpu, tiny_ids(), smap, pruner, sequential=sequential, progress=False)
    with simulated_device():
        prune_layerwise(model, tiny_ids(), smap, pruner, device=DEV, sequential=sequential, progress=False)
    assert at_home(model)
    assert_same_weights(model, cpu)


def test_fisher_trace_on_the_device_equals_the_cpu():
    from mixsparse.sensitivity.fisher import fisher_trace

    model = tiny_model("llama")
    ref = fisher_trace(model, tiny_ids(2, 12), progress=False)
    with simulated_device():
        dev = fisher_trace(model, tiny_ids(2, 12), device=DEV, progress=False)
    assert at_home(model)
    for n in ref:
        assert dev[n] == pytest.approx(ref[n], rel=1e-4)


def test_hessian_trace_on_the_device_equals_the_cpu():
    from mixsparse.sensitivity.hessian import hessian_trace

    model = tiny_model("llama")
    ref = hessian_trace(model, tiny_ids(1, 8), n_probes=2, seed=0, progress=False)
    with simulated_device():
        dev = hessian_trace(model, tiny_ids(1, 8), n_probes=2, seed=0, device=DEV, progress=False)
    assert at_home(model)
    for n in ref:
        assert dev[n] == pytest.approx(ref[n], rel=1e-3, abs=1e-7)


def test_owl_ratios_on_the_device_equal_the_cpu():
    from mixsparse.sensitivity.owl import owl_outlier_ratios

    model = tiny_model("llama")
    ref = owl_outlier_ratios(model, tiny_ids(), M=2.0, progress=False)
    with simulated_device():
        dev = owl_outlier_ratios(model, tiny_ids(), M=2.0, device=DEV, progress=False)
    assert at_home(model)
    assert dev == ref


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("mode", ["whole", "blockwise"])
def test_level_database_fitness_and_search_on_the_device_equal_the_cpu(pruner, mode):
    cfg = SearchConfig(generations=2, population=2, offspring=3, stages=[[1, 2], [2, 1]], seed=1)
    windows = tiny_ids(2, 12, seed=4)
    results = {}
    for where in ("cpu", "device"):
        model = tiny_model("llama")
        space = LevelSpace.unstructured(0.5, param_counts(model), step=0.1, max_shift=0.2)
        init = {n: 0 for n in space.param_counts}
        if where == "cpu":
            db = LevelDatabase.build(model, space, tiny_ids(), pruner, progress=False)
            fit = Fitness(db, windows, "kl", placement=mode, dtype="model", incremental=True)
            results[where] = evolutionary_search(fit, space, [init], cfg, progress=False)
            continue
        with simulated_device():
            db = LevelDatabase.build(model, space, tiny_ids(), pruner, device=DEV, progress=False)
            assert at_home(model)
            fit = Fitness(db, windows, "kl", device=DEV, placement=mode, dtype="model", incremental=True)
            assert at_home(model)  # the fitness works on device copies; it must never move the model itself
            results[where] = evolutionary_search(fit, space, [init], cfg, progress=False)
            assert at_home(model)
            db.write(results[where].offsets)  # the stitched final model, written at home
        assert at_home(model)
    assert results["cpu"].offsets == results["device"].offsets
    # a KL of ~1e-4 between near-identical distributions: the device path may take another attention kernel
    assert results["cpu"].fitness == pytest.approx(results["device"].fitness, rel=1e-2, abs=1e-7)


@pytest.mark.parametrize("mode", ["whole", "blockwise"])
def test_perplexity_on_the_device_equals_the_cpu(mode):
    model = tiny_model("llama")
    ref = perplexity(model, tiny_ids(3, 16), progress=False)
    with simulated_device():
        dev = perplexity(model, tiny_ids(3, 16), device=Placement(DEV, mode), progress=False)
    assert at_home(model)
    assert dev == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("mode", ["whole", "blockwise"])
def test_zero_shot_scoring_on_the_device_equals_the_cpu(tiny_llama, tmp_path, mode):
    """lm-eval scores on the device: the whole model moved there, or (``blockwise``) block by block."""
    pytest.importorskip("lm_eval")  # not on the GPU machine's image
    from mixsparse.zeroshot import evaluate_zeroshot

    model, tok = tiny_llama
    polarity = tmp_path / "polarity.csv"
    polarity.write_text("".join(f'"{1 if i % 2 else -1}","the {w} stone is quiet"\n'
                                for i, w in enumerate(["green", "north", "light", "paper"])))
    cloze = "\n".join(" ".join(["the river is green and the stone is light"] * 7) + f" near the {w}."
                      for w in ["north", "paper", "seven"])
    kw = dict(n={"sentiment": 4, "cloze": 3}, batch_size=2, progress=False, polarity_path=polarity, cloze_text=cloze)
    ref = evaluate_zeroshot(model, tok, **kw)
    seen = set()  # where the forwards' inputs were
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.add((args[0] if args else kwargs["input_ids"]).device.type), with_kwargs=True)
    with simulated_device():
        dev = evaluate_zeroshot(model, tok, device=Placement(DEV, mode), **kw)
    hook.remove()
    assert seen == {DEV.type}
    assert at_home(model)
    assert dev.keys() == ref.keys()
    for task in ref:
        assert dev[task] == pytest.approx(ref[task])


def test_msp_pipeline_and_export_on_the_device(tiny_llama, word_corpus, tmp_path):
    """The whole job (calibration, Fisher, level database, fitness, dense reference, pruning, perplexity,
    export) with ``model.device`` set to the simulated device."""
    from mixsparse.config import load_config
    from mixsparse.pipeline import run

    model, tok = tiny_llama
    cpu_model = copy.deepcopy(model)
    over = {"data.calibration": str(word_corpus), "data.validation": str(word_corpus),
            "data.evaluation": str(word_corpus), "data.calibration_samples": 2, "data.seqlen": 32,
            "data.eval_tokens": 64, "prune.sparsity": 0.5, "prune.allocation": "msp",
            "allocation.msp.samples": 2, "allocation.msp.seqlen": 32, "search.generations": 1,
            "search.population": 2, "search.offspring": 2, "search.stages": [[1, 1], [2, 1]],
            "search.fitness_windows": 2, "search.fitness_seqlen": 32, "search.step": 0.1, "search.max_shift": 0.2,
            "search.fitness_dtype": "model", "eval.zeroshot": [], "export.report": False}
    rec_cpu = run(load_config(None, {**over, "model.device": "cpu"}), tmp_path / "cpu", model=cpu_model,
                  tokenizer=tok, progress=False)
    with simulated_device():
        rec = run(load_config(None, {**over, "model.device": DEV.type, "model.placement": "blockwise"}),
                  tmp_path / "dev", model=model, tokenizer=tok, progress=False)
    assert at_home(model)
    assert rec.to_dict()["placement"] == {"device": DEV.type, "mode": "blockwise", "dtype": "float32",
                                          "compute_dtype": "float32", "whole_upcast": None,
                                              "streamed": False}
    assert rec.allocation.per_layer == rec_cpu.allocation.per_layer
    assert rec.perplexity.pruned == pytest.approx(rec_cpu.perplexity.pruned, rel=1e-4)
    assert (tmp_path / "dev" / "model" / "model.safetensors").exists()
    assert_same_weights(model, cpu_model)


# ------------------------------------------------------------------------------ planted bugs
def test_planted_bug_a_stage_that_leaves_the_model_half_placed_is_caught(monkeypatch):
    """The bug the issue found by reading: the calibration catch left embeddings/head on the device and
    blocks went home, so the model was half-placed for the next stage. With the policy's stage exit
    disabled, the stage tests above must fail."""
    import contextlib

    monkeypatch.setattr(Placement, "stage", staticmethod(lambda m: contextlib.nullcontext(torch.device("cpu"))))
    with pytest.raises(AssertionError):
        test_pruning_on_the_device_equals_the_cpu("wanda", True)
    with pytest.raises(AssertionError):
        test_calibration_catch_leaves_the_model_home("llama")


def test_planted_bug_a_block_input_left_on_the_cpu_is_caught(monkeypatch):
    """A fitness forward that forgets to move a block's input to the device must fail, not pass."""
    from mixsparse.search import fitness as fitness_mod

    def run_block_without_moving_input(self, i, tensors, hidden, kwargs):
        out = torch.func.functional_call(self.blocks[i], tensors, (hidden,), kwargs[i], strict=False)
        return (out[0] if isinstance(out, tuple) else out).to(self.placement.store)

    model = tiny_model("llama")
    space = LevelSpace.unstructured(0.5, param_counts(model), step=0.1, max_shift=0.2)
    monkeypatch.setattr(fitness_mod.CandidateForward, "run_block", run_block_without_moving_input)
    with simulated_device():
        db = LevelDatabase.build(model, space, tiny_ids(), "wanda", device=DEV, progress=False)
        with pytest.raises(MIXING):
            Fitness(db, tiny_ids(2, 12), "kl", device=DEV, placement="blockwise", dtype="model")


@pytest.mark.parametrize("family", ["gemma3"])
def test_hybrid_attention_layerwise_on_the_device_equals_the_whole_model(family):
    """The block runner on the device: sliding and global layers each get their own mask (and Gemma-3 its two
    rotary tables), so the layer-wise logits equal the CPU's whole-model forward. (GPT-OSS's MoE routing counts
    experts with an integer histogram when its tensors are not on the CPU, which this CPU build lacks: the
    simulated device cannot run it; tests/test_architectures.py covers it on the CPU.)"""
    from .tiny import family_model

    model = family_model(family)
    ids = tiny_ids(2, 16)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    with simulated_device():
        ((_, got),) = list(LayerwiseRunner(model, device=Placement(DEV)).forward_all([ids]))
        got = to_plain(got)
    assert at_home(model)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

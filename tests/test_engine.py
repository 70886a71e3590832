"""The layer-wise engine on tiny random models of several architectures."""

import pytest
import torch

from mixsparse.engine import LayerwiseRunner, observe_layerwise, prune_layerwise
from mixsparse.errors import DataError, SparsityError
from mixsparse.masks import is_nm
from mixsparse.modeling import find_decoder_blocks, param_counts, prunable_linears
from mixsparse.pruners import get_pruner
from mixsparse.sparsity import NM, SparsityMap

from .tiny import CONFIGS, tiny_ids, tiny_model

ARCHS = sorted(CONFIGS)


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_and_linears_found_generically(arch):
    model = tiny_model(arch)
    name, blocks = find_decoder_blocks(model)
    assert len(blocks) == 2 and name.endswith("layers")
    lins = prunable_linears(model)
    assert len(lins) == 2 * (7 if arch != "opt" else 6)  # q,k,v,o + 3 MLP (OPT: 2 MLP)
    assert all("lm_head" not in n for n in lins)


@pytest.mark.parametrize("arch", ARCHS)
def test_layerwise_forward_equals_full_forward(arch):
    model = tiny_model(arch)
    ids = tiny_ids(5, 16)
    ref = model(ids).logits
    out = torch.cat([lg for _, lg in LayerwiseRunner(model).forward_all([ids[:2], ids[2:4], ids[4:]])])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
def test_sparsity_zero_leaves_model_unchanged(arch, pruner):
    model = tiny_model(arch)
    ids = tiny_ids(3, 16)
    ref = model(ids).logits
    prune_layerwise(model, ids, SparsityMap.uniform(0.0, param_counts(model)), pruner, progress=False)
    assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
def test_achieved_sparsity_is_counted_from_weights(arch, pruner):
    model = tiny_model(arch)
    counts = param_counts(model)
    report = prune_layerwise(model, tiny_ids(4, 16), SparsityMap.uniform(0.6, counts), pruner, progress=False)
    for name, lin in prunable_linears(model).items():
        measured = float((lin.weight == 0).float().mean())
        assert report.achieved[name] == pytest.approx(measured)
        assert measured == pytest.approx(0.6, abs=0.02)
    assert report.overall(counts) == pytest.approx(0.6, abs=0.01)


def test_mixed_per_layer_targets_and_nm():
    model = tiny_model("llama")
    counts = param_counts(model)
    names = list(counts)
    targets = {n: (NM(2, 4) if i % 3 == 0 else NM(1, 4) if i % 3 == 1 else 0.3) for i, n in enumerate(names)}
    targets[names[-1]] = 0.0
    prune_layerwise(model, tiny_ids(), SparsityMap(targets, counts), "sparsegpt", progress=False)
    lins = prunable_linears(model)
    for name, t in targets.items():
        w = lins[name].weight
        if isinstance(t, NM):
            assert is_nm(w != 0, t)
        else:
            assert int((w == 0).sum()) == round(w.numel() * t)


def test_layers_missing_from_map_stay_dense():
    model = tiny_model("llama")
    counts = param_counts(model)
    first = next(iter(counts))
    before = {n: l.weight.clone() for n, l in prunable_linears(model).items()}
    prune_layerwise(model, tiny_ids(), SparsityMap({first: 0.5}, counts), "wanda", progress=False)
    for name, lin in prunable_linears(model).items():
        assert torch.equal(lin.weight, before[name]) == (name != first)


def test_sequential_and_one_shot_differ_only_after_first_block():
    a, b = tiny_model("llama"), tiny_model("llama")
    counts = param_counts(a)
    ids = tiny_ids()
    prune_layerwise(a, ids, SparsityMap.uniform(0.5, counts), "sparsegpt", sequential=True, progress=False)
    prune_layerwise(b, ids, SparsityMap.uniform(0.5, counts), "sparsegpt", sequential=False, progress=False)
    la, lb = prunable_linears(a), prunable_linears(b)
    assert all(torch.equal(la[n].weight, lb[n].weight) for n in la if ".layers.0." in n)
    assert not all(torch.equal(la[n].weight, lb[n].weight) for n in la if ".layers.1." in n)


def test_on_layer_sees_every_linear_with_statistics():
    model = tiny_model("llama")
    seen = {}
    observe_layerwise(model, tiny_ids(), lambda n, lin: get_pruner("wanda")(lin, layer_name=n),
                      lambda n, p: seen.__setitem__(n, p.nsamples))
    assert set(seen) == set(prunable_linears(model)) and set(seen.values()) == {4 * 16}


def test_bad_inputs_give_clear_errors():
    model = tiny_model("llama")
    counts = param_counts(model)
    with pytest.raises(SparsityError, match="does not have"):
        prune_layerwise(model, tiny_ids(), SparsityMap({"model.layers.9.mlp.up_proj": 0.5}), "wanda", progress=False)
    with pytest.raises(SparsityError, match="divide"):
        prune_layerwise(model, tiny_ids(), SparsityMap.uniform("2:3", counts), "wanda", progress=False)
    with pytest.raises(DataError, match="calibration"):
        prune_layerwise(model, None, SparsityMap.uniform(0.5, counts), "wanda", progress=False)
    with pytest.raises(DataError, match="non-empty"):
        prune_layerwise(model, torch.zeros(0, 8, dtype=torch.long), SparsityMap.uniform(0.5, counts), "wanda",
                        progress=False)


def test_magnitude_needs_no_data():
    model = tiny_model("llama")
    counts = param_counts(model)
    report = prune_layerwise(model, None, SparsityMap.uniform(0.5, counts), "magnitude", progress=False)
    assert report.overall(counts) == pytest.approx(0.5)


def test_device_map_dispatched_model_is_taken_over(tiny_llama):
    """A model dispatched by accelerate (hooks, hf_device_map) prunes like a plain one."""
    import copy

    from accelerate import dispatch_model

    model, _ = tiny_llama
    plain = copy.deepcopy(model)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    dispatched = dispatch_model(model, device_map={"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu",
                                                   "model.rotary_emb": "cpu", "lm_head": "cpu"})
    assert hasattr(dispatched, "hf_device_map")
    smap = SparsityMap.uniform(0.5, param_counts(plain))
    prune_layerwise(plain, ids, smap, "wanda", progress=False)
    prune_layerwise(dispatched, ids, smap, "wanda", progress=False)
    assert not hasattr(dispatched, "hf_device_map")
    for (n, a), (_, b) in zip(plain.named_parameters(), dispatched.named_parameters()):
        assert torch.equal(a, b), n


def test_offloaded_meta_weights_are_a_clear_error(tiny_llama, tmp_path):
    from accelerate import dispatch_model

    from mixsparse.errors import ConfigError

    model, _ = tiny_llama
    offloaded = dispatch_model(model, device_map={"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
                                                  "model.rotary_emb": "cpu", "lm_head": "cpu"},
                               offload_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="offloaded by accelerate"):
        LayerwiseRunner(offloaded)


def test_arch_skip_is_honoured_by_pruning_and_by_the_observe_pass(monkeypatch):
    from mixsparse.modeling import ARCHITECTURES, ArchSpec

    monkeypatch.setitem(ARCHITECTURES, "llama", ArchSpec(skip=("mlp.down_proj",)))
    model = tiny_model("llama")
    counts = param_counts(model)
    assert counts and not any(n.endswith("down_proj") for n in counts)
    seen = set()
    observe_layerwise(model, tiny_ids(), lambda n, lin: get_pruner("wanda")(lin, layer_name=n), lambda n, p: seen.add(n))
    assert seen == set(counts)
    skipped = "model.layers.0.mlp.down_proj"
    with pytest.raises(SparsityError, match="does not prune"):
        prune_layerwise(model, tiny_ids(), SparsityMap({skipped: 0.5}), "wanda", progress=False)
    before = model.get_submodule(skipped).weight.detach().clone()
    report = prune_layerwise(model, tiny_ids(), SparsityMap.uniform(0.5, counts), "wanda", progress=False)
    assert set(report.achieved) == set(counts)
    assert torch.equal(model.get_submodule(skipped).weight, before)

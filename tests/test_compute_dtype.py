"""The placement policy's compute dtype: a bf16/fp16 model on a device that only emulates its dtype is upcast
to float32 while placed and narrowed back when it leaves; zeros are kept exactly and the results match the
model's own dtype within bf16 tolerance.

Tolerances, measured on the tiny Llama (3 blocks, bf16, 8 x 32 calibration tokens): Wanda and SparseGPT masks at
50% differ in 4 and 10 of 27,648 weights (near-ties of scores whose activations were computed in bf16 vs float32),
perplexity by under 0.01%; the tests allow 0.1% of the masks and 0.5% of the perplexity.
"""

import copy

import pytest
import torch

from mixsparse import placement as placement_mod
from mixsparse.engine import prune_layerwise
from mixsparse.evaluation import perplexity
from mixsparse.modeling import find_decoder_blocks, param_counts, prunable_linears
from mixsparse.placement import Placement, compute_dtype, narrow
from mixsparse.quant.grid import QuantSpec
from mixsparse.quant.stage import quantize_model
from mixsparse.recovery import BlockwiseOptions
from mixsparse.recovery.blockwise import reconstruct_blockwise
from mixsparse.recovery.common import DenseStore, zero_masks
from mixsparse.sparsity import SparsityMap

from .tiny import tiny_ids, tiny_model

CPU = torch.device("cpu")
OWN = Placement(CPU, "blockwise")
UP = Placement(CPU, "blockwise", compute=torch.float32)
IDS = tiny_ids(8, 32)


def bf16_model():
    return tiny_model("llama", num_hidden_layers=3).to(torch.bfloat16)


def dtypes(model):
    return {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}


def test_auto_upcasts_only_where_the_dtype_is_emulated(monkeypatch):
    monkeypatch.setattr(placement_mod, "fast_bf16", lambda device: False)
    assert compute_dtype("auto", torch.bfloat16, CPU) == torch.float32
    assert compute_dtype("model", torch.bfloat16, CPU) is None
    assert compute_dtype("auto", torch.float32, CPU) is None and compute_dtype("float32", torch.float32, CPU) is None
    monkeypatch.setattr(placement_mod, "fast_bf16", lambda device: True)
    assert compute_dtype("auto", torch.bfloat16, CPU) is None  # native bf16: nothing changes
    assert compute_dtype("float32", torch.bfloat16, CPU) == torch.float32
    with pytest.raises(Exception, match="model.compute_dtype"):
        compute_dtype("float64", torch.bfloat16, CPU)


def test_narrowing_rounds_once_and_never_makes_a_new_zero():
    t = torch.tensor([0.0, 1e-45, -1e-45, 1.0 + 2**-10, -3.0])  # 1e-45 flushes to 0 in bf16
    out = narrow(t, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out == 0, t == 0)
    assert float(out[1]) > 0 > float(out[2]) and float(out[3]) == 1.0 and float(out[4]) == -3.0


def test_a_placed_block_computes_in_float32_and_comes_back_bit_identical():
    model = bf16_model()
    _, blocks = find_decoder_blocks(model)
    before = {n: p.detach().clone() for n, p in blocks[0].named_parameters()}
    params = dict(blocks[0].named_parameters())
    with Placement.stage(model), UP.block(blocks[0]) as b:
        assert all(p.dtype == torch.float32 for p in b.parameters())
        assert next(blocks[1].parameters()).dtype == torch.bfloat16  # one block in flight at a time
    assert all(p is params[n] and torch.equal(p, before[n]) for n, p in blocks[0].named_parameters())


def test_an_error_inside_a_stage_still_restores_the_model_dtype():
    model = bf16_model()
    want = dtypes(model)
    with pytest.raises(RuntimeError, match="planted"), Placement.stage(model):
        UP.upcast(model)
        raise RuntimeError("planted")
    assert dtypes(model) == want


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_pruning_in_float32_matches_the_models_own_dtype(pruner):
    base = bf16_model()
    want = dtypes(base)
    own, up = copy.deepcopy(base), copy.deepcopy(base)
    prune_layerwise(own, IDS, SparsityMap.uniform(0.5, param_counts(own)), pruner, device=OWN, progress=False)
    prune_layerwise(up, IDS, SparsityMap.uniform(0.5, param_counts(up)), pruner, device=UP, progress=False)
    assert dtypes(up) == want  # stored in bf16 again
    a, b = prunable_linears(own), prunable_linears(up)
    differ = sum(int(((a[n].weight == 0) != (b[n].weight == 0)).sum()) for n in a)
    assert differ <= 0.001 * sum(a[n].weight.numel() for n in a)
    ev = tiny_ids(4, 32, seed=9)
    assert perplexity(up, ev, device=OWN) == pytest.approx(perplexity(own, ev, device=OWN), rel=0.005)


def test_blockwise_recovery_in_float32_compute_keeps_zeros_and_learns_like_float32(tmp_path):
    opts = BlockwiseOptions(epochs=3, lr=1e-4, batch_size=2, dtype="float32")
    ratios = {}
    for name, dtype, where in (("fp32", torch.float32, OWN), ("bf16-up", torch.bfloat16, UP)):
        model = tiny_model("llama", num_hidden_layers=3).to(dtype)
        dense = DenseStore.snapshot(model, tmp_path / name, "fp")
        prune_layerwise(model, IDS, SparsityMap.uniform(0.6, param_counts(model)), "wanda", progress=False)
        zeros = zero_masks(model)
        rec = reconstruct_blockwise(model, IDS, dense, opts, device=where, progress=False)
        assert all(torch.equal(zeros[n], z) for n, z in zero_masks(model).items())
        assert next(model.parameters()).dtype == dtype
        ratios[name] = [b["mse_after"] / b["mse_before"] for b in rec["blocks"]]
    assert ratios["bf16-up"] == pytest.approx(ratios["fp32"], abs=0.01)


def test_gptq_on_an_upcast_block_stores_scales_in_the_model_dtype():
    model = bf16_model()
    prune_layerwise(model, IDS, SparsityMap.uniform(0.5, param_counts(model)), "wanda", progress=False)
    zeros = zero_masks(model)
    codes, _ = quantize_model(model, "gptq", QuantSpec(4, 16, True), IDS, device=UP, progress=False)
    for n, lin in prunable_linears(model).items():
        assert lin.weight.dtype == torch.bfloat16 and codes[n].scale_dtype == torch.bfloat16, n
        assert torch.equal(codes[n].dequantize().to(torch.bfloat16), lin.weight), n  # what the exports check
        assert not bool((zeros[n] & (lin.weight != 0)).any())


def test_whole_stages_run_in_the_model_dtype_when_the_float32_copy_does_not_fit(monkeypatch, caplog):
    model = bf16_model()
    whole = Placement(CPU, "whole", compute=torch.float32)
    monkeypatch.setattr(placement_mod, "available_ram_bytes", lambda: 1000)
    with whole.whole(model):
        assert next(model.parameters()).dtype == torch.bfloat16
    assert "would not fit" in caplog.text
    monkeypatch.setattr(placement_mod, "available_ram_bytes", lambda: 2**40)
    with whole.whole(model):
        assert next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).dtype == torch.bfloat16

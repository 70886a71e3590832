"""Quantization of the kept weights: exact grids on hand-built tensors, zeros kept, GPTQ <= RTN error,
joint SparseGPT, the layer-wise stage on a tiny model."""

import pytest
import torch

from mixsparse.errors import ConfigError, NumericalError
from mixsparse.quant.grid import QuantSpec, find_params, quantize_rtn
from mixsparse.quant.gptq import obs_sweep
from mixsparse.pruners.sparsegpt import inverse_hessian_factor

from .tiny import tiny_ids, tiny_model


def test_symmetric_int4_grid_on_a_hand_built_row():
    # max |w| = 1.5 -> scale 1.5 / 7.5 = 0.2, stored as float16 0.19995; the grid is [-8, 7] * scale
    w = torch.tensor([[1.5, -1.5, 0.0, 0.31, -0.29, 0.1, 1.0, -0.7]])
    qw = quantize_rtn(w, QuantSpec(4, 0, True))
    s = qw.scale.item()
    assert s == torch.tensor(0.2).half().item()
    # 1.5/s = 7.502 -> 8, clamped to 7; 0.1/s = 0.5001 -> 1; -0.7/s = -3.5009 -> -4
    expected = torch.tensor([[7, -8, 0, 2, -1, 1, 5, -4]], dtype=torch.float32)
    assert torch.equal(qw.codes.float() - 8, expected)  # unsigned codes = q + 8
    torch.testing.assert_close(qw.dequantize(), expected * s)
    assert qw.dequantize()[0, 2] == 0


def test_asymmetric_grid_has_zero_on_it_and_uses_the_full_range():
    w = torch.tensor([[0.0, 0.5, 1.0, 1.5, 3.0, 0.0, 2.25, 0.75]])  # all >= 0: range [0, 3]
    spec = QuantSpec(2, 0, False)  # 4 levels: 0, 1, 2, 3 * scale
    qw = quantize_rtn(w, spec)
    assert qw.scale.item() == pytest.approx(1.0)
    assert qw.zero.item() == 0
    assert torch.equal(qw.dequantize(), torch.tensor([[0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 2.0, 1.0]]))  # round half to even


@pytest.mark.parametrize("bits,group,sym", [(4, 8, True), (4, 8, False), (8, 0, True), (8, 16, False), (3, 4, True)])
def test_every_value_is_on_its_groups_grid_and_zeros_stay_zero(bits, group, sym):
    torch.manual_seed(0)
    w = torch.randn(6, 32)
    w[torch.rand_like(w) < 0.7] = 0  # 70% pruned
    spec = QuantSpec(bits, group, sym)
    qw = quantize_rtn(w, spec)
    deq = qw.dequantize()
    assert torch.all(deq[w == 0] == 0)  # the mask is unchanged
    assert qw.codes.max() <= 2**bits - 1
    g = group or 32
    for r in range(6):
        for k in range(32 // g):
            s, z = qw.scale[r, k], qw.zero[r, k]
            vals = deq[r, k * g:(k + 1) * g] / s + z
            assert torch.allclose(vals, vals.round(), atol=1e-4)  # on the grid
            assert s == s.half().float()  # float16 scales (a float32 model): what the checkpoints store
    err = (deq - w).abs()
    # nearest point: half a step, plus where the grid's end clips (+max is 7.5 steps on the symmetric int4 grid,
    # whose top is 7), plus the float16 rounding of the scale (relative 2**-11) over the range
    step = qw.scale.repeat_interleave(g, dim=1)
    assert bool((err <= step * (0.5 + (spec.qmax - spec.qmin) * 2**-11) + 1e-7).all())


def test_bad_specs_are_one_line_errors():
    with pytest.raises(ConfigError, match="bits must be one of"):
        QuantSpec(5)
    with pytest.raises(ConfigError, match="does not divide the 48 input features of x"):
        QuantSpec(4, 32).groups(48, "x")
    with pytest.raises(NumericalError, match="overflows float16"):
        find_params(torch.tensor([[1e7, -1.0]]), QuantSpec(4, 0))


def _layer_problem(seed=0, rows=16, cols=64, n=512):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(cols, cols, generator=g)
    X = torch.randn(n, cols, generator=g) @ basis * 0.3  # correlated inputs: where GPTQ beats RTN
    W = torch.randn(rows, cols, generator=g)
    W[torch.rand(rows, cols, generator=g) < 0.6] = 0
    H = 2 * X.t() @ X / n
    return W, X, inverse_hessian_factor(H, 0.01)


@pytest.mark.parametrize("group", [16, 0])
def test_gptq_error_is_at_most_rtn_error_and_keeps_the_mask(group):
    W, X, Hinv = _layer_problem()
    spec = QuantSpec(4, group, True)
    out, pruned, qw = obs_sweep(W, Hinv, 32, fixed=W == 0, spec=spec)
    assert torch.equal(pruned, W == 0) and torch.all(out[W == 0] == 0)
    assert torch.equal(qw.dequantize(), out)  # the codes give back exactly the swept weight
    rtn = quantize_rtn(W, spec).dequantize()
    e_gptq = ((X @ (out - W).t()) ** 2).sum()
    e_rtn = ((X @ (rtn - W).t()) ** 2).sum()
    assert e_gptq <= e_rtn


def _old_sparsegpt(W0, Hinv, target, bs):
    """SparseGPT's column sweep as it was before the shared OBS sweep (commit 43154e9), unstructured and N:M."""
    from mixsparse.masks import prune_count, split_counts
    from mixsparse.sparsity import NM

    W = W0.float().clone()
    rows, cols = W.shape
    prune = torch.zeros(rows, cols, dtype=torch.bool)
    if isinstance(target, NM):
        bs = max(target.m, (bs // target.m) * target.m)
    starts = list(range(0, cols, bs))
    sizes = [min(bs, cols - s) for s in starts]
    if not isinstance(target, NM):
        per_block = split_counts([s * rows for s in sizes], prune_count(W.numel(), target))
    for b, (i1, count) in enumerate(zip(starts, sizes)):
        i2 = i1 + count
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1, d = torch.zeros_like(W1), torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if not isinstance(target, NM) and per_block[b] > 0:
            idx = torch.sort((W1**2 / d.unsqueeze(0) ** 2).flatten(), stable=True).indices[: per_block[b]]
            mask1.view(-1)[idx] = True
        for i in range(count):
            w = W1[:, i]
            if isinstance(target, NM) and i % target.m == 0:
                sal = W1[:, i: i + target.m] ** 2 / d[i: i + target.m].unsqueeze(0) ** 2
                mask1[:, i: i + target.m].scatter_(1, torch.sort(sal, dim=1, stable=True).indices[:, : target.m - target.n], True)
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2], prune[:, i1:i2] = W1, mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return torch.where(~prune, W, torch.zeros(())), prune


@pytest.mark.parametrize("target", [0.6, "2:4"])
def test_the_shared_sweep_is_exactly_the_old_sparsegpt_without_quantization(target):
    from mixsparse.sparsity import parse_layer_sparsity

    W, _, Hinv = _layer_problem(seed=3, rows=12, cols=48)
    t = parse_layer_sparsity(target)
    new_w, new_prune, qw = obs_sweep(W, Hinv, 16, target=t)
    old_w, old_prune = _old_sparsegpt(W, Hinv, t, 16)
    assert qw is None and torch.equal(new_prune, old_prune) and torch.equal(new_w, old_w)


def test_joint_sparsegpt_prunes_and_quantizes_in_one_sweep():
    from mixsparse.pruners.sparsegpt import SparseGPTPruner

    _, X, _ = _layer_problem(rows=8, cols=32)
    lin = torch.nn.Linear(32, 8, bias=False)
    lin.weight.data = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    joint = SparseGPTPruner(lin, SparseGPTPruner.Options(blocksize=16, bits=4, group_size=16))
    plain = SparseGPTPruner(lin, SparseGPTPruner.Options(blocksize=16))
    for p in (joint, plain):
        p.add_batch(X[:, :32])
    rj, rp = joint.compute(0.5), plain.compute(0.5)
    assert (rj.weight == 0).float().mean() >= 0.5 and (~rj.mask).float().mean() == 0.5
    assert torch.equal(rj.quantized.dequantize()[rj.mask], rj.weight[rj.mask])
    assert rp.quantized is None and not torch.equal(rj.weight, rp.weight)
    # on the layer's inputs the joint result is close to the unquantized one (4-bit error only)
    rel = ((X[:, :32] @ (rj.weight - rp.weight).t()) ** 2).sum() / ((X[:, :32] @ rp.weight.t()) ** 2).sum()
    assert rel < 0.05
    # a layer the map leaves dense is still quantized in joint mode
    r0 = joint.compute(0.0)
    assert joint.changes_unpruned() and r0.quantized is not None and bool(r0.mask.all())


def test_quantize_stage_rtn_and_gptq_on_a_tiny_model():
    from mixsparse.engine import prune_layerwise
    from mixsparse.modeling import param_counts, prunable_linears
    from mixsparse.quant.stage import quantize_model
    from mixsparse.sparsity import SparsityMap

    ids = tiny_ids(4, 16)
    for method in ("rtn", "gptq"):
        model = tiny_model("llama")
        prune_layerwise(model, ids, SparsityMap.uniform(0.5, param_counts(model)), "wanda", progress=False)
        zeros = {n: l.weight == 0 for n, l in prunable_linears(model).items()}
        codes, rec = quantize_model(model, method, QuantSpec(4, 16), ids, device="cpu", progress=False)
        assert rec["scheme"] == "int4-sym-g16"
        for n, l in prunable_linears(model).items():
            assert torch.all(l.weight[zeros[n]] == 0), n
            assert torch.equal(codes[n].dequantize(), l.weight.data), n


def test_an_already_quantized_model_is_refused():
    from mixsparse.quant.stage import quantize_model

    model = tiny_model("llama")
    model.config.quantization_config = {"quant_method": "compressed-tensors"}
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(model, "rtn", QuantSpec(4, 16), progress=False)


# the stage in a run ------------------------------------------------------------------------------
@pytest.fixture
def quick(quick_cli):
    return quick_cli(sparsity=0.5)


@pytest.mark.parametrize("method,pruner", [("gptq", "wanda"), ("rtn", "wanda"), ("joint", "sparsegpt")])
def test_prune_and_quantize_packed_checkpoint_is_bit_exact(quick, tmp_path, method, pruner):
    import json

    from transformers import AutoModelForCausalLM

    from mixsparse.cli import main
    from mixsparse.export import load_compressed
    from mixsparse.modeling import prunable_linears

    out = tmp_path / "run"
    assert main(["prune", *quick, "--pruner", pruner, "--quantize", method, "--bits", "4", "--group-size", "16",
                 "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["quantization"]["scheme"] == "int4-sym-g16" and run["perplexity"]["quantized"] > 0
    hf = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)  # the in-memory weights, saved
    packed = load_compressed(out / "compressed", dtype=torch.float32)
    for name, lin in prunable_linears(hf).items():
        w = prunable_linears(packed)[name].weight
        assert torch.equal(w, lin.weight), name
        frac = run["pruning"]["achieved"][name]
        assert float((w == 0).float().mean()) >= frac - 1e-6, name  # the pruned zeros are all there
    # 4-bit codes + bitmask + float16 scales: well under the 16 bits of float16 weights
    assert run["sizes"]["bits_per_weight"] < 0.5 * 16


@pytest.mark.parametrize("args,needle", [
    (["--quantize", "rtn", "--bits", "5"], "bits must be 2, 3, 4 or 8"),
    (["--quantize", "rtn", "--group-size", "24"], "does not divide the 32 input features"),
    (["--quantize", "joint"], "needs --pruner sparsegpt"),
    (["--quantize", "joint", "--pruner", "sparsegpt", "--recover", "blockwise"], "use quantize.method gptq"),
    (["--pruner", "sparsegpt", "--set", "prune.options={bits: 4}"], "quantization is set under quantize"),
    (["--bits", "4"], "add --quantize"),
])
def test_bad_quantization_settings_are_one_line_errors(quick, tmp_path, capsys, args, needle):
    from mixsparse.cli import main

    assert main(["prune", *quick, *args, "--out", str(tmp_path / "run")]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mixsparse:")]
    assert len(lines) == 1 and needle in lines[0], lines


def test_compressed_tensors_export_reloads_bit_exact_on_a_tiny_model(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from mixsparse.engine import prune_layerwise
    from mixsparse.modeling import param_counts, prunable_linears
    from mixsparse.quant.ct_export import save_compressed_tensors
    from mixsparse.quant.stage import quantize_model
    from mixsparse.sparsity import SparsityMap

    ids = tiny_ids(4, 16)
    for sym, bits, group in ((True, 4, 16), (False, 4, 0), (True, 8, 32)):
        model = tiny_model("llama")
        prune_layerwise(model, ids, SparsityMap.uniform(0.5, param_counts(model)), "wanda", progress=False)
        codes, _ = quantize_model(model, "gptq", QuantSpec(bits, group, sym), ids, device="cpu", progress=False)
        info = save_compressed_tensors(model, codes, tmp_path / f"ct{sym}{bits}")
        kw = {} if sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
        assert ("dequantize=True" in info["load"]) == (not sym)
        back = AutoModelForCausalLM.from_pretrained(tmp_path / f"ct{sym}{bits}", **kw)
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)  # decompresses on first call
        for name, lin in prunable_linears(model).items():
            assert torch.equal(prunable_linears(back)[name].weight, lin.weight), name

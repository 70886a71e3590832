"""Joint (sparsity, bits) search: the cost of every variant, the exact bytes budget, the level database's choice,
the packed encodings of quantized layers, and a run end to end on a tiny model."""

import importlib.util
import json
import math
import random

import pytest
import torch

from mixsparse.errors import ConfigError
from mixsparse.search.joint import JointSpace, Variant, layer_bits
from mixsparse.search.space import mutate

from .tiny import tiny_ids, tiny_model

SHAPES = {"a": (64, 128), "b": (64, 128), "c": (128, 64), "d": (32, 128), "e": (32, 128)}


def test_a_dense_variant_costs_its_bits_plus_scales_and_a_pruned_one_adds_the_mask():
    numel, groups = 64 * 128, 64 * 2  # group size 64
    assert layer_bits(Variant(0.0, 3), numel, groups, True) == numel * 3 + groups * 16
    assert layer_bits(Variant(0.5, 4), numel, groups, True) == numel + numel // 2 * 4 + groups * 16
    assert layer_bits(Variant(0.5, 4), numel, groups, False) == numel + numel // 2 * 4 + groups * 24
    assert layer_bits(Variant(0.5, 3), 8 * 3, 1, True) == 8 * (3 + 5 + 2)  # 12 codes of 3 bits: 5 whole bytes
    # 3.25 bits per weight with group-64 scales: dense 3-bit, 1/3 + 3-bit, 50% + 4-bit, 75% + 8-bit, whole
    # weights per row (43 of 128 is the first count at or above a third)
    space = JointSpace.build(3.25, SHAPES, bits=(2, 3, 4, 8))
    got = {(v.bits, v.sparsity) for v in space.variants("a", 0)}
    assert got == {(3, 0.0), (3, 43 / 128), (4, 0.5), (8, 0.75)}
    # a width whose dense cost is between two levels is offered at the level above (group 128: 3.125 -> 3.25)
    space = JointSpace.build(3.25, {"a": SHAPES["a"], "b": SHAPES["b"]}, bits=(3, 4), group_size=128)
    assert Variant(0.0, 3) in space.variants("a", 0) and Variant(0.0, 3) not in space.variants("a", -1)


@pytest.mark.parametrize("target,step,group", [(3.25, 0.25, 64), (2.75, 0.25, 64), (4.0, 0.5, 64), (3.0, 0.25, 0)])
def test_every_variant_fits_its_level_and_a_pruned_one_fills_it_to_within_a_weight_per_row(target, step, group):
    space = JointSpace.build(target, SHAPES, step=step, max_shift=1.0, bits=(2, 3, 4, 8), group_size=group)
    for name, (rows, cols) in SHAPES.items():
        for k in space.offsets:
            budget = space.level(k) * rows * cols
            for v in space.variants(name, k):
                got = layer_bits(v, rows * cols, space.groups(name), True)
                assert got <= budget + 1e-6, (name, k, v)
                slack = step * rows * cols if v.sparsity == 0 else rows * v.bits + 16
                assert got > budget - slack, (name, k, v)
                assert round(v.sparsity * cols, 9).is_integer()  # whole weights per row


def test_mutations_keep_the_bytes_within_the_budget():
    space = JointSpace.build(3.25, SHAPES, bits=(3, 4, 8))
    rng = random.Random(0)
    for name in SHAPES:  # any variant per level: the budget holds whichever the database picks
        space.chosen[name] = {k: rng.choice(space.variants(name, k)) for k in space.offsets}
    offsets = {n: 0 for n in SHAPES}
    for _ in range(200):
        offsets = mutate(offsets, space, rng, 3)
        assert space.residual(offsets) == 0
        bpw = space.bits_per_weight(offsets)
        assert 3.0 < bpw <= 3.25 + 1e-12  # under the budget by at most a level (a dense width below its level)
    assert any(k != 0 for k in offsets.values())  # it moved


def test_bad_joint_grids_are_one_line_errors():
    with pytest.raises(ConfigError, match="search.bits must be"):
        JointSpace.build(3.25, SHAPES, bits=(5,))
    with pytest.raises(ConfigError, match="costs 1.25 bits per weight"):  # 4 levels of 0.5 below 3.25: nothing fits
        JointSpace.build(3.25, SHAPES, step=0.5, max_shift=2.0, bits=(2, 3, 4, 8))
    with pytest.raises(ConfigError, match="does not divide"):
        JointSpace.build(3.25, {"x": (8, 100)}, bits=(4,))


def test_quantized_layers_take_the_smaller_packed_encoding():
    from mixsparse.export import _decode, quantized_encode
    from mixsparse.quant.grid import QuantSpec, quantize_rtn

    torch.manual_seed(0)
    w = torch.randn(16, 64)
    for sparsity, bits, want in ((0.0, 3, "quantized_dense"), (0.6, 4, "quantized"), (0.02, 8, "quantized_dense")):
        x = w.clone()
        x[torch.rand_like(x) < sparsity] = 0
        qw = quantize_rtn(x, QuantSpec(bits, 16, True))
        enc, parts = quantized_encode(qw)
        assert enc == want, (sparsity, bits)
        if enc == "quantized_dense":
            assert parts["codes"].numel() == math.ceil(w.numel() * bits / 8) and "bitmask" not in parts
        entry = {"encoding": enc, "bits": bits, "symmetric": True, "shape": [16, 64], "dtype": "float32"}
        stored = {f"w::{k}": v for k, v in parts.items()}
        assert torch.equal(_decode("w", entry, stored), qw.dequantize())


def test_the_database_keeps_each_levels_least_output_error_variant():
    from mixsparse.modeling import prunable_linears
    from mixsparse.search.joint import JointDatabase, output_error

    model = tiny_model("llama")
    shapes = {n: (lin.out_features, lin.in_features) for n, lin in prunable_linears(model).items()}
    space = JointSpace.build(4.0, shapes, step=0.5, max_shift=1.0, bits=(2, 3, 4, 8), group_size=16)
    dense = {n: lin.weight.detach().clone() for n, lin in prunable_linears(model).items()}
    with JointDatabase.build_joint(model, space, tiny_ids(4, 16), None, progress=False) as db:
        for name in shapes:
            for k in space.offsets:
                errs = db.errors[name][k]
                v = space.chosen[name][k]
                assert len(errs) == len(space.variants(name, k)) and errs[v.label()] == min(errs.values())
                w = db.weight(name, k)
                assert float((w == 0).float().mean()) >= v.sparsity - 1e-9
                qw = db.quantized({name: k})[name]
                assert qw.spec.bits == v.bits and torch.equal(qw.dequantize(), w)
                assert output_error(dense[name], dense[name], torch.eye(shapes[name][1])) == 0
        for name, lin in prunable_linears(model).items():  # the model itself stays dense during the search
            assert torch.equal(lin.weight, dense[name])


@pytest.mark.parametrize("final", ["stitched", "sequential"])
def test_joint_run_end_to_end_keeps_the_budget_and_reloads_bit_exact(quick_cli, tmp_path, final):
    from transformers import AutoModelForCausalLM

    from mixsparse.cli import main
    from mixsparse.export import load_compressed
    from mixsparse.modeling import prunable_linears

    out = tmp_path / "run"
    args = ["prune", *quick_cli(), "--allocation", "joint", "--pruner", "sparsegpt", "--quantize", "joint",
            "--group-size", "16", "--set", "search.bits_per_weight=4.0", "--set", "search.bits_step=0.5",
            "--set", "search.generations=3", "--set", "search.fitness_seqlen=32", "--set", f"search.final={final}",
            "--out", str(out)]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    joint = run["search"]["joint"]
    assert joint["bits_per_weight"] <= 4.0 and run["quantization"]["scheme"].startswith("mixed (")
    assert "## Bits per layer (joint search)" in (out / "report.md").read_text()
    # the packed checkpoint holds what the plan says: its bits per prunable weight are at most the budget
    assert run["sizes"]["bits_per_weight"] <= 4.0 + 1e-9
    hf = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    packed = load_compressed(out / "compressed", dtype=torch.float32)
    index = json.loads((out / "compressed" / "compression.json").read_text())["tensors"]
    for name, lin in prunable_linears(hf).items():
        assert torch.equal(prunable_linears(packed)[name].weight, lin.weight), name
        plan = joint["per_layer"][name]
        assert index[f"{name}.weight"]["bits"] == plan["bits"]
        assert float((lin.weight == 0).float().mean()) >= plan["sparsity"] - 1e-9
    if importlib.util.find_spec("compressed_tensors") is not None:  # one config group per bit width
        groups = json.loads((out / "model-quantized" / "config.json").read_text())["quantization_config"]["config_groups"]
        assert {g["weights"]["num_bits"] for g in groups.values()} == {v["bits"] for v in joint["per_layer"].values()}
        q = AutoModelForCausalLM.from_pretrained(out / "model-quantized")
        ids = tiny_ids(2, 16)
        with torch.no_grad():
            torch.testing.assert_close(q(ids).logits, hf(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("args,needle", [
    (["--allocation", "joint", "--pruner", "sparsegpt"], "set quantize.method: joint"),
    (["--allocation", "joint", "--pruner", "sparsegpt", "--quantize", "joint"], "needs search.bits_per_weight"),
    (["--allocation", "joint", "--pruner", "sparsegpt", "--quantize", "joint", "--set", "search.bits_per_weight=1.5"],
     "costs"),
])
def test_bad_joint_settings_are_one_line_errors(quick_cli, tmp_path, capsys, args, needle):
    from mixsparse.cli import main

    assert main(["prune", *quick_cli(), *args, "--out", str(tmp_path / "run")]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mixsparse:")]
    assert len(lines) == 1 and needle in lines[0], lines


def test_search_alone_refuses_the_joint_allocation(quick_cli, tmp_path, capsys):
    from mixsparse.cli import main

    args = ["search", *quick_cli(), "--allocation", "joint", "--pruner", "sparsegpt", "--set", "quantize.method=joint",
            "--set", "search.bits_per_weight=4", "--out", str(tmp_path / "s")]
    assert main(args) == 2
    assert "run it with mixsparse prune --allocation joint" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # refused before any work

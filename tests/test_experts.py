"""Fused MoE experts (transformers 5: 3-D ``gate_up_proj``/``down_proj``) as prunable layers: each expert's
matrix is a view of the fused tensor, sees exactly the tokens routed to it, and every stage (pruning, the
level database and fitness, Fisher and Hessian traces, GPTQ, export) treats it as a layer."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from mixsparse.engine import observe_layerwise, prune_layerwise
from mixsparse.errors import ModelLoadError
from mixsparse.experts import ExpertMatrix, is_fused_experts
from mixsparse.export import load_compressed, save_compressed
from mixsparse.modeling import measured_sparsity, param_counts, prunable_linears
from mixsparse.pruners.base import magnitude_result
from mixsparse.search import Fitness, LevelDatabase, LevelSpace, mutate
from mixsparse.sensitivity.fisher import fisher_trace
from mixsparse.sparsity import NM, SparsityMap

from .test_fitness import _full_forward_kl
from .tiny import family_model, tiny_ids

MOE = ["mixtral", "qwen3_moe", "gpt_oss"]
CALIB = tiny_ids(4, 16, seed=1)


def experts_modules(model):
    return [m for m in model.modules() if is_fused_experts(m)]


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])  # [E, out, in] and transposed [E, in, out] + biases
def test_an_expert_matrix_is_a_linear_view_of_the_fused_tensor(family):
    model = family_model(family)
    experts = experts_modules(model)[0]
    unit = ExpertMatrix(experts, "gate_up_proj", 2)
    x = torch.randn(5, unit.in_features)
    fused = experts.gate_up_proj.detach()
    if family == "gpt_oss":  # the model computes x @ W[e] + b[e]
        ref = x @ fused[2] + experts.gate_up_proj_bias.detach()[2]
    else:
        ref = F.linear(x, fused[2])
    torch.testing.assert_close(unit(x), ref)
    assert (unit.out_features, unit.in_features) == tuple(unit.weight.shape)
    with torch.no_grad():
        unit.weight[1, 3] = 7.0  # writing the view writes the model
    assert float(unit.slot(experts.gate_up_proj.detach())[1, 3]) == 7.0


class _Inputs:
    def __init__(self):
        self.rows = []

    def add_batch(self, inp):
        self.rows.append(inp.detach().reshape(-1, inp.shape[-1]).clone())


@pytest.mark.parametrize("family", MOE)
def test_each_expert_sees_exactly_the_tokens_routed_to_it(family):
    model = family_model(family)
    routed = {}  # experts module -> (hidden states, top-k indices) it was called with

    def grab(mod, args, kwargs):
        routed[id(mod)] = (args[0].detach().clone(), args[1].detach().clone())

    hooks = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in experts_modules(model)]
    seen = {}
    observe_layerwise(model, CALIB, lambda name, lin: _Inputs(), lambda name, o: seen.__setitem__(name, o),
                      batch_size=4)
    for h in hooks:
        h.remove()
    units = {n: lin for n, lin in prunable_linears(model).items() if isinstance(lin, ExpertMatrix)}
    assert units
    for name, lin in units.items():
        if lin.attr == "down_proj":
            continue
        hidden, index = routed[id(lin.experts)]
        token = torch.where(index == lin.index)[0]
        got = torch.cat(seen[name].rows) if seen[name].rows else torch.zeros(0, lin.in_features)
        torch.testing.assert_close(got, hidden[token], rtol=0, atol=0)
        down = name.replace("gate_up_proj", "down_proj")
        assert sum(r.shape[0] for r in seen[down].rows) == token.numel()


def test_an_experts_class_computing_otherwise_is_refused_not_observed_wrongly():
    """Planted: an experts module whose own forward is not the contract's computation (here it doubles its
    output) must stop the run, not be calibrated on a per-expert loop that computes another model."""
    model = family_model("mixtral")
    experts = experts_modules(model)[0]
    own = experts.forward
    planted = experts.forward = lambda *a, **k: 2 * own(*a, **k)
    with pytest.raises(ModelLoadError, match="differs from the model's own experts forward"):
        prune_layerwise(model, CALIB, SparsityMap.uniform(0.5, param_counts(model)), "wanda", progress=False)
    assert vars(experts)["forward"] is planted  # the module's own forward is put back


def _never_route_expert_3(model):
    def never_3(mod, args, kwargs):  # the router never picks expert 3 (its slots go to expert 0)
        index = args[1].clone()
        index[index == 3] = 0
        return (args[0], index, *args[2:]), kwargs

    for m in experts_modules(model):
        m.register_forward_pre_hook(never_3, with_kwargs=True)


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_a_never_routed_expert_falls_back_to_magnitude_and_is_recorded(pruner):
    model = family_model("mixtral")
    dense = copy.deepcopy(model)
    _never_route_expert_3(model)
    counts = param_counts(model)
    rep = prune_layerwise(model, CALIB, SparsityMap.uniform(0.5, counts), pruner, progress=False)
    starved = {n for n in counts if n.endswith("[3]")}
    assert set(rep.fallbacks) == starved and all(f["tokens"] == 0 for f in rep.fallbacks.values())
    layers, dense_layers = prunable_linears(model), prunable_linears(dense)
    for n in starved:
        assert torch.equal(layers[n].weight, magnitude_result(dense_layers[n].weight, 0.5).weight)
    assert measured_sparsity(model)[1] == pytest.approx(0.5, abs=1e-3)


def test_gptq_rounds_a_never_routed_expert_to_nearest_and_records_it():
    from mixsparse.quant.grid import QuantSpec
    from mixsparse.quant.stage import quantize_model

    model = family_model("mixtral")
    _never_route_expert_3(model)
    prune_layerwise(model, CALIB, SparsityMap.uniform(0.5, param_counts(model)), "wanda", progress=False)
    codes, record = quantize_model(model, "gptq", QuantSpec(4, 16, True), CALIB, device="cpu", progress=False)
    starved = {n for n in param_counts(model) if n.endswith("[3]")}
    assert set(record["fallbacks"]) == starved and all(f["fallback"] == "rtn" for f in record["fallbacks"].values())
    layers = prunable_linears(model)
    assert all(torch.equal(codes[n].dequantize().to(layers[n].weight.dtype), layers[n].weight) for n in starved)


def test_allocations_from_traces_survive_a_never_routed_expert():
    """An expert no calibration token reaches has a Fisher trace of exactly 0: the log-score allocation takes it as
    the least sensitive layer (it is not refused, and it does not squash every other layer's offset)."""
    from mixsparse.allocation.budget import log_offsets

    model = family_model("mixtral")
    _never_route_expert_3(model)
    scores = fisher_trace(model, tiny_ids(2, 16, seed=3), device="cpu", progress=False)
    starved = [n for n in scores if n.endswith("[3]")]
    assert starved and all(scores[n] == 0.0 for n in starved)
    offsets = log_offsets(scores, 0.1)
    most = max(offsets.values())
    assert all(offsets[n] == most for n in starved)  # pruned hardest, like the least sensitive routed layer
    others = sorted(v for n, v in offsets.items() if n not in starved)
    assert others[-1] - others[0] > 0.05  # the other layers keep their spread


def test_a_rarely_routed_expert_uses_the_share_threshold():
    model = family_model("qwen3_moe")
    rep = prune_layerwise(model, CALIB, SparsityMap.uniform(0.5, param_counts(model)), "wanda", progress=False,
                          min_token_share=0.99)
    # experts see a part of the tokens (top-2 of 4), attention all of them
    assert rep.fallbacks and all("experts" in n for n in rep.fallbacks)
    assert all(f["tokens"] < f["min_tokens"] == 64 for f in rep.fallbacks.values())  # ceil(0.99 * 64 tokens)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("placement", ["whole", "blockwise"])
def test_fitness_of_expert_levels_equals_the_full_forward(family, placement):
    model = family_model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    counts = param_counts(model)
    space = LevelSpace.unstructured(0.5, counts, step=0.1, max_shift=0.2)
    windows = tiny_ids(2, 16, seed=5)
    with LevelDatabase.build(model, space, CALIB, "sparsegpt", progress=False) as db:
        fit = Fitness(db, windows, "kl", placement=placement, dtype="model")
        rng = random.Random(0)
        experts = [n for n in counts if "experts" in n]
        for _ in range(3):
            cand = mutate({k: 0 for k in counts}, space, rng, 4)
            a, b = rng.sample(experts, 2)  # expert levels differ from the dense and from each other
            cand[a], cand[b] = 1, -2
            fit.prefetch([cand], 2)
            torch.testing.assert_close(torch.tensor(fit.memo[fit.key(cand)]),
                                       torch.tensor(_full_forward_kl(model, db, cand, windows)), rtol=1e-4, atol=1e-6)
    # the fused tensors are assembled in copies: the model is untouched (float32 on the CPU: no conversion copy)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_fisher_trace_of_an_expert_is_its_slice_of_the_fused_gradient():
    model = family_model("mixtral")
    ids = tiny_ids(2, 16, seed=3)
    scores = fisher_trace(model, ids, device="cpu", progress=False)
    layers = prunable_linears(model)
    owners = {n: p for n, p in model.named_parameters()}
    expected = {n: 0.0 for n in layers}
    for i in range(ids.shape[0]):  # the definition: sum over samples of the squared per-sample gradient
        model.zero_grad()
        x = ids[i : i + 1]
        logits = model(input_ids=x).logits
        F.cross_entropy(logits[0, :-1], x[0, 1:]).backward()
        for n, lin in layers.items():
            g = (lin.slot(owners[f"{n.split('[')[0]}"].grad) if isinstance(lin, ExpertMatrix)
                 else owners[f"{n}.weight"].grad)
            expected[n] += float((g.double() ** 2).sum())
    model.zero_grad()
    for n in layers:
        assert scores[n] == pytest.approx(expected[n], rel=1e-4, abs=1e-12), n
    assert any(scores[n] > 0 for n in layers if "experts" in n)


def test_gptq_quantizes_expert_matrices_and_keeps_their_zeros():
    from mixsparse.quant.grid import QuantSpec
    from mixsparse.quant.stage import quantize_model

    model = family_model("mixtral")
    prune_layerwise(model, CALIB, SparsityMap.uniform(0.5, param_counts(model)), "wanda", progress=False)
    zeros = {n: lin.weight == 0 for n, lin in prunable_linears(model).items()}
    codes, record = quantize_model(model, "gptq", QuantSpec(4, 16, True), CALIB, device="cpu", progress=False)
    assert set(codes) == set(zeros) and record["fallbacks"] == {}
    for n, lin in prunable_linears(model).items():
        assert torch.equal(codes[n].dequantize().to(lin.weight.dtype), lin.weight), n  # the codes are the weight
        assert not bool((zeros[n] & (lin.weight != 0)).any()), n  # every pruned weight is still zero


def test_nm_experts_export_packs_the_fused_tensor_and_round_trips(tmp_path):
    model = family_model("mixtral")
    counts = param_counts(model)
    smap = SparsityMap.uniform(NM(2, 4), counts)
    prune_layerwise(model, CALIB, smap, "wanda", progress=False)
    save_compressed(model, tmp_path / "c", dtype=None, sparsity_map=smap.to_dict())
    import json

    index = json.loads((tmp_path / "c" / "compression.json").read_text())
    assert index["tensors"]["model.layers.0.mlp.experts.gate_up_proj"]["encoding"] == "nm"
    back = load_compressed(tmp_path / "c")
    mine, theirs = dict(model.named_parameters()), dict(back.named_parameters())
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)


def test_a_bf16_moe_checkpoint_end_to_end_msp_recovery_gptq_export(word_corpus, tmp_path, capsys):
    """What a user with a MoE checkpoint runs: Fisher + MSP search, pruning, block-wise recovery, GPTQ and the
    exports on a bf16 Mixtral; the experts carry the sparsity and the saved model reloads with it."""
    import json

    from transformers import AutoModelForCausalLM

    from mixsparse.cli import main

    from .conftest import _tiny_tokenizer

    src = tmp_path / "moe"
    model = family_model("mixtral")
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.to(torch.bfloat16).save_pretrained(src)
    _tiny_tokenizer().save_pretrained(src)
    c = str(word_corpus)
    out = tmp_path / "run"
    argv = ["prune", "--model", str(src), "--dtype", "bfloat16", "--calibration", c, "--set", f"data.validation={c}",
            "--set", f"data.evaluation={c}", "--calib-samples", "4", "--seqlen", "32", "--eval-tokens", "64",
            "--set", "eval.zeroshot=[]", "--sparsity", "0.5", "--allocation", "msp", "--device", "cpu", "--quiet",
            "--set", "search.fitness_seqlen=32", "--set", "search.fitness_windows=2",
            "--set", "search.stages=[[1,2],[2,1]]", "--set", "search.generations=2", "--set", "search.offspring=3",
            "--set", "search.population=2", "--set", "allocation.msp.samples=2", "--set", "allocation.msp.seqlen=32",
            "--set", "search.step=0.1", "--set", "search.max_shift=0.2", "--recover", "blockwise",
            "--set", "recover.blockwise.epochs=1", "--quantize", "gptq", "--bits", "8", "--group-size", "16",
            "--out", str(out)]
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    experts = run["coverage"]["by_kind"]["experts"]
    assert experts["prunable_params"] > 0 and experts["sparsity"] == pytest.approx(0.5, abs=0.05)
    assert run["coverage"]["unprunable_large"] == []
    summary = capsys.readouterr().out  # the CLI summary and the report show the experts' zeros
    assert f"experts {experts['sparsity']:.3f}" in summary
    assert "| experts |" in (out / "report.md").read_text()
    assert any("experts.down_proj[" in n for n in run["allocation"]["per_layer"])
    back = AutoModelForCausalLM.from_pretrained(out / "model")
    assert back.dtype == torch.bfloat16
    for n, lin in prunable_linears(back).items():  # the run's zeros, expert by expert (int8 may round a few more)
        assert 0 <= float((lin.weight == 0).float().mean()) - run["pruning"]["achieved"][n] < 0.005, n
    compressed = load_compressed(out / "compressed")
    assert all(torch.equal(p, dict(back.named_parameters())[n]) for n, p in compressed.named_parameters())
    # compressed-tensors cannot hold fused experts (transformers reloads them MISSING): skipped, said so
    assert not (out / "model-quantized").exists() and "fused MoE experts" in run["quantization"]["export"]["skipped"]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])  # [E, out, in] and transposed [E, in, out]
def test_hessian_trace_of_an_expert_is_the_probe_product_over_its_slice(family):
    """Hutchinson's z^T H z per layer, computed directly with the same probes: an expert's is the sum over its
    own slice of the fused tensor (routed experts non-zero)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mixsparse.experts import owners
    from mixsparse.sensitivity.fisher import sequence_loss
    from mixsparse.sensitivity.hessian import hessian_trace, rademacher

    model = family_model(family)
    ids = tiny_ids(2, 16, seed=3)
    traces = hessian_trace(model, ids, n_probes=1, seed=0, device="cpu", batch_size=None, progress=False)
    layers = prunable_linears(model)
    weights, where = owners(layers.values())
    with sdpa_kernel([SDPBackend.MATH]):
        loss = sequence_loss(model(input_ids=ids, use_cache=False).logits, ids)
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        gen = torch.Generator().manual_seed(0)
        zs = [rademacher(w.shape, gen) for w in weights]
        hz = torch.autograd.grad(sum((g * z).sum() for g, z in zip(grads, zs)), weights, allow_unused=True)
    for (n, lin), j in zip(layers.items(), where):
        part = (zs[j] * hz[j]).double()
        expected = float((lin.slot(part) if isinstance(lin, ExpertMatrix) else part).sum())
        assert traces[n] == pytest.approx(expected, rel=1e-5, abs=1e-9), n
    assert any(abs(traces[n]) > 0 for n in layers if "experts" in n)


def test_starved_experts_are_named_in_the_summary_and_report(tmp_path, capsys):
    from mixsparse.cli import _summary
    from mixsparse.record import PruningInfo, RunRecord
    from mixsparse.report import _summary as report_summary

    info = PruningInfo(pruner="sparsegpt", overall_sparsity=0.5,
                       fallbacks={f"model.layers.0.mlp.experts.down_proj[{e}]": {"tokens": e, "min_tokens": 21}
                                  for e in range(5)})
    line = info.fallback_warning()
    assert "5 layer(s) saw fewer than 21 calibration tokens" in line and "down_proj[0]" in line and "2 more" in line
    assert PruningInfo(pruner="wanda").fallback_warning() is None
    run = RunRecord(config={}, pruning=info)
    _summary(run, tmp_path)
    assert f"WARNING: {line}" in capsys.readouterr().out
    assert f"**Warning:** {line}." in report_summary(run)


def test_owl_outliers_use_per_token_norms():
    """OWL pools a block's Wanda scores with per-token mean norms (an expert sees a share of the tokens, attention
    all of them): on a dense model that is OWL's own ratio; on a MoE model a never-routed expert is left out."""
    from mixsparse.pruners.wanda import WandaPruner
    from mixsparse.sensitivity.owl import outlier_ratio, owl_outlier_ratios

    from .tiny import tiny_model

    dense = tiny_model("llama")
    pooled = {}
    observe_layerwise(dense, CALIB, WandaPruner.factory(), lambda n, o: pooled.setdefault(
        int(n.split(".")[2]), []).append(o.scores()))  # OWL's definition: summed norms, all layers see all tokens
    want = {b: outlier_ratio(s, 3.0) for b, s in pooled.items()}
    assert owl_outlier_ratios(dense, CALIB, M=3.0, progress=False) == pytest.approx(want, abs=1e-12)
    model = family_model("mixtral")
    _never_route_expert_3(model)
    ratios = owl_outlier_ratios(model, CALIB, M=3.0, progress=False)
    assert set(ratios) == {0, 1} and all(0 < r < 1 for r in ratios.values())


def test_recovery_checks_leave_out_the_biases_it_tunes():
    from mixsparse.modeling import prunable_params

    model = family_model("gpt_oss")
    held = prunable_params(model, biases=True)
    assert "model.layers.0.mlp.experts.gate_up_proj_bias" in held and "model.layers.0.self_attn.q_proj.bias" in held
    assert "model.layers.0.mlp.experts.gate_up_proj_bias" not in prunable_params(model)

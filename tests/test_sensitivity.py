"""Sensitivity measures: Fisher trace (block-wise vs brute force), Hutchinson Hessian trace (vs the
exact Hessian), OWL outlier ratios (vs a direct computation) and the score cache."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

from mixsparse.errors import ConfigError, DataError
from mixsparse.modeling import find_decoder_blocks, prunable_linears
from mixsparse.sensitivity import (
    aggregate_by_block,
    cached_scores,
    fisher_trace,
    hessian_trace,
    model_fingerprint,
    outlier_ratio,
    owl_outlier_ratios,
)
from mixsparse.sensitivity.hessian import rademacher


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: threading overhead only slows them down (and the suite shares 2 cores)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)
    cfg.update(overrides)
    attn = cfg.pop("attn_implementation", None)
    kwargs = {"attn_implementation": attn} if attn else {}
    return AutoModelForCausalLM.from_config(LlamaConfig(**cfg), **kwargs)


def make_opt(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(OPTConfig(
        vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=64,
    ))


def brute_force_fisher(model, ids) -> dict[str, float]:
    """Per-sample full-model autograd: sum_s ||d loss_s / dW||^2."""
    model.eval()
    lins = prunable_linears(model)
    out = {n: 0.0 for n in lins}
    for s in range(ids.shape[0]):
        model.zero_grad()
        logits = model(input_ids=ids[s : s + 1]).logits
        F.cross_entropy(logits[0, :-1], ids[s, 1:]).backward()
        for n, lin in lins.items():
            out[n] += float((lin.weight.grad.double() ** 2).sum())
    return out


# --- Fisher ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [make_llama, make_opt], ids=["llama", "opt"])
def test_fisher_trace_matches_brute_force(make):
    model = make()
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(1))
    for p in model.parameters():  # loaded inference models often freeze their weights
        p.requires_grad_(False)
    model.train()
    before = {n: lin.weight.detach().clone() for n, lin in prunable_linears(model).items()}

    got = fisher_trace(model, ids, progress=False)

    assert list(got) == list(prunable_linears(model))
    assert model.training, "train/eval mode must be restored"
    assert not any(p.requires_grad for p in model.parameters()), "requires_grad flags must be restored"
    for n, lin in prunable_linears(model).items():
        assert torch.equal(lin.weight, before[n])
    for p in model.parameters():
        p.requires_grad_(True)
    expected = brute_force_fisher(model, ids)
    names = list(expected)
    assert torch.allclose(
        torch.tensor([got[n] for n in names], dtype=torch.float64),
        torch.tensor([expected[n] for n in names], dtype=torch.float64),
        rtol=1e-4, atol=0,
    )
    assert all(v > 0 for v in got.values())


def test_fisher_trace_normalize_divides_by_layer_size():
    model = make_llama()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    raw = fisher_trace(model, ids, progress=False)
    norm = fisher_trace(model, ids, normalize=True, progress=False, offload=False)
    for n, lin in prunable_linears(model).items():
        assert math.isclose(norm[n], raw[n] / lin.weight.numel(), rel_tol=1e-6)


def test_fisher_trace_rejects_bad_calibration_ids():
    model = make_llama()
    with pytest.raises(DataError, match="samples, seq_len"):
        fisher_trace(model, torch.zeros(5, dtype=torch.long), progress=False)
    with pytest.raises(DataError, match="at least 2 tokens"):
        fisher_trace(model, torch.zeros(2, 1, dtype=torch.long), progress=False)


def test_aggregate_by_block_sums_layers():
    scores = {"model.layers.0.a": 1.0, "model.layers.0.b": 2.5, "model.layers.1.a": 4.0, "model.layers.10.a": 0.5}
    assert aggregate_by_block(scores, "model.layers") == {0: 3.5, 1: 4.0, 10: 0.5}


# --- Hessian ---------------------------------------------------------------------------------
def _micro_model():
    # 576 prunable weights: small enough for the exact Hessian
    model = make_llama(seed=0, vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, initializer_range=0.5,
                       attn_implementation="eager").double()
    ids = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(3))
    return model, ids


def _exact_hessian(model, ids) -> tuple[list[str], list[int], torch.Tensor]:
    """Full Hessian of the mean loss w.r.t. all prunable weights (flattened in layer order)."""
    model.eval()
    lins = prunable_linears(model)
    params = dict(model.named_parameters())
    pnames = [n + ".weight" for n in lins]
    shapes = [params[p].shape for p in pnames]
    sizes = [params[p].numel() for p in pnames]
    flat0 = torch.cat([params[p].detach().reshape(-1) for p in pnames])

    def loss_of(flat):
        ws = {p: t.reshape(s) for p, t, s in zip(pnames, flat.split(sizes), shapes)}
        logits = torch.func.functional_call(model, ws, kwargs={"input_ids": ids}).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    return list(lins), sizes, torch.autograd.functional.hessian(loss_of, flat0)


@pytest.fixture(scope="module")
def micro_hessian():
    torch.set_num_threads(1)
    model, ids = _micro_model()
    names, sizes, H = _exact_hessian(model, ids)
    return model, ids, names, sizes, H


def test_hessian_probes_are_exact_hvps(micro_hessian):
    """With the same seeded probes, the estimate equals mean_z z_l . (H z)_l computed from the
    explicit Hessian: the double-backward HVPs are exact."""
    model, ids, names, sizes, H = micro_hessian
    n_probes, seed = 3, 7
    gen = torch.Generator().manual_seed(seed)
    expected = torch.zeros(len(names), dtype=torch.float64)
    for _ in range(n_probes):
        z = torch.cat([rademacher(torch.Size([s]), gen).double() for s in sizes])
        hz = H @ z
        expected += torch.stack([(zl * hl).sum() for zl, hl in zip(z.split(sizes), hz.split(sizes))])
    expected /= n_probes
    got = hessian_trace(model, ids, n_probes=n_probes, seed=seed, progress=False)
    # not 1e-12: Llama's RMSNorm computes in float32 even in a float64 model
    assert torch.allclose(torch.tensor([got[n] for n in names], dtype=torch.float64), expected, rtol=1e-5, atol=1e-6)


def test_hessian_trace_converges_to_exact_trace(micro_hessian):
    model, ids, names, sizes, H = micro_hessian
    ends = torch.tensor(sizes).cumsum(0).tolist()
    exact = torch.tensor([H[e - s : e, e - s : e].trace() for s, e in zip(sizes, ends)], dtype=torch.float64)

    def rel_error(n_probes):
        est = hessian_trace(model, ids, n_probes=n_probes, seed=0, progress=False)
        got = torch.tensor([est[n] for n in names], dtype=torch.float64)
        return float((got - exact).abs().sum() / exact.abs().sum())

    few, many = rel_error(8), rel_error(1024)
    assert many < 0.10, many
    assert many < few / 2, (few, many)


def test_hessian_trace_seeded_and_chunking_invariant(micro_hessian):
    model, ids, names, *_ = micro_hessian
    a = hessian_trace(model, ids, n_probes=4, seed=5, progress=False, batch_size=3)
    b = hessian_trace(model, ids, n_probes=4, seed=5, progress=False, batch_size=None)
    c = hessian_trace(model, ids, n_probes=4, seed=6, progress=False)
    assert all(math.isclose(a[n], b[n], rel_tol=1e-9, abs_tol=1e-12) for n in names)
    assert any(abs(a[n] - c[n]) > 1e-6 for n in names)
    with pytest.raises(ConfigError, match="n_probes"):
        hessian_trace(model, ids, n_probes=0, progress=False)


def test_hessian_trace_runs_on_default_sdpa_attention():
    # fused SDPA kernels cannot be differentiated twice; the estimator must switch to the math kernel
    model = make_llama(num_hidden_layers=1)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(4))
    est = hessian_trace(model, ids, n_probes=2, progress=False)
    assert list(est) == list(prunable_linears(model))
    assert all(math.isfinite(v) for v in est.values())


# --- OWL -------------------------------------------------------------------------------------
def test_outlier_ratio_hand_example():
    # pooled mean = (9 * 1 + 100 + 0) / 11 = 109/11 ~ 9.9; threshold 5x = 49.5: one entry of 11 above
    scores = [torch.ones(3, 3), torch.tensor([100.0, 0.0])]
    assert outlier_ratio(scores, 5.0) == pytest.approx(1 / 11)
    assert outlier_ratio(scores, 20.0) == 0.0


def test_owl_ratios_match_direct_computation():
    model = make_llama()
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(5))
    before = {n: lin.weight.detach().clone() for n, lin in prunable_linears(model).items()}
    got = owl_outlier_ratios(model, ids, M=2.0, progress=False)

    # direct: squared input norms of every linear from dense full-model forwards
    model.eval()
    lins = prunable_linears(model)
    sq = {n: torch.zeros(lin.in_features, dtype=torch.float64) for n, lin in lins.items()}

    def record(name):
        def hook(module, inputs, output):  # returns None: must not replace the output
            x = inputs[0].double().reshape(-1, inputs[0].shape[-1])
            sq[name] += (x**2).sum(0)
        return hook

    hooks = [lin.register_forward_hook(record(n)) for n, lin in lins.items()]
    with torch.no_grad():
        for s in range(ids.shape[0]):
            model(input_ids=ids[s : s + 1])
    for h in hooks:
        h.remove()
    blocks_name, blocks = find_decoder_blocks(model)
    for b in range(len(blocks)):
        mine = [lins[n].weight.abs() * sq[n].sqrt().float() for n in lins if n.startswith(f"{blocks_name}.{b}.")]
        assert got[b] == pytest.approx(outlier_ratio(mine, 2.0), abs=1e-9)
    assert sorted(got) == [0, 1]
    assert all(0.0 < v < 1.0 for v in got.values())
    for n, lin in prunable_linears(model).items():
        assert torch.equal(lin.weight, before[n])


# --- cache -----------------------------------------------------------------------------------
def test_cached_scores_reuses_matching_settings(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {0: 0.25, 3: 0.5}

    settings = {"model": "abc", "seed": 0, "n": 8, "seqlen": 256, "M": 5.0}
    first = cached_scores("owl", settings, compute, tmp_path)
    again = cached_scores("owl", dict(reversed(list(settings.items()))), compute, tmp_path)
    assert first == again == {0: 0.25, 3: 0.5}
    assert all(isinstance(k, int) for k in again)  # keys keep their type through JSON
    assert len(calls) == 1
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("owl-") and files[0].suffix == ".json"
    assert json.loads(files[0].read_text())["settings"] == settings

    cached_scores("owl", {**settings, "seed": 1}, compute, tmp_path)
    assert len(calls) == 2
    files[0].write_text("{not json")
    assert cached_scores("owl", settings, compute, tmp_path) == {0: 0.25, 3: 0.5}
    assert len(calls) == 3
    assert cached_scores("owl", settings, compute, None) == {0: 0.25, 3: 0.5}
    assert len(calls) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cached_scores_refuses_unserialisable_settings(tmp_path):
    with pytest.raises(ConfigError, match="JSON"):
        cached_scores("fisher", {"bad": {1, 2}}, lambda: {}, tmp_path)


def test_model_fingerprint_tracks_weights():
    model = make_llama()
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(model) and len(fp) == 16
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[5, 7] += 1.0
    assert model_fingerprint(model) != fp

"""Level database and fitness that scale: exact paths equal today's full forward; approximations rank
candidates like the exact fitness; memory is what the docs say."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from mixsparse.evaluation import mean_kl
from mixsparse.modeling import param_counts, prunable_linears
from mixsparse.search import (
    Fitness,
    LevelDatabase,
    LevelSpace,
    SearchConfig,
    TopK,
    evolutionary_search,
    mutate,
    topk_kl,
)

from .tiny import tiny_ids, tiny_model

CFG = dict(population=3, offspring=4, stages=[[1, 2], [3, 1]], seed=3, crossover_rate=0.5, patience=100)


def _db(pruner="wanda", target=0.6, arch="llama", **kw):
    model = tiny_model(arch, num_hidden_layers=3)
    counts = param_counts(model)
    space = LevelSpace.unstructured(target, counts, step=0.1, max_shift=0.2)
    return model, space, LevelDatabase.build(model, space, tiny_ids(), pruner, progress=False, **kw)


def _candidates(space, n, seed=0):
    rng = random.Random(seed)
    base = {k: 0 for k in space.param_counts}
    return [mutate(base, space, rng, rng.randint(1, 4)) for _ in range(n)]


def _full_forward_kl(model, db, offsets, windows):
    """Today's path: write the candidate into a copy of the model, full forward, KL to the dense model."""
    dense = copy.deepcopy(model)
    cand = copy.deepcopy(model)
    lin = prunable_linears(cand)
    with torch.no_grad():
        for n, k in offsets.items():
            lin[n].weight.copy_(db.weight(n, k))
    out = []
    for i in range(windows.shape[0]):
        ids = windows[i : i + 1]
        with torch.no_grad():
            ref = F.log_softmax(dense(input_ids=ids).logits.float(), -1).to(torch.float16)
            s, n = mean_kl(ref, cand(input_ids=ids).logits)
        out.append(s / n)
    return out


@pytest.mark.parametrize("placement", ["whole", "blockwise"])
@pytest.mark.parametrize("incremental", [False, True])
def test_layerwise_fitness_equals_full_forward(placement, incremental):
    model, space, db = _db()
    windows = tiny_ids(3, 16, seed=5)
    fit = Fitness(db, windows, "kl", placement=placement, dtype="model", kl_topk=0, incremental=incremental)
    for cand in _candidates(space, 5):
        fit.prefetch([cand], 3)
        expected = _full_forward_kl(model, db, cand, windows)
        torch.testing.assert_close(torch.tensor(fit.memo[fit.key(cand)]), torch.tensor(expected), rtol=1e-4, atol=1e-6)


def test_incremental_evaluation_is_exact_and_skips_blocks():
    windows = tiny_ids(3, 16, seed=7)
    runs = {}
    for incremental in (False, True):
        model, space, db = _db()
        fit = Fitness(db, windows, "kl", dtype="model", kl_topk=0, incremental=incremental)
        init = {n: 0 for n in space.param_counts}
        res = evolutionary_search(fit, space, [init], SearchConfig(generations=4, **CFG), progress=False)
        runs[incremental] = (res, fit.blocks_run)
    (a, blocks_a), (b, blocks_b) = runs[False], runs[True]
    assert a.offsets == b.offsets and a.fitness == b.fitness  # bit-identical trajectory
    assert [h["best_fitness"] for h in a.history] == [h["best_fitness"] for h in b.history]
    assert blocks_b < blocks_a


def test_state_cache_respects_its_bound():
    model, space, db = _db()
    fit = Fitness(db, tiny_ids(3, 16, seed=7), "kl", dtype="model", incremental=True, state_cache_mb=0.02)
    fit.prefetch(_candidates(space, 6), 3)
    assert 0 < fit._state_bytes() <= 0.02 * 2**20


def test_topk_kl_is_exact_for_full_k_and_ranks_candidates_like_exact_kl():
    torch.manual_seed(0)
    logits_p, logits_q = torch.randn(7, 50), torch.randn(7, 50)
    exact, n = mean_kl(F.log_softmax(logits_p, -1).unsqueeze(0), logits_q.unsqueeze(0))
    full, m = topk_kl(TopK.from_logits(logits_p, 50), logits_q)
    assert n == m == 7 and full == pytest.approx(exact, rel=1e-5)
    low, _ = topk_kl(TopK.from_logits(logits_p, 5), logits_q)
    assert 0 <= low <= exact + 1e-6  # a coarse-graining never increases KL

    model, space, db = _db(target=0.7)
    # A random tiny model predicts almost uniformly (85% of the mass outside the top 16 of 128 tokens); a
    # trained LM is peaked. A scaled head makes the tiny model's next-token distribution peaked too.
    with torch.no_grad():
        model.lm_head.weight.mul_(12)
    windows = tiny_ids(3, 16, seed=5)
    exact_fit = Fitness(db, windows, "kl", dtype="model", kl_topk=0)
    approx_fit = Fitness(db, windows, "kl", dtype="model", kl_topk=16)
    cands = _candidates(space, 12, seed=1)
    e = torch.tensor([exact_fit(c, 3) for c in cands])
    a = torch.tensor([approx_fit(c, 3) for c in cands])
    rank = lambda x: x.argsort().argsort().double()  # noqa: E731
    spearman = torch.corrcoef(torch.stack([rank(e), rank(a)]))[0, 1]
    assert spearman > 0.9 and e.argmin() == a.argmin()
    assert approx_fit.reference_bytes_per_token() == 16 * 8 + 4 < exact_fit.reference_bytes_per_token()


def test_bf16_fitness_ranks_candidates_like_fp32():
    model, space, db = _db(target=0.7)
    windows = tiny_ids(3, 16, seed=5)
    f32 = Fitness(db, windows, "kl", dtype="float32", kl_topk=0)
    bf16 = Fitness(db, windows, "kl", dtype="bfloat16", kl_topk=0)
    assert bf16.dtype == torch.bfloat16
    cands = _candidates(space, 10, seed=2)
    e = torch.tensor([f32(c, 3) for c in cands])
    a = torch.tensor([bf16(c, 3) for c in cands])
    assert torch.corrcoef(torch.stack([e.argsort().argsort().double(), a.argsort().argsort().double()]))[0, 1] > 0.8


def test_mask_database_is_one_byte_per_weight_and_nested():
    model, space, db = _db("wanda")
    counts = param_counts(model)
    assert db.ram_bytes_used() == sum(counts.values())  # one uint8 per prunable weight, whatever the levels
    assert all(t.dtype == torch.uint8 for t in db.kept_levels.values())
    name = next(iter(counts))
    masks = [db.keep_mask(name, k) for k in space.offsets]
    for lo, hi in zip(masks, masks[1:]):
        assert not (hi & ~lo).any()  # sparser levels keep a subset
    w = db.weight(name, space.max_offset, dtype=torch.bfloat16)
    assert w.dtype == torch.bfloat16 and torch.equal(w != 0, masks[-1] & (prunable_linears(model)[name].weight != 0))
    db.free()
    assert db.ram_bytes_used() == 0


def test_sparsegpt_database_lives_on_disk_and_is_reused(tmp_path, monkeypatch):
    store = tmp_path / "levels"
    model, space, db = _db("sparsegpt", store_dir=store, fingerprint="abc")
    n_levels = len(list(space.offsets))
    counts = param_counts(model)
    assert db.ram_bytes_used() == 0
    assert db.disk_bytes() >= n_levels * 4 * sum(counts.values())
    name = next(iter(counts))
    w = db.weight(name, 1)

    from mixsparse.pruners import sparsegpt

    def boom(*a, **k):
        raise AssertionError("a complete store with the same fingerprint must be reused, not rebuilt")

    monkeypatch.setattr(sparsegpt.SparseGPTPruner, "compute", boom)
    again = LevelDatabase.build(model, space, tiny_ids(), "sparsegpt", store_dir=store, fingerprint="abc",
                                progress=False)
    assert again.reused and torch.equal(again.weight(name, 1), w)
    again.free()
    assert store.exists()  # a named store is kept for later runs

    tmp = LevelDatabase.build(model, space, tiny_ids(), "wanda", progress=False)
    assert tmp.store_dir is None


def test_sparsegpt_ram_cache_is_bounded(tmp_path):
    model, space, db = _db("sparsegpt", store_dir=tmp_path / "s", ram_bytes=20_000)
    for n in param_counts(model):
        for k in space.offsets:
            db.weight(n, k)
    assert 0 < db.ram_bytes_used() <= 20_000


def test_blockwise_and_whole_placement_give_the_same_search():
    windows = tiny_ids(3, 16, seed=7)
    results = []
    for placement in ("whole", "blockwise"):
        model, space, db = _db()
        fit = Fitness(db, windows, "kl", placement=placement, dtype="model")
        assert (fit.forward.placement.device, fit.forward.placement.mode) == (torch.device("cpu"), placement)
        init = {n: 0 for n in space.param_counts}
        results.append(evolutionary_search(fit, space, [init], SearchConfig(generations=3, **CFG), progress=False))
    assert results[0].offsets == results[1].offsets and results[0].fitness == results[1].fitness


def test_search_leaves_the_model_dense():
    model, space, db = _db()
    before = {n: l.weight.detach().clone() for n, l in prunable_linears(model).items()}
    fit = Fitness(db, tiny_ids(3, 16, seed=7), "kl")
    evolutionary_search(fit, space, [{n: 0 for n in space.param_counts}], SearchConfig(generations=2, **CFG),
                        progress=False)
    assert all(torch.equal(before[n], l.weight) for n, l in prunable_linears(model).items())


def test_cheap_stage_scores_window_prefixes_exactly():
    """A stage with a tokens entry scores the first tokens of each window; with causal attention that is
    the KL on those positions of a full-window forward."""
    model, space, db = _db()
    windows = tiny_ids(2, 16, seed=5)
    fit = Fitness(db, windows, "kl", dtype="model", kl_topk=0)
    cand = _candidates(space, 1, seed=3)[0]
    short = fit(cand, 2, tokens=6)
    dense, pruned = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for n, k in cand.items():
            prunable_linears(pruned)[n].weight.copy_(db.weight(n, k))
        per_window = []
        for i in range(2):
            ids = windows[i : i + 1]
            ref = F.log_softmax(dense(input_ids=ids).logits.float(), -1)[:, :6].to(torch.float16)
            s, n = mean_kl(ref, pruned(input_ids=ids).logits[:, :6])
            per_window.append(s / n)
    assert short == pytest.approx(sum(per_window) / 2, rel=1e-4)
    assert fit.key(cand) not in fit.memo  # short scores never stand in for whole-window ones


def test_search_with_a_cheap_first_stage_keeps_the_budget():
    model, space, db = _db()
    fit = Fitness(db, tiny_ids(3, 16, seed=7), "kl", dtype="model")
    cfg = SearchConfig(generations=3, population=3, offspring=6, stages=[[1, 3, 8], [3, 1]], seed=3)
    res = evolutionary_search(fit, space, [{n: 0 for n in space.param_counts}], cfg, progress=False)
    assert space.residual(res.offsets) == 0 and res.generations == 3
    short = [k for k in fit.memo if k[0] == ("tokens", 8)]
    assert len(short) >= 6  # every child was scored on prefixes first
    full = [k for k in fit.memo if k[0] != ("tokens", 8)]
    assert len(full) < len(short) + 3  # only the 3 survivors per generation (and the parents) got whole windows
    with pytest.raises(Exception, match="last stage"):
        SearchConfig(stages=[[1, 3], [3, 1, 8]])


def test_resumed_search_with_a_cheap_stage_equals_uninterrupted(tmp_path):
    cfg = SearchConfig(generations=3, population=3, offspring=5, stages=[[1, 3, 8], [3, 1]], seed=4)
    init = lambda space: [{n: 0 for n in space.param_counts}]  # noqa: E731
    _, space, db = _db()
    full = evolutionary_search(Fitness(db, tiny_ids(3, 16, seed=7), "kl"), space, init(space), cfg, progress=False)

    class Stop(KeyboardInterrupt):
        pass

    def stop(gen, rec):
        if gen == 2:
            raise Stop

    _, space2, db2 = _db()
    with pytest.raises(KeyboardInterrupt):
        evolutionary_search(Fitness(db2, tiny_ids(3, 16, seed=7), "kl"), space2, init(space2), cfg,
                            checkpoint=tmp_path / "s.json", on_generation=stop, progress=False)
    _, space3, db3 = _db()
    fit3 = Fitness(db3, tiny_ids(3, 16, seed=7), "kl")
    resumed = evolutionary_search(fit3, space3, init(space3), cfg, checkpoint=tmp_path / "s.json", progress=False)
    assert resumed.offsets == full.offsets and resumed.fitness == full.fitness
    assert any(k[0] == ("tokens", 8) for k in fit3.memo)  # cheap-stage scores came back from the checkpoint


def test_blockwise_builds_each_block_once_per_candidate(monkeypatch):
    from mixsparse.search import fitness as fitness_mod

    _, space, db = _db()
    fit = Fitness(db, tiny_ids(3, 16, seed=7), "kl", placement="blockwise")
    calls = []
    real = fitness_mod.CandidateForward.block_tensors
    monkeypatch.setattr(fitness_mod.CandidateForward, "block_tensors",
                        lambda self, i, o: calls.append(i) or real(self, i, o))
    fit.prefetch(_candidates(space, 2), 3)  # 2 candidates x 3 windows
    assert len(calls) == 2 * 3  # blocks x candidates, not x windows (3 blocks)


def test_reconstructed_levels_are_stored_in_the_given_dtype_and_disk_is_checked(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from safetensors import safe_open

    from mixsparse.errors import ConfigError

    _, space, db = _db("sparsegpt", store_dir=tmp_path / "s", store_dtype=torch.bfloat16)
    name = next(iter(db.layers))
    with safe_open(str(db._path(name)), "pt") as f:
        assert f.get_tensor("level_0").dtype == torch.bfloat16
    assert db.weight(name, 0).dtype == torch.float32  # read back in the layer's dtype
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ConfigError, match="GiB are free"):
        _db("sparsegpt", store_dir=tmp_path / "t")
    assert not any((tmp_path / "t").glob("*.safetensors"))


def test_a_non_finite_dense_reference_is_refused():
    from mixsparse.errors import NumericalError

    model, space, db = _db()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("inf"))  # logits overflow
    with pytest.raises(NumericalError, match="not finite"):
        Fitness(db, tiny_ids(2, 16), "kl")


def test_auto_fitness_dtype_is_float32_where_bf16_is_emulated(monkeypatch):
    """A bf16 model on a CPU without native bf16 scores candidates in float32 (emulated bf16 matmuls are
    hundreds of times slower there), and in bf16 where bf16 is native."""
    from mixsparse.search import fitness as fitness_mod

    cpu = torch.device("cpu")
    monkeypatch.setattr(fitness_mod, "fast_bf16", lambda device: False)
    assert fitness_mod.resolve_dtype("auto", torch.bfloat16, cpu) == torch.float32
    assert fitness_mod.resolve_dtype("model", torch.bfloat16, cpu) == torch.bfloat16
    monkeypatch.setattr(fitness_mod, "fast_bf16", lambda device: True)
    assert fitness_mod.resolve_dtype("auto", torch.float32, cpu) == torch.bfloat16


def test_a_bf16_model_is_searched_with_a_float32_fitness():
    """The fitness's dtype may differ from the model's (a bf16 model scored in float32 where bf16 is emulated):
    the block runner then runs block 0 in the fitness dtype too (it once mixed a bf16 weight with float32 inputs)."""
    from mixsparse.modeling import param_counts

    model = tiny_model("llama").to(torch.bfloat16)
    space = LevelSpace.unstructured(0.5, param_counts(model), step=0.1, max_shift=0.2)
    with LevelDatabase.build(model, space, tiny_ids(), "wanda", progress=False) as db:
        fit = Fitness(db, tiny_ids(2, 12, seed=4), "kl", dtype="float32")
        res = evolutionary_search(fit, space, [{n: 0 for n in space.param_counts}],
                                  SearchConfig(generations=1, population=2, offspring=2, stages=[[1, 1], [2, 1]]),
                                  progress=False)
    assert fit.dtype == torch.float32 and res.generations == 1 and res.fitness >= 0

"""Evolutionary search: exact budget under every operator, level cache, resumability."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixsparse.errors import ConfigError, SparsityError
from mixsparse.modeling import param_counts, prunable_linears
from mixsparse.pruners import get_pruner
from mixsparse.search import (
    Fitness,
    LevelDatabase,
    LevelSpace,
    SearchConfig,
    _has_move,
    crossover,
    evolutionary_search,
    mutate,
)
from mixsparse.sparsity import NM

from .tiny import tiny_ids, tiny_model


def test_unstructured_space_bounds():
    counts = {"a": 10, "b": 10}
    s = LevelSpace.unstructured(0.7, counts, step=0.05, max_shift=0.25, max_sparsity=0.95)
    assert (s.min_offset, s.max_offset) == (-5, 5)
    assert s.level(5) == 0.95 and s.level(-5) == 0.45 and s.level(0) == 0.7
    s = LevelSpace.unstructured(0.1, counts, step=0.05, max_shift=0.25)
    assert s.min_offset == -2


def test_mixed_nm_space():
    s = LevelSpace.mixed_nm("2:4", ["1:4", "2:4", "3:4"], {"a": 8})
    assert (s.min_offset, s.max_offset) == (-1, 1)
    assert s.level(1) == NM(1, 4) and s.level(-1) == NM(3, 4) and s.level(0) == NM(2, 4)
    with pytest.raises(SparsityError):
        LevelSpace.mixed_nm("2:4", ["1:4", "4:8"], {"a": 8})
    with pytest.raises(SparsityError):
        LevelSpace.mixed_nm("2:4", ["1:4", "3:4"], {"a": 8})  # not consecutive


def _space_strategy():
    return st.builds(
        lambda sizes, reps, target: LevelSpace.unstructured(
            target, {f"l{i}_{r}": s for i, s in enumerate(sizes) for r in range(reps)}, step=0.05),
        st.lists(st.sampled_from([64, 192, 512, 96]), min_size=1, max_size=4, unique=True),
        st.integers(2, 5),
        st.sampled_from([0.5, 0.6, 0.7, 0.8]),
    )


@settings(max_examples=60, deadline=None)
@given(space=_space_strategy(), seed=st.integers(0, 10**6), moves=st.integers(1, 6))
def test_mutation_keeps_budget_exact(space, seed, moves):
    rng = random.Random(seed)
    offsets = {n: 0 for n in space.param_counts}
    for _ in range(5):
        offsets = mutate(offsets, space, rng, moves)
        assert space.residual(offsets) == 0
        assert all(space.min_offset <= k <= space.max_offset for k in offsets.values())
        assert space.to_map(offsets).average() == pytest.approx(space.target, abs=1e-12)


def test_mutation_moves_sparsity_between_layers_of_different_sizes():
    # LLaMA-like block: one MLP layer (8 units) equals q + o + k + v (3 + 3 + 1 + 1)
    counts = {"mlp": 8, "q": 3, "o": 3, "k": 1, "v": 1}
    space = LevelSpace.unstructured(0.5, counts, step=0.1, max_shift=0.2)
    rng = random.Random(0)
    seen_mlp = set()
    for _ in range(200):
        child = mutate({n: 0 for n in counts}, space, rng, 1)
        assert space.residual(child) == 0
        seen_mlp.add(child["mlp"])
        if child["mlp"]:  # the only 8-unit layer: paid by all four attention layers
            assert child == {"mlp": child["mlp"], **{n: -child["mlp"] for n in ("q", "o", "k", "v")}}
    assert seen_mlp == {-1, 0, 1}


def test_no_budget_preserving_move_is_a_clear_error():
    assert _has_move(LevelSpace.unstructured(0.5, {"a": 4, "b": 1, "c": 3}, step=0.1))
    assert not _has_move(LevelSpace.unstructured(0.5, {"a": 4, "b": 1, "c": 2}, step=0.1))
    space = LevelSpace.unstructured(0.5, {"a": 4, "b": 1, "c": 2}, step=0.1)
    with pytest.raises(SparsityError, match="no budget-preserving move"):
        evolutionary_search(lambda o, w: 0.0, space, [{"a": 0, "b": 0, "c": 0}], SearchConfig(generations=1),
                            progress=False)


@settings(max_examples=60, deadline=None)
@given(space=_space_strategy(), seed=st.integers(0, 10**6))
def test_crossover_repairs_budget_exactly(space, seed):
    rng = random.Random(seed)
    names = list(space.param_counts)
    a = mutate({n: 0 for n in names}, space, rng, 8)
    b = mutate({n: 0 for n in names}, space, rng, 8)
    blocks_of = {n: i % 3 for i, n in enumerate(names)}
    child = crossover(a, b, space, blocks_of, rng)
    assert space.residual(child) == 0
    assert all(space.min_offset <= k <= space.max_offset for k in child.values())


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_level_cache_equals_direct_pruning(pruner):
    model = tiny_model("llama")
    counts = param_counts(model)
    space = LevelSpace.unstructured(0.5, counts, step=0.1, max_shift=0.2)
    ids = tiny_ids()
    cache = LevelDatabase.build(model, space, ids, pruner, progress=False)
    assert cache.masks_only == (pruner == "wanda")
    # the first block sees the same (dense) inputs as a direct one-shot pruner would
    name = next(n for n in counts if ".layers.0.mlp.down_proj" in n)
    lin = prunable_linears(model)[name]
    dense = lin.weight.detach().clone()
    p = get_pruner(pruner)(lin)
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        # inputs of down_proj in block 0, recomputed by hand
        block = model.model.layers[0]
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        h = x + block.self_attn(block.input_layernorm(x), attention_mask=None,
                                position_embeddings=model.model.rotary_emb(x, pos))[0]
        m = block.mlp
        hn = block.post_attention_layernorm(h)
        p.add_batch(m.act_fn(m.gate_proj(hn)) * m.up_proj(hn))
    for k in space.offsets:
        expected = p.compute(space.level(k)).weight
        torch.testing.assert_close(cache.weight(name, k), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(lin.weight.data, dense)  # the model stays dense: levels live in the database
    cache.write({name: space.max_offset})
    assert torch.equal(lin.weight.data, cache.weight(name, space.max_offset))
    cache.free()


def test_dense_candidate_has_zero_kl_and_fitness_is_memoised():
    model = tiny_model("llama")
    counts = param_counts(model)
    space = LevelSpace.unstructured(0.5, counts, step=0.1, max_shift=0.2)
    cache = LevelDatabase.build(model, space, tiny_ids(), "wanda", progress=False)
    fit = Fitness(cache, tiny_ids(3, 16, seed=5), "kl")
    assert fit.reference is not None
    zero = {n: 0 for n in counts}
    f1 = fit(zero, 1)
    assert f1 > 0
    n_eval = fit.evaluations
    assert fit(zero, 1) == f1 and fit.evaluations == n_eval  # memoised
    fit(zero, 3)
    assert fit.evaluations == n_eval + 2  # only the two new windows


def _setup(pruner="wanda", target=0.6):
    model = tiny_model("llama")
    counts = param_counts(model)
    space = LevelSpace.unstructured(target, counts, step=0.1, max_shift=0.2)
    cache = LevelDatabase.build(model, space, tiny_ids(), pruner, progress=False)
    return space, Fitness(cache, tiny_ids(3, 16, seed=7), "kl")


CFG = dict(population=3, offspring=4, stages=[[1, 2], [3, 1]], seed=3, crossover_rate=0.5, patience=100)


def test_search_never_worse_than_init_and_budget_exact():
    space, fit = _setup()
    init = {n: 0 for n in space.param_counts}
    res = evolutionary_search(fit, space, [init], SearchConfig(generations=4, **CFG), progress=False)
    assert res.fitness <= fit(init, 3) + 1e-12
    assert space.residual(res.offsets) == 0
    assert res.sparsity_map.average() == pytest.approx(0.6, abs=1e-12)
    fits = [h["best_fitness"] for h in res.history]
    assert fits == sorted(fits, reverse=True) and len(res.history) == 5


def test_resumed_search_equals_uninterrupted(tmp_path):
    space, fit = _setup()
    init = {n: 0 for n in space.param_counts}
    full = evolutionary_search(fit, space, [init], SearchConfig(generations=4, **CFG), progress=False)

    space2, fit2 = _setup()
    ck = tmp_path / "state.json"

    class Stop(KeyboardInterrupt):
        pass

    def interrupt(gen, rec):
        if gen == 2:
            raise Stop  # Ctrl-C right after generation 2 was checkpointed

    with pytest.raises(KeyboardInterrupt):
        evolutionary_search(fit2, space2, [init], SearchConfig(generations=4, **CFG), checkpoint=ck,
                            on_generation=interrupt, progress=False)
    assert ck.exists()
    space3, fit3 = _setup()  # a fresh process: new model, new cache, empty memo
    resumed = evolutionary_search(fit3, space3, [init], SearchConfig(generations=4, **CFG), checkpoint=ck, progress=False)
    assert resumed.offsets == full.offsets
    assert resumed.fitness == full.fitness
    assert [h["best_fitness"] for h in resumed.history] == [h["best_fitness"] for h in full.history]


def test_raising_generations_extends_a_finished_search(tmp_path):
    space, fit = _setup()
    init = {n: 0 for n in space.param_counts}
    full = evolutionary_search(fit, space, [init], SearchConfig(generations=4, **CFG), progress=False)
    ck = tmp_path / "state.json"
    space2, fit2 = _setup()
    evolutionary_search(fit2, space2, [init], SearchConfig(generations=2, **CFG), checkpoint=ck, progress=False)
    space3, fit3 = _setup()
    longer = evolutionary_search(fit3, space3, [init], SearchConfig(generations=4, **CFG), checkpoint=ck, progress=False)
    assert longer.offsets == full.offsets and longer.fitness == full.fitness and longer.generations == 4


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    space, fit = _setup()
    init = {n: 0 for n in space.param_counts}
    ck = tmp_path / "state.json"
    evolutionary_search(fit, space, [init], SearchConfig(generations=1, **CFG), checkpoint=ck, progress=False)
    with pytest.raises(ConfigError, match="different settings"):
        evolutionary_search(fit, space, [init], SearchConfig(generations=2, **{**CFG, "seed": 9}), checkpoint=ck,
                            progress=False)


def test_mixed_nm_search_keeps_patterns_and_budget():
    model = tiny_model("llama")
    counts = param_counts(model)
    space = LevelSpace.mixed_nm("2:4", ["1:4", "2:4", "3:4"], counts)
    cache = LevelDatabase.build(model, space, tiny_ids(), "wanda", progress=False)
    fit = Fitness(cache, tiny_ids(3, 16, seed=7), "kl")
    init = {n: 0 for n in counts}
    res = evolutionary_search(fit, space, [init], SearchConfig(generations=3, **CFG), progress=False)
    assert all(isinstance(v, NM) and v.m == 4 for v in res.sparsity_map.values())
    assert res.sparsity_map.average() == pytest.approx(0.5, abs=1e-12)


def test_search_config_validation():
    with pytest.raises(ConfigError):
        SearchConfig(stages=[[4, 1], [2, 1]])
    with pytest.raises(ConfigError):
        SearchConfig(stages=[[0, 1]])
    with pytest.raises(ConfigError):
        SearchConfig(crossover_rate=2)


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        space, fit = _setup()
        fit.group = dist.group.WORLD
        init = {n: 0 for n in space.param_counts}
        res = evolutionary_search(fit, space, [init], SearchConfig(generations=3, **CFG), progress=False,
                                  checkpoint=f"{out_dir}/state.json", write_checkpoint=rank == 0)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"offsets": res.offsets, "fitness": res.fitness, "evaluations": res.evaluations,
                       "local": fit.local_evaluations}, f)
    finally:
        dist.destroy_process_group()


def test_search_shared_over_two_processes_equals_one_process(tmp_path):
    """Data-parallel fitness (torch.distributed, gloo on CPU here, NCCL on GPUs): the ranks split the
    window evaluations and all take the single-process search path."""
    import json

    import torch.multiprocessing as mp

    space, fit = _setup()
    init = {n: 0 for n in space.param_counts}
    single = evolutionary_search(fit, space, [init], SearchConfig(generations=3, **CFG), progress=False)
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["offsets"] == single.offsets
        assert r["fitness"] == pytest.approx(single.fitness, rel=1e-6)
        assert r["evaluations"] == single.evaluations
    # each rank forwarded about half of the windows, together all of them
    assert sum(r["local"] for r in ranks) == single.evaluations
    assert min(r["local"] for r in ranks) >= single.evaluations // 2 - 8
    assert (tmp_path / "state.json").exists()  # written by rank 0 only


class _Clock:
    """A fake ``time.perf_counter`` for the search: each fitness call costs one second."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _timed_search(monkeypatch, tmp_path=None, **cfg):
    from mixsparse.search import evolution

    clock = _Clock()
    monkeypatch.setattr(evolution.time, "perf_counter", clock)
    space = LevelSpace.unstructured(0.5, {"a": 100, "b": 100, "c": 200}, step=0.1, max_shift=0.2)

    def fit(o, w, tokens=None):
        clock.now += 1.0
        return sum((k - 1) ** 2 for k in o.values()) + 0.01 * w

    init = {n: 0 for n in space.param_counts}
    ck = tmp_path / "state.json" if tmp_path is not None else None
    return evolutionary_search(fit, space, [init], SearchConfig(**{**CFG, **cfg}), checkpoint=ck, progress=False)


def test_time_budget_stops_between_generations_within_the_budget(monkeypatch):
    res = _timed_search(monkeypatch, generations=1000, time_budget=60.0)
    assert res.stopped_by == "time_budget" and 0 < res.generations < 1000
    assert res.seconds <= 60.0  # the next generation was predicted not to fit
    per_gen = (res.history[-1]["seconds"] - res.history[0]["seconds"]) / res.generations
    assert res.seconds + per_gen > 60.0 - 1e-9  # and it stopped no earlier than that
    unbounded = _timed_search(monkeypatch, generations=res.generations)
    assert unbounded.stopped_by == "generations"
    assert unbounded.offsets == res.offsets  # the budget only decides how many generations run


def test_time_budget_counts_the_time_before_a_resume(monkeypatch, tmp_path):
    first = _timed_search(monkeypatch, tmp_path, generations=3)
    resumed = _timed_search(monkeypatch, tmp_path, generations=1000, time_budget=first.seconds + 1.0)
    assert resumed.stopped_by == "time_budget" and resumed.generations == 3  # no room for a fourth
    with pytest.raises(ConfigError, match="time_budget"):
        SearchConfig(time_budget=0)

"""Score-to-sparsity allocation: exact hand-computed examples and budget/bounds properties."""

from __future__ import annotations

import math
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixsparse.allocation import (
    descending_ranks,
    exact_budget,
    linear_rank_allocation,
    offsets_to_sparsities,
    owl_allocation,
    score_allocation,
    snap_to_grid,
    uniform,
    weighted_average,
)
from mixsparse.errors import ConfigError, SparsityError, UnknownNameError
from mixsparse.sparsity import SparsityMap

BUDGET = 1e-9


def approx_dict(d, rel=1e-12, abs=1e-12):
    return pytest.approx(d, rel=rel, abs=abs)


# --- exact examples --------------------------------------------------------------------------
def test_exact_budget_shift_then_clip_hand_example():
    # a clips at 0.7; b, c shift by delta: 0.7 + 2(0.1+d) + 3(0.5+d) = 6 * 0.5 -> d = 0.12
    got = exact_budget({"a": 0.9, "b": 0.1, "c": 0.5}, 0.5, {"a": 1, "b": 2, "c": 3}, 0.2, 0.7)
    assert got == approx_dict({"a": 0.7, "b": 0.22, "c": 0.62})


def test_exact_budget_per_layer_bounds_and_infeasible_targets():
    counts = {"a": 10, "b": 10}
    got = exact_budget({"a": 0.5, "b": 0.5}, 0.6, counts, {"a": 0.0, "b": 0.0}, {"a": 0.55, "b": 0.9})
    assert got == approx_dict({"a": 0.55, "b": 0.65})
    with pytest.raises(SparsityError, match="infeasible"):
        exact_budget({"a": 0.5, "b": 0.5}, 0.8, counts, 0.0, {"a": 0.55, "b": 0.9})
    with pytest.raises(SparsityError, match="infeasible"):
        exact_budget({"a": 0.5, "b": 0.5}, 0.1, counts, 0.2, 0.9)
    with pytest.raises(SparsityError, match="min_sparsity"):
        exact_budget({"a": 0.5, "b": 0.5}, 0.5, counts, 0.6, 0.4)
    with pytest.raises(SparsityError, match="missing"):
        exact_budget({"a": 0.5}, 0.5, counts)
    with pytest.raises(UnknownNameError, match="zzz"):
        exact_budget({"a": 0.5, "b": 0.5, "zzz": 0.1}, 0.5, counts)
    with pytest.raises(SparsityError, match="target"):
        exact_budget({"a": 0.5, "b": 0.5}, 1.2, counts)
    with pytest.raises(SparsityError, match="not finite"):
        exact_budget({"a": float("nan"), "b": 0.5}, 0.5, counts)


def test_uniform():
    m = uniform(0.6, {"a": 3, "b": 5})
    assert isinstance(m, SparsityMap) and m.sparsities() == {"a": 0.6, "b": 0.6}


def test_shao_linear_rank_hand_example():
    counts = {"l0": 100, "l1": 100, "l2": 100}
    m = linear_rank_allocation({"l0": 3.0, "l1": 1.0, "l2": 2.0}, 0.5, counts, alpha=0.1)
    assert isinstance(m, SparsityMap)
    assert m.sparsities() == approx_dict({"l0": 0.4, "l1": 0.6, "l2": 0.5})


def test_linear_rank_per_block_and_ties():
    counts = {f"model.layers.{b}.{k}": 10 for b in range(3) for k in ("q", "v")}
    scores = {"model.layers.0.q": 1.0, "model.layers.0.v": 5.0,  # block 0: 6
              "model.layers.1.q": 0.5, "model.layers.1.v": 0.5,  # block 1: 1 (least sensitive)
              "model.layers.2.q": 9.0, "model.layers.2.v": 1.0}  # block 2: 10 (most sensitive)
    got = linear_rank_allocation(scores, 0.5, counts, 0.2, blocks_name="model.layers", per_block=True).sparsities()
    expected = {"0": 0.5, "1": 0.7, "2": 0.3}
    assert got == approx_dict({n: expected[n.split(".")[2]] for n in counts})
    assert descending_ranks({"a": 2.0, "b": 2.0, "c": 1.0, "d": 3.0}) == {"d": 0.0, "a": 1.5, "b": 1.5, "c": 3.0}
    with pytest.raises(ConfigError, match="blocks_name"):
        linear_rank_allocation(scores, 0.5, counts, 0.2, per_block=True)


def test_linear_rank_unequal_sizes_shifts_to_budget():
    # raw [0.4, 0.6] on sizes [1, 3] averages 0.55; a common shift of -0.05 restores 0.5
    got = linear_rank_allocation({"a": 2.0, "b": 1.0}, 0.5, {"a": 1, "b": 3}, alpha=0.1).sparsities()
    assert got == approx_dict({"a": 0.35, "b": 0.55})


def test_owl_allocation_hand_example():
    # ratios 1%, 2%, 3% -> normalised [0, 0.08, 0.16], mean 0.08 -> sparsity 0.5 - (r - mean)
    counts = {f"model.layers.{b}.{k}": 64 for b in range(3) for k in ("attn", "mlp")}
    m = owl_allocation({0: 0.01, 1: 0.02, 2: 0.03}, 0.5, counts, "model.layers", lam=0.08)
    expected = {0: 0.58, 1: 0.5, 2: 0.42}
    assert m.sparsities() == approx_dict({n: expected[int(n.split(".")[2])] for n in counts})
    same = owl_allocation({0: 0.02, 1: 0.02, 2: 0.02}, 0.5, counts, "model.layers")
    assert set(same.sparsities().values()) == {0.5}
    with pytest.raises(SparsityError, match="missing for block"):
        owl_allocation({0: 0.01, 1: 0.02}, 0.5, counts, "model.layers")


def test_score_allocation_log_mode_hand_example():
    # logs [0, 1, 2] -> z-scores [-1.22, 0, 1.22] -> scaled to +-alpha, higher score = lower sparsity
    scores = {"a": 1.0, "b": math.e, "c": math.e**2}
    m = score_allocation(scores, 0.5, {"a": 7, "b": 7, "c": 7}, mode="log", alpha=0.1)
    assert m.sparsities() == approx_dict({"a": 0.6, "b": 0.5, "c": 0.4}, rel=1e-9, abs=1e-9)
    r = score_allocation(scores, 0.5, {"a": 7, "b": 7, "c": 7}, mode="rank", alpha=0.1)
    assert r.sparsities() == approx_dict({"a": 0.6, "b": 0.5, "c": 0.4})
    with pytest.raises(SparsityError, match="non-negative"):
        score_allocation({"a": -1.0, "b": 1.0}, 0.5, {"a": 1, "b": 1}, mode="log")
    # a zero score (an expert no token reached) counts as the smallest positive one
    z = score_allocation({**scores, "d": 0.0}, 0.5, {"a": 7, "b": 7, "c": 7, "d": 7}, mode="log", alpha=0.1)
    assert z.sparsities()["d"] == z.sparsities()["a"] > z.sparsities()["b"] > z.sparsities()["c"]
    with pytest.raises(UnknownNameError, match="bogus"):
        score_allocation(scores, 0.5, {"a": 7, "b": 7, "c": 7}, mode="bogus")


# --- grid ------------------------------------------------------------------------------------
def test_snap_to_grid_needs_a_two_layer_repair():
    # counts 4 and 6: rounding x=[1.4, -0.6] gives [1, -1], residual 4 - 6 = -2; no single +-1 move
    # shrinks it, but one down on a and one up on b does: [0, 0]
    got = snap_to_grid({"a": 0.5 + 1.4 * 0.1, "b": 0.5 - 0.6 * 0.1}, 0.5, 0.1, {"a": 4, "b": 6}, -3, 3)
    assert got == {"a": 0, "b": 0}


def test_snap_to_grid_keeps_a_balanced_grid_point():
    d, kv, ff = 64, 16, 176  # Llama-like shapes: q/o d*d, k/v d*kv, MLP d*ff
    counts = {"q": d * d, "k": d * kv, "v": d * kv, "o": d * d, "up": d * ff, "gate": d * ff, "down": ff * d}
    offsets = {"q": 11, "k": 3, "v": -3, "o": 0, "up": -4, "gate": 0, "down": 0}
    assert sum(counts[n] * k for n, k in offsets.items()) == 0
    sp = offsets_to_sparsities(offsets, 0.5, 0.02)
    assert snap_to_grid(sp, 0.5, 0.02, counts, -12, 12) == offsets
    assert weighted_average(sp, counts) == pytest.approx(0.5, abs=BUDGET)


def test_snap_to_grid_llama_shapes_rounding_is_repaired_exactly():
    d, kv, ff = 576, 192, 1536
    counts = {}
    for b in range(4):
        counts.update({f"{b}.q": d * d, f"{b}.k": d * kv, f"{b}.v": d * kv, f"{b}.o": d * d,
                       f"{b}.gate": d * ff, f"{b}.up": d * ff, f"{b}.down": ff * d})
    cont = exact_budget({n: 0.5 + 0.013 * (i % 5) - 0.004 * i for i, n in enumerate(counts)}, 0.6, counts, 0.3, 0.9)
    k = snap_to_grid(cont, 0.6, 0.05, counts, -4, 4)
    assert sum(counts[n] * k[n] for n in counts) == 0
    assert all(abs(0.6 + k[n] * 0.05 - cont[n]) <= 0.05 + 1e-12 for n in counts)


def test_snap_to_grid_errors():
    counts = {"a": 4, "b": 6}
    with pytest.raises(SparsityError, match="include 0"):
        snap_to_grid({"a": 0.6, "b": 0.6}, 0.5, 0.1, counts, 1, 3)
    with pytest.raises(SparsityError, match="leave"):
        snap_to_grid({"a": 0.6, "b": 0.6}, 0.5, 0.1, counts, -2, 5)
    with pytest.raises(SparsityError, match="step"):
        snap_to_grid({"a": 0.6, "b": 0.6}, 0.5, 0.0, counts, -2, 2)
    with pytest.raises(SparsityError, match="outside"):
        offsets_to_sparsities({"a": 9}, 0.5, 0.1)


# --- properties ------------------------------------------------------------------------------
@st.composite
def layers(draw, max_layers=12):
    """Parameter counts: multiples of a common gcd, often of few distinct sizes (like real models)."""
    n = draw(st.integers(1, max_layers))
    g = draw(st.sampled_from([1, 2, 64, 4096, 576 * 192]))
    kinds = draw(st.lists(st.integers(1, 40), min_size=1, max_size=4))
    mult = draw(st.lists(st.sampled_from(kinds), min_size=n, max_size=n))
    return {f"model.layers.{i // 3}.lin{i % 3}": g * m for i, m in enumerate(mult)}


finite = st.floats(-1.0, 2.0, allow_nan=False)
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_budget(sparsities, target, counts, lo=0.0, hi=0.99):
    assert set(sparsities) == set(counts)
    assert abs(weighted_average(sparsities, counts) - target) < BUDGET
    lo_of = lo if isinstance(lo, dict) else {n: lo for n in counts}
    hi_of = hi if isinstance(hi, dict) else {n: hi for n in counts}
    assert all(lo_of[n] <= s <= hi_of[n] for n, s in sparsities.items())


@PROPS
@given(data=st.data(), counts=layers())
def test_exact_budget_property(data, counts):
    raw = {n: data.draw(finite) for n in counts}
    lo = {n: data.draw(st.floats(0.0, 0.5)) for n in counts}
    hi = {n: lo[n] + data.draw(st.floats(0.0, 0.98 - lo[n])) for n in counts}
    total = sum(counts.values())
    lo_avg = sum(lo[n] * c for n, c in counts.items()) / total
    hi_avg = sum(hi[n] * c for n, c in counts.items()) / total
    target = min(lo_avg + data.draw(st.floats(0.0, 1.0)) * (hi_avg - lo_avg), 0.98)
    target = min(max(target, lo_avg), hi_avg)
    check_budget(exact_budget(raw, target, counts, lo, hi), target, counts, lo, hi)


@PROPS
@given(data=st.data(), counts=layers())
def test_score_allocations_meet_budget_and_bounds(data, counts):
    scores = {n: data.draw(st.floats(1e-6, 1e6)) for n in counts}
    target = data.draw(st.floats(0.05, 0.9))
    alpha = data.draw(st.floats(0.0, 0.3))
    lo, hi = max(0.0, target - 0.2), min(0.99, target + 0.2)
    for mode in ("rank", "log"):
        for per_block in (False, True):
            m = score_allocation(scores, target, counts, mode=mode, alpha=alpha, blocks_name="model.layers",
                                 per_block=per_block, min_sparsity=lo, max_sparsity=hi)
            check_budget(m.sparsities(), target, counts, lo, hi)
    ratios = {b: data.draw(st.floats(0.0, 0.2)) for b in range(5)}
    m = owl_allocation(ratios, target, counts, "model.layers", lam=alpha, min_sparsity=lo, max_sparsity=hi)
    check_budget(m.sparsities(), target, counts, lo, hi)


@PROPS
@given(data=st.data(), counts=layers(max_layers=20))
def test_snap_to_grid_property(data, counts):
    step = data.draw(st.sampled_from([0.005, 0.01, 0.025, 0.05, 0.1]))
    target = data.draw(st.floats(0.2, 0.8))
    lo_k = -data.draw(st.integers(0, int(target / step)))
    hi_k = data.draw(st.integers(0, int((0.99 - target) / step)))
    sp = {n: data.draw(st.floats(0.0, 0.99)) for n in counts}
    k = snap_to_grid(sp, target, step, counts, lo_k, hi_k)
    assert sum(counts[n] * k[n] for n in counts) == 0  # exact, in integers
    assert all(lo_k <= k[n] <= hi_k for n in counts)
    s = offsets_to_sparsities(k, target, step)
    assert abs(weighted_average(s, counts) - target) < BUDGET
    # a rounding that already balances is returned unchanged
    nearest = {n: min(hi_k, max(lo_k, math.floor((sp[n] - target) / step + 0.5))) for n in counts}
    if sum(counts[n] * nearest[n] for n in counts) == 0:
        assert k == nearest

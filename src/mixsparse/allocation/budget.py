"""From per-layer sensitivity scores to per-layer sparsities with an exact global budget.

Every allocation here spends exactly the requested budget: the parameter-weighted average
sparsity of the result equals ``target`` (to float rounding), with every layer inside its bounds.
The common last step is :func:`exact_budget` (shift all raw sparsities by one constant, clip to
the bounds, and choose the constant so the weighted average is the target).

``param_counts`` (layer name -> number of weights) defines the layers being allocated; score
dictionaries must name exactly those layers.

The discrete grid (:func:`snap_to_grid`) serves the evolutionary search and mixed N:M: layer
sparsity ``target + k * step`` with integer offsets ``k`` whose parameter-weighted sum is exactly
zero, checked in integer arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import reduce
from typing import Union

import numpy as np

from ..errors import ConfigError, SparsityError, UnknownNameError
from ..names import block_index
from ..sparsity import SparsityMap, fraction, weighted_average

Bound = Union[float, Mapping[str, float]]

#: what "equals the target" means for the weighted average
BUDGET_TOLERANCE = 1e-9


# --- validation helpers ----------------------------------------------------------------------
def _check_target(target: float) -> float:
    return fraction(target, "target sparsity")


def _check_counts(param_counts: Mapping[str, int]) -> list[str]:
    if not param_counts:
        raise SparsityError("no layers to allocate sparsity to (param_counts is empty)")
    for name, c in param_counts.items():
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c <= 0:
            raise SparsityError(f"layer {name!r}: parameter count must be a positive integer, got {c!r}")
    return list(param_counts)


def _check_names(values: Mapping[str, object], param_counts: Mapping[str, int], what: str) -> None:
    missing = [n for n in param_counts if n not in values]
    extra = [n for n in values if n not in param_counts]
    if extra:
        raise UnknownNameError(f"{what} name(s) not among the layers being allocated: {', '.join(map(str, extra[:5]))}")
    if missing:
        raise SparsityError(f"{what} missing for layer(s): {', '.join(missing[:5])}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))


def _check_scores(scores: Mapping[str, float], param_counts: Mapping[str, int], what: str = "scores") -> dict[str, float]:
    _check_names(scores, param_counts, what)
    out = {}
    for n in param_counts:
        try:
            v = float(scores[n])
        except (TypeError, ValueError):
            raise SparsityError(f"{what} for layer {n!r} is not a number: {scores[n]!r}") from None
        if not math.isfinite(v):
            raise SparsityError(f"{what} for layer {n!r} is not finite: {v}")
        out[n] = v
    return out


def _bound_values(bound: Bound, names: list[str], what: str) -> np.ndarray:
    if isinstance(bound, Mapping):
        _check_names(bound, {n: 1 for n in names}, what)
        vals = [bound[n] for n in names]
    else:
        vals = [bound] * len(names)
    arr = np.asarray([float(v) for v in vals], dtype=np.float64)
    bad = [names[i] for i in np.flatnonzero(~np.isfinite(arr) | (arr < 0) | (arr >= 1))]
    if bad:
        raise SparsityError(f"{what} must be in [0, 1); layer {bad[0]!r} has {arr[names.index(bad[0])]!r}")
    return arr


# --- exact budget ---------------------------------------------------------------------------
def exact_budget(
    raw: Mapping[str, float],
    target: float,
    param_counts: Mapping[str, int],
    min_sparsity: Bound = 0.0,
    max_sparsity: Bound = 0.99,
) -> dict[str, float]:
    """Shift-then-clip: ``s_l = clip(raw_l + delta, min_l, max_l)`` with the one ``delta`` that makes
    the parameter-weighted average exactly ``target``.

    The weighted average is a non-decreasing, piecewise-linear function of ``delta`` whose kinks are
    where a layer reaches a bound, so ``delta`` is found exactly by locating the segment holding the
    target and solving the linear equation on it (what bisection converges to, without its
    tolerance). Bounds are floats or per-layer mappings. Raises :class:`SparsityError` when the
    bounds cannot average to ``target``.
    """
    t = _check_target(target)
    names = _check_counts(param_counts)
    raw_values = _check_scores(raw, param_counts, "raw sparsity")
    r = np.asarray([raw_values[n] for n in names], dtype=np.float64)
    lo = _bound_values(min_sparsity, names, "min_sparsity")
    hi = _bound_values(max_sparsity, names, "max_sparsity")
    if np.any(lo > hi):
        i = int(np.flatnonzero(lo > hi)[0])
        raise SparsityError(f"layer {names[i]!r}: min_sparsity {lo[i]} exceeds max_sparsity {hi[i]}")
    c = np.asarray([int(param_counts[n]) for n in names], dtype=np.float64)
    total = c.sum()
    goal = t * total
    lo_sum, hi_sum = float(c @ lo), float(c @ hi)
    slack = 1e-12 * total
    if goal < lo_sum - slack or goal > hi_sum + slack:
        raise SparsityError(
            f"target sparsity {t} is infeasible with the per-layer bounds: they allow a weighted "
            f"average between {lo_sum / total:.6g} and {hi_sum / total:.6g}"
        )

    def f(delta: float) -> float:
        return float(c @ np.clip(r + delta, lo, hi))

    kinks = np.unique(np.concatenate([lo - r, hi - r]))
    values = np.asarray([f(k) for k in kinks])
    j = int(np.searchsorted(values, goal, side="left"))
    if j == 0:
        delta = float(kinks[0])
    elif j >= len(kinks):
        delta = float(kinks[-1])
    else:
        a, b, fa, fb = float(kinks[j - 1]), float(kinks[j]), float(values[j - 1]), float(values[j])
        delta = a if fb == fa else a + (goal - fa) * (b - a) / (fb - fa)
    s = np.clip(r + delta, lo, hi)
    # float rounding of the solve: spread the (tiny) remainder over the layers not at a bound
    free = (s > lo) & (s < hi)
    if free.any():
        s[free] += (goal - float(c @ s)) / c[free].sum()
        s = np.clip(s, lo, hi)
    out = {n: float(v) for n, v in zip(names, s)}
    avg = weighted_average(out, param_counts)
    if abs(avg - t) > BUDGET_TOLERANCE:  # cannot happen for feasible input; guard against silent drift
        raise SparsityError(f"could not meet the budget exactly: average {avg} vs target {t}")
    return out


def uniform(target: float, param_counts: Mapping[str, int]) -> SparsityMap:
    """Every layer at ``target``."""
    _check_counts(param_counts)
    return SparsityMap.uniform(_check_target(target), param_counts)


# --- score -> raw sparsity mappings ---------------------------------------------------------
def _units(
    scores: Mapping[str, float], param_counts: Mapping[str, int], blocks_name: str | None, per_block: bool
) -> tuple[dict[object, float], dict[str, object]]:
    """Allocation units (layers, or blocks with summed scores) and the unit of every layer."""
    vals = _check_scores(scores, param_counts)
    if not per_block:
        return dict(vals), {n: n for n in vals}
    if not blocks_name:
        raise ConfigError("per-block allocation needs blocks_name (e.g. 'model.layers')")
    unit_of = {n: block_index(n, blocks_name) for n in vals}
    sums: dict[object, float] = {}
    for n, v in vals.items():
        sums[unit_of[n]] = sums.get(unit_of[n], 0.0) + v
    return sums, unit_of


def _check_alpha(alpha: float, name: str = "alpha") -> float:
    return fraction(alpha, name, ConfigError)


def descending_ranks(scores: Mapping[object, float]) -> dict[object, float]:
    """0 for the highest score, n-1 for the lowest; ties share their average rank."""
    order = sorted(scores, key=lambda u: -scores[u])
    ranks: dict[object, float] = {}
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for u in order[i : j + 1]:
            ranks[u] = (i + j) / 2
        i = j + 1
    return ranks


def rank_offsets(scores: Mapping[object, float], alpha: float) -> dict[object, float]:
    """Shao et al.'s linear mapping: most sensitive unit -alpha, least sensitive +alpha, linear in rank."""
    n = len(scores)
    if n == 1:
        return {u: 0.0 for u in scores}
    return {u: -alpha + 2 * alpha * r / (n - 1) for u, r in descending_ranks(scores).items()}


def log_offsets(scores: Mapping[object, float], alpha: float) -> dict[object, float]:
    """Offset linear in the standardised log-score, scaled so the most extreme unit sits at +-alpha
    (higher score = more sensitive = lower sparsity). A zero score (a MoE expert no calibration token was
    routed to: its Fisher trace is exactly 0) counts as the smallest positive one: least sensitive, but not an
    infinitely distant outlier that would squash every other unit's offset."""
    bad = [u for u, v in scores.items() if not (v >= 0 and np.isfinite(v))]
    if bad:
        raise SparsityError(
            f"log-score allocation needs non-negative scores; {bad[0]!r} has {scores[bad[0]]!r} (use mode='rank')"
        )
    positive = [v for v in scores.values() if v > 0]
    if not positive:
        return {u: 0.0 for u in scores}
    floor = min(positive)
    units = list(scores)
    logs = np.log(np.asarray([max(scores[u], floor) for u in units], dtype=np.float64))
    z = logs - logs.mean()
    std = logs.std()
    if std == 0 or not np.isfinite(std):
        return {u: 0.0 for u in units}
    z /= std
    z *= alpha / np.abs(z).max()
    return {u: float(-v) for u, v in zip(units, z)}


def _finish(
    unit_offsets: Mapping[object, float],
    unit_of: Mapping[str, object],
    target: float,
    param_counts: Mapping[str, int],
    min_sparsity: Bound,
    max_sparsity: Bound,
) -> SparsityMap:
    raw = {n: target + unit_offsets[unit_of[n]] for n in param_counts}
    return SparsityMap(exact_budget(raw, target, param_counts, min_sparsity, max_sparsity), param_counts)


def linear_rank_allocation(
    scores: Mapping[str, float],
    target: float,
    param_counts: Mapping[str, int],
    alpha: float,
    blocks_name: str | None = None,
    per_block: bool = False,
    min_sparsity: Bound = 0.0,
    max_sparsity: Bound = 0.99,
) -> SparsityMap:
    """Shao et al.: rank units by sensitivity (higher score = more sensitive); the most sensitive
    gets ``target - alpha``, the least ``target + alpha``, linearly in rank, then :func:`exact_budget`.
    With ``per_block`` the units are decoder blocks, scored by the sum of their layers' scores, and
    all linears of a block share its sparsity."""
    t = _check_target(target)
    a = _check_alpha(alpha)
    _check_counts(param_counts)
    unit_scores, unit_of = _units(scores, param_counts, blocks_name, per_block)
    return _finish(rank_offsets(unit_scores, a), unit_of, t, param_counts, min_sparsity, max_sparsity)


SCORE_MODES = ("rank", "log")


def score_allocation(
    scores: Mapping[str, float],
    target: float,
    param_counts: Mapping[str, int],
    *,
    mode: str = "rank",
    alpha: float = 0.1,
    blocks_name: str | None = None,
    per_block: bool = False,
    min_sparsity: Bound = 0.0,
    max_sparsity: Bound = 0.99,
) -> SparsityMap:
    """Allocation from scores alone (the "FIM-only" seed of MSP's search).

    ``mode="rank"``: :func:`linear_rank_allocation`. ``mode="log"``: sparsity linear in the z-score
    of the log-score, scaled so the spread is ``target +- alpha`` (Fisher traces span orders of
    magnitude, so their logs are what is compared). Both finish with :func:`exact_budget`.
    """
    if mode not in SCORE_MODES:
        raise UnknownNameError(f"unknown score allocation mode {mode!r}; available: {', '.join(SCORE_MODES)}")
    t = _check_target(target)
    a = _check_alpha(alpha)
    _check_counts(param_counts)
    unit_scores, unit_of = _units(scores, param_counts, blocks_name, per_block)
    offsets = rank_offsets(unit_scores, a) if mode == "rank" else log_offsets(unit_scores, a)
    return _finish(offsets, unit_of, t, param_counts, min_sparsity, max_sparsity)


def owl_block_offsets(ratios_by_block: Mapping[int, float], lam: float) -> dict[int, float]:
    """OWL's mapping: min-max normalise the outlier ratios to [0, 2*lam]; a block's sparsity offset
    is minus its normalised ratio's deviation from the mean (more outliers -> denser)."""
    blocks = list(ratios_by_block)
    r = np.asarray([float(ratios_by_block[b]) for b in blocks], dtype=np.float64)
    if not np.all(np.isfinite(r)):
        raise SparsityError(f"OWL outlier ratios must be finite, got {dict(zip(blocks, r.tolist()))}")
    span = r.max() - r.min()
    if span == 0:
        return {b: 0.0 for b in blocks}
    norm = (r - r.min()) / span * (2 * lam)
    return {b: float(-(v - norm.mean())) for b, v in zip(blocks, norm)}


def owl_allocation(
    ratios_by_block: Mapping[int, float],
    target: float,
    param_counts: Mapping[str, int],
    blocks_name: str,
    lam: float = 0.08,
    min_sparsity: Bound = 0.0,
    max_sparsity: Bound = 0.99,
) -> SparsityMap:
    """OWL (Yin et al., 2023): block sparsity in ``target +- lam``, lower where the outlier ratio is
    higher; all linears of a block share it; then :func:`exact_budget` with parameter weighting."""
    t = _check_target(target)
    lam = _check_alpha(lam, "lam")
    _check_counts(param_counts)
    unit_of: dict[str, object] = {n: block_index(n, blocks_name) for n in param_counts}
    missing = sorted({b for b in unit_of.values() if b not in ratios_by_block})  # type: ignore[type-var]
    if missing:
        raise SparsityError(f"OWL outlier ratios missing for block(s) {missing[:5]}")
    used = {b: ratios_by_block[b] for b in sorted(set(unit_of.values()))}  # type: ignore[type-var]
    return _finish(owl_block_offsets(used, lam), unit_of, t, param_counts, min_sparsity, max_sparsity)


# --- discrete grid with an exact budget -----------------------------------------------------
#: most cells (layers x reachable residual values) the exact repair may use
_DP_CELLS = 40_000_000


def snap_to_grid(
    sparsities: Mapping[str, float],
    target: float,
    step: float,
    param_counts: Mapping[str, int],
    min_offset: int,
    max_offset: int,
) -> dict[str, int]:
    """Integer offsets ``k_l`` (layer sparsity ``target + k_l * step``) close to ``sparsities``
    with ``sum_l param_count_l * k_l == 0`` exactly, and ``min_offset <= k_l <= max_offset``.

    ``sparsities`` is normally a continuous allocation already on budget (e.g. from
    :func:`exact_budget`); if it is not, or leaves the grid's range, it is first balanced by
    :func:`exact_budget` within the grid's range. Each layer is then rounded to the nearest level
    and the residual ``sum c_l k_l`` (an integer multiple of ``g = gcd(counts)``) is repaired by
    the cheapest changes of at most ``W`` levels per layer (least added squared deviation from the
    continuous offsets, found by dynamic programming over the running residual; ``W`` = 1, 2, 4, ...
    until one exists). This also finds repairs no single +-1 move gives (counts 4 and 6, residual
    2: one layer down and the other up). When layer sizes are so varied that the residual range is
    too large for the DP, greedy +-1 moves that shrink ``|residual|`` at the least cost per unit
    go first. All-zero offsets always balance, so a solution exists whenever ``min_offset <= 0 <=
    max_offset``; otherwise :class:`SparsityError`.
    """
    t = _check_target(target)
    names = _check_counts(param_counts)
    vals = _check_scores(sparsities, param_counts, "sparsity")
    try:
        st = float(step)
    except (TypeError, ValueError):
        raise SparsityError(f"grid step must be a positive number, got {step!r}") from None
    if not math.isfinite(st) or st <= 0:
        raise SparsityError(f"grid step must be a positive number, got {step!r}")
    for nm, v in (("min_offset", min_offset), ("max_offset", max_offset)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise SparsityError(f"{nm} must be an integer, got {v!r}")
    lo_k, hi_k = int(min_offset), int(max_offset)
    if not lo_k <= 0 <= hi_k:
        raise SparsityError(
            f"offsets in [{lo_k}, {hi_k}] cannot balance to the target: the range must include 0 "
            "(all layers strictly above or below the target cannot average to it)"
        )
    if t + lo_k * st < -1e-12 or t + hi_k * st >= 1.0:
        raise SparsityError(
            f"grid levels {t} + k*{st} for k in [{lo_k}, {hi_k}] leave [0, 1): "
            f"lowest {t + lo_k * st:.6g}, highest {t + hi_k * st:.6g}"
        )

    counts = [int(param_counts[n]) for n in names]
    g = reduce(math.gcd, counts)
    cu = [c // g for c in counts]  # counts in units of the gcd: the residual is an integer of these
    # an allocation that is off budget or outside the grid's range is first balanced like any other
    # (shift-then-clip); for the output of exact_budget with the same bounds this changes nothing
    balanced = exact_budget(vals, t, param_counts, max(0.0, t + lo_k * st), t + hi_k * st)
    x = np.asarray([(balanced[n] - t) / st for n in names], dtype=np.float64)
    k = [min(hi_k, max(lo_k, int(math.floor(v + 0.5)))) for v in x]
    residual = sum(c * kk for c, kk in zip(cu, k))
    if residual != 0 and len(k) * (2 * sum(cu) + 1) > _DP_CELLS:
        residual = _greedy_repair(k, x, cu, residual, lo_k, hi_k)  # shrink it first: the DP range is too large
    if residual != 0:
        _dp_repair(k, x, cu, residual, lo_k, hi_k)
    if sum(c * kk for c, kk in zip(counts, k)) != 0:  # integer check of the exact budget
        raise SparsityError("internal error: grid offsets do not balance")  # pragma: no cover
    return dict(zip(names, k))


def _greedy_repair(k: list[int], x: np.ndarray, cu: list[int], residual: int, lo: int, hi: int) -> int:
    """Repeat the +-1 move that reduces |residual| at the least squared-deviation cost per unit of
    reduction; stop at zero or when no single move reduces it. Edits ``k`` in place."""
    c = np.asarray(cu, dtype=np.int64)
    while residual != 0:
        d = -1 if residual > 0 else 1
        kk = np.asarray(k, dtype=np.float64)
        gain = (abs(residual) - np.abs(residual + d * c)).astype(np.float64)
        ok = (gain > 0) & (kk + d >= lo) & (kk + d <= hi)
        if not ok.any():
            break
        cost = np.full(len(k), np.inf)
        cost[ok] = ((kk[ok] + d - x[ok]) ** 2 - (kk[ok] - x[ok]) ** 2) / gain[ok]
        i = int(np.argmin(cost))
        k[i] += d
        residual += d * cu[i]
    return residual


def _dp_repair(k: list[int], x: np.ndarray, cu: list[int], residual: int, lo: int, hi: int) -> None:
    """Cheapest changes ``Delta_l`` in [-W, W] (and within bounds) with ``sum cu_l Delta_l == -residual``,
    by dynamic programming over the running sum (cost: added squared deviation from ``x``); ``W``
    doubles until a solution is found. Edits ``k`` in place."""
    n, span, total_c = len(k), hi - lo, sum(cu)
    cap = max(1, _DP_CELLS // max(1, n) // 2)  # memory guard on the running-sum range
    dtype = np.int16 if span < 2**15 else np.int64
    clipped = False
    w = 1
    while True:
        reach = w * total_c
        bound = min(reach, cap)
        clipped = clipped or bound < reach
        if abs(residual) <= bound:
            size = 2 * bound + 1  # index = running sum + bound
            best = np.full(size, np.inf)
            best[bound] = 0.0
            choice = np.zeros((n, size), dtype=dtype)
            for i in range(n):
                new = np.full(size, np.inf)
                arg = np.zeros(size, dtype=dtype)
                base = (k[i] - x[i]) ** 2
                for dlt in sorted(range(max(lo - k[i], -w), min(hi - k[i], w) + 1), key=abs):
                    shift = cu[i] * dlt
                    if abs(shift) >= size:
                        continue
                    cand = best[max(0, -shift) : size - max(0, shift)] + ((k[i] + dlt - x[i]) ** 2 - base)
                    dst = slice(max(0, shift), size - max(0, -shift))
                    better = cand < new[dst]  # strict: ties keep the smaller move (0 is tried first)
                    new[dst] = np.where(better, cand, new[dst])
                    arg[dst] = np.where(better, dlt, arg[dst])
                best = new
                choice[i] = arg
            pos = bound - residual
            if np.isfinite(best[pos]):
                for i in range(n - 1, -1, -1):
                    dlt = int(choice[i, pos])
                    k[i] += dlt
                    pos -= cu[i] * dlt
                return
        if w >= span:
            break
        w = min(span, 2 * w)
    if clipped:
        raise SparsityError(
            "the layer sizes are too varied to balance the budget exactly on this grid "
            f"(residual {residual} units of their gcd); use a finer step or wider offset bounds"
        )
    raise SparsityError(  # unreachable while min_offset <= 0 <= max_offset (all zeros balance)
        f"no integer offsets in [{lo}, {hi}] balance the budget exactly (residual {residual} units of the gcd)"
    )


def offsets_to_sparsities(offsets: Mapping[str, int], target: float, step: float) -> dict[str, float]:
    """``target + k * step`` per layer."""
    t = _check_target(target)
    out = {}
    for n, kk in offsets.items():
        s = t + int(kk) * float(step)
        if not -1e-12 <= s < 1.0:
            raise SparsityError(f"layer {n!r}: offset {kk} gives sparsity {s:.6g}, outside [0, 1)")
        out[n] = max(0.0, s)
    return out

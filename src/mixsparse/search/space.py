"""The search space: discrete sparsity levels per layer, and budget-exact variation operators.

Genotype: one integer *offset* per prunable layer; the layer's sparsity is ``target + offset*step``
(or, for mixed N:M, the pattern ``(target.n - offset):M``). The budget is exact when
``sum(param_count * offset) == 0``, which integer arithmetic keeps exactly:

* mutation moves one layer one level up (down) and layers whose parameter counts sum exactly to its
  count one level down (up): one layer of the same size or several smaller ones;
* crossover takes each block from one of two parents, then repairs the budget with
  :func:`mixsparse.allocation.snap_to_grid`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from ..allocation.budget import snap_to_grid
from ..errors import ConfigError, SparsityError
from ..modeling import find_decoder_blocks
from ..names import block_index
from ..sparsity import NM, LayerSparsity, SparsityMap, parse_layer_sparsity

Offsets = dict[str, int]


def offsets_key(offsets: Offsets) -> tuple:
    """Memo key of a candidate: by layer name, so it does not depend on the dict's order."""
    return tuple(sorted(offsets.items()))


@dataclass(frozen=True)
class LevelSpace:
    """Discrete levels around a global target. ``patterns`` (all with the target's M) switches to
    mixed N:M: offset k means keeping ``target.n - k`` of every M weights."""

    target: LayerSparsity
    step: float
    min_offset: int
    max_offset: int
    param_counts: Mapping[str, int]

    @classmethod
    def unstructured(cls, target: float, param_counts: Mapping[str, int], step: float = 0.05,
                     max_shift: float = 0.25, min_sparsity: float = 0.0, max_sparsity: float = 0.95) -> "LevelSpace":
        t = parse_layer_sparsity(target, "search target")
        if isinstance(t, NM):
            raise SparsityError("use LevelSpace.mixed_nm for an N:M target")
        if not 0 < step < 1:
            raise ConfigError(f"search step must be in (0, 1), got {step}")
        eps = 1e-9
        lo = -min(int(math.floor(max_shift / step + eps)), int(math.floor((t - min_sparsity) / step + eps)))
        hi = min(int(math.floor(max_shift / step + eps)), int(math.floor((max_sparsity - t) / step + eps)))
        if t + hi * step >= 1.0:
            hi -= 1
        return cls(t, step, lo, hi, dict(param_counts))

    @classmethod
    def mixed_nm(cls, target: str | NM, patterns: list[str | NM], param_counts: Mapping[str, int]) -> "LevelSpace":
        t = parse_layer_sparsity(target, "search target")
        if not isinstance(t, NM):
            raise SparsityError(f"mixed N:M search needs an N:M target such as '2:4', got {target!r}")
        pats = sorted({parse_layer_sparsity(p, "pattern") for p in patterns}, key=lambda p: p.n)
        if any(not isinstance(p, NM) or p.m != t.m for p in pats):
            raise SparsityError(f"mixed N:M patterns must all be N:{t.m} like the target {t}, got {[str(p) for p in pats]}")
        ns = [p.n for p in pats]
        if t.n not in ns or ns != list(range(ns[0], ns[-1] + 1)):
            raise SparsityError(f"patterns {[str(p) for p in pats]} must be consecutive N values that include the target {t}")
        # offset k -> n = t.n - k, so more sparsity for larger k as in the unstructured space
        return cls(t, 1.0 / t.m, t.n - ns[-1], t.n - ns[0], dict(param_counts))

    @property
    def offsets(self) -> range:
        return range(self.min_offset, self.max_offset + 1)

    def level(self, k: int) -> LayerSparsity:
        if isinstance(self.target, NM):
            return NM(self.target.n - k, self.target.m)
        return round(self.target + k * self.step, 10)

    def to_map(self, offsets: Offsets) -> SparsityMap:
        return SparsityMap({n: self.level(k) for n, k in offsets.items()}, self.param_counts)

    def residual(self, offsets: Offsets) -> int:
        """sum(count * offset): zero means the global budget holds exactly."""
        return sum(self.param_counts[n] * k for n, k in offsets.items())

    def target_sparsity(self) -> float:
        return self.target.sparsity if isinstance(self.target, NM) else float(self.target)

    def snap(self, sparsities: Mapping[str, float]) -> Offsets:
        """Nearest exact-budget offsets for a continuous allocation."""
        return snap_to_grid(dict(sparsities), self.target_sparsity(), self.step, dict(self.param_counts),
                            self.min_offset, self.max_offset)


def _level_move(child: Offsets, space: LevelSpace, names: list[str], rng: random.Random) -> bool:
    """One budget-preserving move, in place: a pivot layer goes one level up (or down) and a random set
    of other layers whose parameter counts sum *exactly* to the pivot's goes one level the other way.

    The set is one layer of the same size, or several smaller ones (on a LLaMA block an MLP layer's
    level is paid by q, k, v and o together), so sparsity can flow between attention and MLP and not
    only between layers of equal shape. Returns False when this draw found no exact set."""
    counts = space.param_counts
    pivot = rng.choice(names)
    d = rng.choice((1, -1))

    def movable(n: str, step: int) -> bool:
        return space.min_offset <= child[n] + step <= space.max_offset

    if not movable(pivot, d):
        return False
    need, taken = counts[pivot], []
    order = [n for n in names if n != pivot]
    rng.shuffle(order)
    for n in order:  # random greedy subset sum: exact, cheap, and any exact set can be drawn
        if counts[n] <= need and movable(n, -d):
            taken.append(n)
            need -= counts[n]
            if need == 0:
                break
    if need:
        return False
    child[pivot] += d
    for n in taken:
        child[n] -= d
    return True


def mutate(offsets: Offsets, space: LevelSpace, rng: random.Random, moves: int) -> Offsets:
    """``moves`` budget-preserving level moves (see :func:`_level_move`); a move that finds no exact
    compensation is drawn again (up to 20 times)."""
    child = dict(offsets)
    names = list(child)
    for _ in range(moves):
        for _attempt in range(20):
            if _level_move(child, space, names, rng):
                break
    return child


def _has_move(space: LevelSpace) -> bool:
    """True when some pair of layers shares a size or some layer's size is a sum of others'."""
    sizes = sorted(space.param_counts.values())
    if len(sizes) != len(set(sizes)):
        return True
    reachable = {0}  # subset sums of the smaller layers (sizes are distinct here, so few layers)
    for s in sizes:
        if s in reachable:
            return True
        reachable |= {r + s for r in reachable if r + s <= sizes[-1]}
    return False


def crossover(a: Offsets, b: Offsets, space: LevelSpace, blocks_of: dict[str, int], rng: random.Random) -> Offsets:
    """Each decoder block's offsets come from one parent; the budget is then repaired exactly."""
    blocks = sorted(set(blocks_of.values()))
    take_a = {blk: rng.random() < 0.5 for blk in blocks}
    child = {n: (a[n] if take_a[blocks_of[n]] else b[n]) for n in a}
    if space.residual(child) != 0:
        child = space.snap({n: space.target_sparsity() + k * space.step for n, k in child.items()})
    return child


def block_index_map(model: nn.Module, names: list[str]) -> dict[str, int]:
    blocks_name, _ = find_decoder_blocks(model)
    return {n: block_index(n, blocks_name) for n in names}

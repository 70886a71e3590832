"""Evolutionary search of per-layer sparsity (the "EA" of Mixed Sparsity Pruning).

Genotype: one integer *offset* per prunable layer; the layer's sparsity is ``target + offset*step``
(or, for mixed N:M, the pattern ``(target.n - offset):M``). The budget is exact when
``sum(param_count * offset) == 0``, which integer arithmetic keeps exactly:

* mutation moves one layer one level up (down) and layers whose parameter counts sum exactly to its
  count one level down (up): one layer of the same size or several smaller ones;
* crossover takes each block from one of two parents, then repairs the budget with
  :func:`mixsparse.allocation.snap_to_grid`.

Fitness is the KL divergence of the candidate's next-token distribution to the dense model's (or
perplexity) on held-out calibration windows, never the test split. Candidates are assembled from a
:class:`LevelCache` (every layer pruned at every level once, on dense activations) by copying weights, so
no candidate is ever re-pruned. Selection is multi-stage: all offspring are scored on a few windows,
the best few on more windows, and the population keeps the best (elitism). The search state is
checkpointed atomically after every generation (and on Ctrl-C) and resumes to identical results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import snap_to_grid
from .engine import prune_layerwise
from .errors import ConfigError, SparsityError
from .evaluation import DenseReference, iter_logits, mean_kl, nll_sum
from .io import atomic_write_json
from .modeling import find_decoder_blocks, prunable_linears
from .pruners import get_pruner
from .sparsity import NM, LayerSparsity, SparsityMap, parse_layer_sparsity

log = logging.getLogger(__name__)

Offsets = dict[str, int]


# ---------------------------------------------------------------------------------------------
# Level space: which discrete sparsities each layer may take
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Level cache: every layer pruned once at every level
# ---------------------------------------------------------------------------------------------
class LevelCache:
    """Pruned weights of every layer at every level, computed once on dense activations.

    Pruners that only mask (magnitude, Wanda) store a boolean mask per level (1 byte/weight/level) and
    the dense weight once; pruners that reconstruct (SparseGPT) store the weight per level. Memory:
    ``levels * prunable_params * (1 or bytes per weight)``.
    """

    def __init__(self, model: nn.Module, space: LevelSpace):
        self.model = model
        self.space = space
        self.layers = prunable_linears(model)
        self.dense: dict[str, torch.Tensor] = {}
        self.entries: dict[tuple[str, int], torch.Tensor] = {}
        self.masks_only = True
        self.current: dict[str, int | None] = {n: None for n in self.layers}  # None = dense
        self.seconds = 0.0

    @classmethod
    def build(cls, model: nn.Module, space: LevelSpace, calib_ids: torch.Tensor | None, pruner: str,
              pruner_options: dict | None = None, *, device=None, progress: bool = True) -> "LevelCache":
        cache = cls(model, space)
        pcls = get_pruner(pruner)
        cache.masks_only = not getattr(pcls, "reconstructs", False)
        t0 = time.perf_counter()
        bar = tqdm(total=len(cache.layers), desc=f"level cache[{pruner}]", disable=not progress)

        def on_layer(name: str, p) -> None:
            cache.dense[name] = p.layer.weight.data.detach().clone().cpu()
            for k in space.offsets:
                res = p.compute(space.level(k))
                cache.entries[(name, k)] = res.mask.cpu() if cache.masks_only else res.weight.detach().cpu()
            bar.update(1)

        # one-shot on dense activations: every level of a layer sees the same inputs
        prune_layerwise(model, calib_ids, SparsityMap({}), pruner, pruner_options, device=device,
                        sequential=False, on_layer=on_layer, progress=False)
        bar.close()
        cache.seconds = time.perf_counter() - t0
        return cache

    def weight(self, name: str, k: int) -> torch.Tensor:
        entry = self.entries[(name, k)]
        if self.masks_only:
            d = self.dense[name]
            return torch.where(entry, d, torch.zeros((), dtype=d.dtype))
        return entry

    @torch.no_grad()
    def apply(self, offsets: Offsets) -> None:
        """Put the candidate's weights into the model (only layers whose level changed)."""
        for name, k in offsets.items():
            if self.current[name] != k:
                w = self.layers[name].weight
                w.copy_(self.weight(name, k).to(w.device, w.dtype))
                self.current[name] = k

    @torch.no_grad()
    def restore_dense(self) -> None:
        for name, d in self.dense.items():
            w = self.layers[name].weight
            w.copy_(d.to(w.device, w.dtype))
            self.current[name] = None


# ---------------------------------------------------------------------------------------------
# Fitness
# ---------------------------------------------------------------------------------------------
class Fitness:
    """Mean per-window KL(dense || candidate) (or NLL for ``ppl``) on held-out windows; per-window
    results are memoised per candidate so a later stage only evaluates the windows it adds."""

    def __init__(self, cache: LevelCache, windows: torch.Tensor, kind: str = "kl", device=None, group=None):
        """``group``: a ``torch.distributed`` process group whose ranks share the evaluations (see
        :meth:`prefetch`); every rank must run the same search with the same seed."""
        if kind not in ("kl", "ppl"):
            raise ConfigError(f"fitness must be 'kl' or 'ppl', got {kind!r}")
        self.cache, self.windows, self.kind, self.device = cache, windows, kind, device
        self.group = group
        self.local_evaluations = 0  # windows this process forwarded itself (a share of ``evaluations``)
        self.reference: DenseReference | None = None
        if kind == "kl":
            cache.restore_dense()
            self.reference = DenseReference(cache.model, windows, device=device)
        self.memo: dict[tuple, list[float]] = {}
        self.evaluations = 0  # windows forwarded

    @staticmethod
    def key(offsets: Offsets) -> tuple:
        return tuple(offsets.values())

    def _window_score(self, i: int) -> float:
        ids = self.windows[i : i + 1]
        (_, logits), = iter_logits(self.cache.model, ids, device=self.device)
        if self.kind == "ppl":
            s, n = nll_sum(logits, ids)
            return s / n
        s, n = mean_kl(self.reference.logprobs[i], logits)
        return s / n

    def prefetch(self, candidates: list[Offsets], n_windows: int) -> None:
        """Score every (candidate, window) pair the memo lacks. In a process group the pairs are dealt
        out round-robin over the ranks and the scores all-gathered, so every rank ends with the same
        memo and therefore takes the same search path (data-parallel fitness, no extra protocol)."""
        todo, queued = [], set()
        for offsets in candidates:
            key = self.key(offsets)
            if key in queued:
                continue
            queued.add(key)
            todo += [(key, offsets, i) for i in range(len(self.memo.get(key, [])), n_windows)]
        if not todo:
            return
        rank, world = 0, 1
        if self.group is not None:
            import torch.distributed as dist

            rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        mine = {}
        for j in range(rank, len(todo), world):
            _, offsets, i = todo[j]
            self.cache.apply(offsets)
            s = self._window_score(i)
            mine[j] = s if math.isfinite(s) else math.inf
            self.local_evaluations += 1
        if world > 1:
            import torch.distributed as dist

            parts: list = [None] * world
            dist.all_gather_object(parts, mine, group=self.group)
            for p in parts:
                mine.update(p)
        for j, (key, _, i) in enumerate(todo):  # windows of one key are queued in order
            scores = self.memo.setdefault(key, [])
            assert len(scores) == i
            scores.append(mine[j])
        self.evaluations += len(todo)

    def __call__(self, offsets: Offsets, n_windows: int) -> float:
        # the memo is filled by prefetch alone (in a process group every rank makes the same calls)
        self.prefetch([offsets], n_windows)
        vals = self.memo[self.key(offsets)][:n_windows]
        return sum(vals) / len(vals)


# ---------------------------------------------------------------------------------------------
# The evolutionary algorithm
# ---------------------------------------------------------------------------------------------
@dataclass
class SearchConfig:
    """Knobs of the search; every field is a YAML key of the ``search`` section."""

    generations: int = 30  # upper bound; ~22 s each on the embedded model on 2 CPU cores (8 children: 17 windows of 512 tokens)
    population: int = 4  # parents kept (elitism: the best always survive)
    offspring: int = 8  # children per generation
    stages: list = field(default_factory=lambda: [[1, 3], [4, 1]])  # [[windows, survivors], ...]
    max_mutations: int = 3  # level moves per child: 1..max_mutations
    crossover_rate: float = 0.5  # share of children made by crossover of two parents before mutation
    init_perturbations: int = 4  # level moves applied to the sensitivity allocation for other initial parents
    patience: int = 15  # stop after this many generations without improvement
    seed: int = 0

    def __post_init__(self) -> None:
        if self.generations < 0 or self.population < 1 or self.offspring < 1:
            raise ConfigError("search: generations >= 0, population >= 1 and offspring >= 1 are required")
        stages = [list(s) for s in self.stages]
        if not stages or any(len(s) != 2 or s[0] < 1 or s[1] < 1 for s in stages):
            raise ConfigError(f"search.stages must be a list of [windows, survivors] pairs >= 1, got {self.stages!r}")
        if any(b[0] < a[0] for a, b in zip(stages, stages[1:])):
            raise ConfigError("search.stages: windows must not decrease from one stage to the next")
        self.stages = stages
        if not 0 <= self.crossover_rate <= 1:
            raise ConfigError(f"search.crossover_rate must be in [0, 1], got {self.crossover_rate}")

    @property
    def final_windows(self) -> int:
        return self.stages[-1][0]


@dataclass
class SearchResult:
    offsets: Offsets
    sparsity_map: SparsityMap
    fitness: float
    history: list[dict]
    evaluations: int
    seconds: float
    generations: int


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


def _config_fingerprint(space: LevelSpace, config: SearchConfig, init: list[Offsets], extra: dict) -> str:
    payload = {
        "space": [str(space.target), space.step, space.min_offset, space.max_offset, sorted(space.param_counts.items())],
        # stopping criteria are left out: raising them continues the same trajectory (extends a search)
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("generations", "patience")},
        "init": [sorted(o.items()) for o in init],
        "extra": extra,
        "operators": 2,  # bumped when mutation/crossover change: an old checkpoint must not resume
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evolutionary_search(
    fitness: Fitness | Callable[[Offsets, int], float],
    space: LevelSpace,
    init: list[Offsets],
    config: SearchConfig,
    *,
    blocks_of: dict[str, int] | None = None,
    checkpoint: str | Path | None = None,
    write_checkpoint: bool = True,
    fingerprint_extra: dict | None = None,
    progress: bool = True,
    on_generation: Callable[[int, dict], None] | None = None,
) -> SearchResult:
    """Run the EA from ``init`` (first entry: the sensitivity-derived allocation). Resumes from
    ``checkpoint`` when it exists and was written by the same settings. In a process group every rank
    reads the checkpoint but only one writes it (``write_checkpoint``)."""
    names = list(space.param_counts)
    for o in init:
        if set(o) != set(names):
            raise ConfigError("initial allocation does not cover exactly the prunable layers")
        if space.residual(o) != 0:
            raise SparsityError("initial allocation breaks the global budget")
    if not _has_move(space):
        raise SparsityError("no budget-preserving move exists: no prunable layer's size equals another's or a sum of others'")
    blocks_of = blocks_of or {n: i for i, n in enumerate(names)}
    fp = _config_fingerprint(space, config, init, fingerprint_extra or {})
    ckpt = Path(checkpoint) if checkpoint else None
    rng = random.Random(config.seed)
    t_start = time.perf_counter()
    elapsed_before = 0.0
    final_w = config.final_windows

    state = _load_checkpoint(ckpt, fp) if ckpt else None
    if state is not None:
        population = state["population"]
        rng.setstate(_tuplify(state["rng"]))
        history, gen0, best_streak = state["history"], state["generation"], state["since_improved"]
        elapsed_before = state["seconds"]
        if isinstance(fitness, Fitness):
            fitness.memo.update({tuple(k): v for k, v in state["memo"]})
            fitness.evaluations = state["evaluations"]
        log.info("resumed search at generation %d from %s", gen0, ckpt)
    else:
        population = [dict(init[0])]
        seen = {Fitness.key(population[0])}
        for o in init[1:]:
            if Fitness.key(o) not in seen and len(population) < config.population:
                population.append(dict(o))
                seen.add(Fitness.key(o))
        tries = 0
        while len(population) < config.population and tries < 50 * config.population:
            tries += 1
            cand = mutate(init[0], space, rng, config.init_perturbations)
            if Fitness.key(cand) not in seen:
                population.append(cand)
                seen.add(Fitness.key(cand))
        history, gen0, best_streak = [], 0, 0

    def score(o: Offsets) -> float:
        return fitness(o, final_w)

    def prefetch(cands: list[Offsets], windows: int) -> None:
        if hasattr(fitness, "prefetch"):  # batch of evaluations: shared out over ranks in a process group
            fitness.prefetch(cands, windows)

    prefetch(population, final_w)
    population.sort(key=score)
    best = score(population[0])
    if not history:
        history.append(_record(0, fitness, best, time.perf_counter() - t_start + elapsed_before))

    bar = tqdm(total=config.generations, initial=gen0, desc="search", disable=not progress)
    bar.set_postfix(best=f"{best:.4g}")
    gen = gen0
    try:
        while gen < config.generations and best_streak < config.patience:
            children: list[Offsets] = []
            keys = {Fitness.key(p) for p in population}
            attempts = 0
            while len(children) < config.offspring and attempts < 50 * config.offspring:
                attempts += 1
                if len(population) > 1 and rng.random() < config.crossover_rate:
                    pa, pb = rng.sample(population, 2)
                    child = crossover(pa, pb, space, blocks_of, rng)
                else:
                    child = dict(rng.choice(population))
                child = mutate(child, space, rng, rng.randint(1, config.max_mutations))
                if Fitness.key(child) not in keys:
                    keys.add(Fitness.key(child))
                    children.append(child)
            survivors = children
            for windows, keep in config.stages:
                prefetch(survivors, windows)
                survivors = sorted(survivors, key=lambda c, w=windows: fitness(c, w))[:keep]
            prefetch(population + survivors, final_w)
            population = sorted(population + survivors, key=score)[: config.population]
            gen += 1
            new_best = score(population[0])
            best_streak = 0 if new_best < best else best_streak + 1
            best = min(best, new_best)
            rec = _record(gen, fitness, best, time.perf_counter() - t_start + elapsed_before)
            history.append(rec)
            if on_generation is not None:
                on_generation(gen, rec)
            if ckpt and write_checkpoint:
                _save_checkpoint(ckpt, fp, population, rng, history, gen, best_streak, rec["seconds"], fitness)
            bar.update(1)
            bar.set_postfix(best=f"{best:.4g}")
    except KeyboardInterrupt:
        if ckpt and write_checkpoint:
            log.warning("search interrupted: state of generation %d kept in %s (run again to resume)", gen, ckpt)
        raise
    finally:
        bar.close()
    return SearchResult(population[0], space.to_map(population[0]), best, history,
                        getattr(fitness, "evaluations", 0), time.perf_counter() - t_start + elapsed_before, gen)


def _record(gen: int, fitness, best: float, seconds: float) -> dict:
    return {"generation": gen, "evaluations": getattr(fitness, "evaluations", 0), "best_fitness": best,
            "seconds": round(seconds, 3)}


def _tuplify(x):
    return tuple(_tuplify(i) for i in x) if isinstance(x, list) else x


def _save_checkpoint(path: Path, fp: str, population, rng, history, gen, streak, seconds, fitness) -> None:
    memo = [[list(k), v] for k, v in fitness.memo.items()] if isinstance(fitness, Fitness) else []
    atomic_write_json(path, {
        "fingerprint": fp, "generation": gen, "population": population, "rng": rng.getstate(),
        "history": history, "since_improved": streak, "seconds": seconds, "memo": memo,
        "evaluations": getattr(fitness, "evaluations", 0),
    })


def _load_checkpoint(path: Path, fp: str) -> dict | None:
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"search checkpoint {path} is unreadable ({e}); delete it to start over") from None
    if state.get("fingerprint") != fp:
        raise ConfigError(
            f"search checkpoint {path} was written with different settings; delete it or choose another run directory"
        )
    return state


def block_index_map(model: nn.Module, names: list[str]) -> dict[str, int]:
    blocks_name, _ = find_decoder_blocks(model)
    return {n: int(n[len(blocks_name) + 1 :].split(".", 1)[0]) for n in names}

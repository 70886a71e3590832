"""The evolutionary algorithm of Mixed Sparsity Pruning over a :class:`~mixsparse.search.space.LevelSpace`.

Population seeded from the sensitivity allocation (plus perturbations of it, plus uniform); each
generation makes children by block-wise crossover and budget-exact mutation, selects them in stages
(all children on few windows, the best few on more), and keeps the best (elitism). The whole state
of a search is one :class:`SearchState`, checkpointed atomically after every generation; Ctrl-C or a
crash loses at most the generation in progress, and the search resumes from the last checkpoint to
identical results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import ConfigError, SparsityError
from ..io import atomic_write_json, fingerprint
from ..sparsity import SparsityMap
from .options import SearchConfig
from .space import LevelSpace, Offsets, _has_move, crossover, mutate, offsets_key

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    offsets: Offsets
    sparsity_map: SparsityMap
    fitness: float
    history: list[dict]
    evaluations: int
    seconds: float
    generations: int
    stopped_by: str = "generations"  # generations, patience or time_budget


def _tuplify(x):
    return tuple(_tuplify(i) for i in x) if isinstance(x, list) else x


@dataclass
class SearchState:
    """Everything a search needs to continue: population, random state, history, memoised scores."""

    fingerprint: str
    population: list[Offsets]
    rng: random.Random
    history: list[dict] = field(default_factory=list)
    generation: int = 0
    since_improved: int = 0
    seconds: float = 0.0

    def state_dict(self, fitness=None) -> dict:
        memo = [[list(map(list, k)), v] for k, v in getattr(fitness, "memo", {}).items()]
        return {"fingerprint": self.fingerprint, "generation": self.generation, "population": self.population,
                "rng": self.rng.getstate(), "history": self.history, "since_improved": self.since_improved,
                "seconds": self.seconds, "memo": memo, "evaluations": getattr(fitness, "evaluations", 0)}

    def load_state_dict(self, d: dict, fitness=None) -> None:
        if d.get("fingerprint") != self.fingerprint:
            raise ConfigError("search state was written with different settings")
        self.population = [dict(p) for p in d["population"]]
        self.rng.setstate(_tuplify(d["rng"]))
        self.history, self.generation = d["history"], d["generation"]
        self.since_improved, self.seconds = d["since_improved"], d["seconds"]
        if fitness is not None and hasattr(fitness, "memo"):
            # scores come back as floats; an infinite one was written as the string "inf"
            fitness.memo.update({tuple(tuple(p) for p in k): [math.inf if x is None else float(x) for x in v]
                                 for k, v in d["memo"]})
            fitness.evaluations = d["evaluations"]

    def save(self, path: Path, fitness=None) -> None:
        atomic_write_json(path, self.state_dict(fitness))

    def load(self, path: Path, fitness=None) -> bool:
        """Resume from ``path`` if it exists; a state of other settings is an error that says what to do."""
        if not path.exists():
            return False
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"search checkpoint {path} is unreadable ({e}); delete it to start over") from None
        if d.get("fingerprint") != self.fingerprint:
            raise ConfigError(
                f"search checkpoint {path} was written with different settings; delete it or choose another run directory")
        self.load_state_dict(d, fitness)
        return True


def _config_fingerprint(space: LevelSpace, config: SearchConfig, init: list[Offsets], extra: dict) -> str:
    payload = {
        "space": [str(space.target), space.step, space.min_offset, space.max_offset, sorted(space.param_counts.items())],
        # stopping criteria are left out: raising them continues the same trajectory (extends a search)
        "config": {k: v for k, v in dataclasses.asdict(config).items()
                   if k not in ("generations", "patience", "time_budget")},
        "init": [sorted(o.items()) for o in init],
        "extra": extra,
        "operators": 3,  # bumped when operators or memo keys change: an old checkpoint must not resume
    }
    return fingerprint(payload)


def _initial_population(space: LevelSpace, init: list[Offsets], config: SearchConfig, rng: random.Random) -> list[Offsets]:
    population = [dict(init[0])]
    seen = {offsets_key(population[0])}
    for o in init[1:]:
        if offsets_key(o) not in seen and len(population) < config.population:
            population.append(dict(o))
            seen.add(offsets_key(o))
    tries = 0
    while len(population) < config.population and tries < 50 * config.population:
        tries += 1
        cand = mutate(init[0], space, rng, config.init_perturbations)
        if offsets_key(cand) not in seen:
            population.append(cand)
            seen.add(offsets_key(cand))
    return population


def _children(population: list[Offsets], space: LevelSpace, blocks_of: dict[str, int], config: SearchConfig,
              rng: random.Random) -> list[Offsets]:
    children: list[Offsets] = []
    keys = {offsets_key(p) for p in population}
    attempts = 0
    while len(children) < config.offspring and attempts < 50 * config.offspring:
        attempts += 1
        if len(population) > 1 and rng.random() < config.crossover_rate:
            pa, pb = rng.sample(population, 2)
            child = crossover(pa, pb, space, blocks_of, rng)
        else:
            child = dict(rng.choice(population))
        child = mutate(child, space, rng, rng.randint(1, config.max_mutations))
        if offsets_key(child) not in keys:
            keys.add(offsets_key(child))
            children.append(child)
    return children


def evolutionary_search(
    fitness: Callable[[Offsets, int], float],
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
    reads the checkpoint but only one writes it (``write_checkpoint``). ``fitness(offsets, windows)``
    is a :class:`~mixsparse.search.fitness.Fitness` or any callable; ``prefetch`` and ``retain`` are used
    when it has them."""
    names = list(space.param_counts)
    for o in init:
        if set(o) != set(names):
            raise ConfigError("initial allocation does not cover exactly the prunable layers")
        if space.residual(o) != 0:
            raise SparsityError("initial allocation breaks the global budget")
    if not _has_move(space):
        raise SparsityError("no budget-preserving move exists: no prunable layer's size equals another's or a sum of others'")
    if config.time_budget is not None and getattr(fitness, "group", None) is not None:
        raise ConfigError("search.time_budget with several processes would let each rank stop at another generation; "
                          "set search.generations instead (a fixed count every rank reaches)")
    blocks_of = blocks_of or {n: i for i, n in enumerate(names)}
    ckpt = Path(checkpoint) if checkpoint else None
    t_start = time.perf_counter()
    final_w = config.final_windows
    state = SearchState(_config_fingerprint(space, config, init, fingerprint_extra or {}), [], random.Random(config.seed))
    if ckpt is not None and state.load(ckpt, fitness):
        log.info("resumed search at generation %d from %s", state.generation, ckpt)
    else:
        state.population = _initial_population(space, init, config, state.rng)
    elapsed_before = state.seconds

    def score(o: Offsets) -> float:
        return fitness(o, final_w)

    def prefetch(cands: list[Offsets], windows: int, **tokens) -> None:
        if hasattr(fitness, "prefetch"):  # batch of evaluations: shared out over ranks in a process group
            fitness.prefetch(cands, windows, **tokens)

    prefetch(state.population, final_w)
    state.population.sort(key=score)
    best = score(state.population[0])
    if not state.history:
        state.history.append(_record(0, fitness, best, time.perf_counter() - t_start + elapsed_before))

    bar = tqdm(total=config.generations, initial=state.generation, desc="search", disable=not progress)
    bar.set_postfix(best=f"{best:.4g}")
    def stop_reason() -> str | None:
        if state.generation >= config.generations:
            return "generations"
        if state.since_improved >= config.patience:
            return "patience"
        if config.time_budget is not None:
            spent = time.perf_counter() - t_start + elapsed_before
            done = state.generation
            # the mean generation so far predicts the next one (scoring the initial population counts as spent)
            per_gen = (state.history[-1]["seconds"] - state.history[0]["seconds"]) / done if done else 0.0
            if spent + per_gen > config.time_budget:
                return "time_budget"
        return None

    stopped_by = None
    try:
        while (stopped_by := stop_reason()) is None:
            survivors = _children(state.population, space, blocks_of, config, state.rng)
            for windows, keep, *tokens in config.stages:
                if tokens:  # a cheap stage: only the first tokens of each window
                    prefetch(survivors, windows, tokens=tokens[0])
                    survivors = sorted(survivors, key=lambda c, w=windows, t=tokens[0]: fitness(c, w, tokens=t))[:keep]
                    continue
                prefetch(survivors, windows)
                survivors = sorted(survivors, key=lambda c, w=windows: fitness(c, w))[:keep]
            prefetch(state.population + survivors, final_w)
            state.population = sorted(state.population + survivors, key=score)[: config.population]
            if hasattr(fitness, "retain"):
                fitness.retain(state.population)
            state.generation += 1
            new_best = score(state.population[0])
            state.since_improved = 0 if new_best < best else state.since_improved + 1
            best = min(best, new_best)
            rec = _record(state.generation, fitness, best, time.perf_counter() - t_start + elapsed_before)
            state.history.append(rec)
            state.seconds = rec["seconds"]
            if on_generation is not None:
                on_generation(state.generation, rec)
            if ckpt and write_checkpoint:
                state.save(ckpt, fitness)
            bar.update(1)
            bar.set_postfix(best=f"{best:.4g}")
    except KeyboardInterrupt:
        if ckpt and write_checkpoint:
            log.warning("search interrupted: state of generation %d kept in %s (run again to resume)",
                        state.generation, ckpt)
        raise
    finally:
        bar.close()
    top = state.population[0]
    if stopped_by == "time_budget":
        log.info("search stopped by its time budget (%.0f s) after %d generations", config.time_budget,
                 state.generation)
    return SearchResult(top, space.to_map(top), best, state.history, getattr(fitness, "evaluations", 0),
                        time.perf_counter() - t_start + elapsed_before, state.generation, stopped_by or "generations")


def _record(gen: int, fitness, best: float, seconds: float) -> dict:
    return {"generation": gen, "evaluations": getattr(fitness, "evaluations", 0), "best_fitness": best,
            "seconds": round(seconds, 3)}

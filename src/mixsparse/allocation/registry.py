"""The contract every allocation method follows, and the registry of methods by name.

An allocation method decides "how much per layer": from a model (and, if it wants, calibration data,
sensitivity scores, a search) it returns an :class:`Allocation` whose map spends the run's budget. It
is one class, registered with :func:`register_allocation`, whose nested ``Options`` dataclass is its
YAML section ``allocation.<name>`` (keys = field names, unknown keys refused). The pipeline, the config
and the CLI know methods only through this registry, as the engine knows pruners only through theirs.

This module imports no torch: the typed config reads the registry to validate a run before any model
is loaded. Methods import torch (and the sensitivity and search stages) inside :meth:`allocate`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ConfigError
from ..registry import Registry
from ..sparsity import SparsityMap


@dataclass
class Allocation:
    """What an allocation method decided: the map, and what the report shows about how."""

    method: str
    sparsity_map: SparsityMap
    sensitivity: dict[str, float] | None = None  # per-layer score the map was derived from
    sensitivity_kind: str | None = None  # "fisher", "hessian", "owl", ...
    search: dict | None = None  # the search's summary (history, fitness, timings) when one ran
    stitched: bool = False  # the searched candidate is already written into the model (search.final == "stitched")
    quantized: dict | None = None  # layer -> QuantizedWeight when the method also quantized (allocation joint)


@dataclass
class Bounds:
    """Per-layer sparsity bounds shared by the score-based methods."""

    min_sparsity: float = 0.0
    max_sparsity: float = 0.95

    def __post_init__(self) -> None:
        if not 0 <= self.min_sparsity < self.max_sparsity < 1:
            raise ConfigError(f"need 0 <= min_sparsity < max_sparsity < 1, got {self.min_sparsity} and {self.max_sparsity}")


@dataclass
class AllocationContext:
    """Everything a method may use, handed over by the pipeline (methods never build these themselves).

    ``calib`` draws calibration windows (``calib.ids(n, seqlen)``, ``calib.prefix``); ``device`` is the
    run's :class:`~mixsparse.placement.Placement`; ``cache_dir`` keeps sensitivity scores between runs;
    ``stage(name)`` times a part of the work in the run record."""

    model: Any
    tokenizer: Any
    cfg: Any  # the RunConfig
    target: Any  # float or NM: the run's global target
    counts: dict[str, int]  # prunable layer -> parameters, in forward order
    blocks_name: str
    device: Any
    calib: Any
    cache_dir: Path | None = None
    run_dir: Path | None = None
    progress: bool = True
    workers: Any = None  # mixsparse.distributed workers sharing a search, or None
    timer: Callable[[str], Any] | None = None

    def stage(self, name: str):
        return self.timer(name) if self.timer is not None else nullcontext()

    def cached_scores(self, kind: str, settings: dict, compute: Callable[[], dict]) -> dict[str, float]:
        """``compute()``'s per-layer scores, kept in ``cache_dir`` under the model, data and ``settings``."""
        if self.cache_dir is None:
            return compute()
        from ..sensitivity import cached_scores, model_fingerprint

        data = self.cfg.data
        key = {"model": model_fingerprint(self.model), "calibration": data.calibration, "seed": data.seed, **settings}
        return cached_scores(kind, key, compute, self.cache_dir)


class AllocationMethod:
    """Base class: set ``Options`` (a dataclass; its fields are ``allocation.<name>.*``) and implement
    :meth:`allocate`. ``assigns_patterns``: the method can allocate with an N:M target (mixed patterns or
    one pattern everywhere); the others assign unstructured sparsities only."""

    name: ClassVar[str] = ""
    assigns_patterns: ClassVar[bool] = False
    #: the method reads held-out validation text (a search's fitness), checked before any work
    needs_validation: ClassVar[bool] = False

    @dataclass
    class Options:
        pass

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    def check(self, cfg: Any, counts: dict[str, int] | None = None) -> None:
        """Checks of ``cfg`` run before any expensive work: without ``counts`` before the model is loaded,
        with them (prunable layer -> parameters) right after, before the dense evaluation."""

    def allocate(self, ctx: AllocationContext) -> Allocation:
        raise NotImplementedError


_METHODS: Registry[type[AllocationMethod]] = Registry("allocation")
#: class decorator: ``@register_allocation("name")`` makes a method available as ``--allocation name``,
#: ``prune.allocation: name``, with its options under ``allocation.name``
register_allocation = _METHODS.register
unregister_allocation = _METHODS.unregister  # tests that register a method clean up with this
get_allocation = _METHODS.get
available_allocations = _METHODS.names

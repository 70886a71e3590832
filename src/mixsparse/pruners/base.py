"""The one contract every base pruner follows, and the registry of pruners by name.

A pruner instance belongs to one linear layer. The engine feeds it the layer's inputs
(:meth:`LayerPruner.add_batch`), then asks for the pruned weight at a target
(:meth:`LayerPruner.compute`). ``compute`` never modifies the layer, so the same statistics can
serve several targets (the search caches every sparsity level of every layer this way).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError, NumericalError
from ..masks import mask_from_ranks, nm_mask_from_ranks, nm_ranks, score_ranks
from ..registry import Registry
from ..sparsity import NM, LayerSparsity


@dataclass
class PruneResult:
    weight: torch.Tensor  # new weight, same shape/dtype/device as the layer's, zeros where pruned
    mask: torch.Tensor  # bool keep-mask
    quantized: object = None  # a mixsparse.quant.grid.QuantizedWeight when the pruner also quantized


class LayerPruner:
    """Base class. Subclasses set ``name``, an ``Options`` dataclass and implement ``compute``."""

    name: ClassVar[str] = ""
    #: whether the pruner needs calibration inputs at all (magnitude does not)
    needs_inputs: ClassVar[bool] = True
    #: whether ``compute`` changes kept weights (SparseGPT) or only masks them (magnitude, Wanda)
    reconstructs: ClassVar[bool] = False

    @dataclass
    class Options:
        pass

    def __init__(self, layer: nn.Linear, options: "LayerPruner.Options | None" = None, layer_name: str = "",
                 min_tokens: int = 0):
        self.layer = layer
        self.layer_name = layer_name or type(layer).__name__
        self.options = options if options is not None else self.Options()
        self.nsamples = 0  # number of input rows (tokens) seen
        self.min_tokens = min_tokens  # fewer calibration tokens than this: :meth:`fallback` instead of :meth:`compute`

    @classmethod
    def make_options(cls, values: dict | None) -> "LayerPruner.Options":
        """Typed options from a plain dict; unknown keys are refused by name."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"pruner {cls.name!r} has no option(s) {', '.join(unknown)}; known: {', '.join(sorted(known)) or 'none'}"
            )
        return cls.Options(**values)

    @classmethod
    def factory(cls, values: dict | None = None, min_tokens: int = 0) -> "Callable[[str, nn.Linear], LayerPruner]":
        """``make(name, linear)`` for the engine's calibrate step: one pruner per layer, options checked once."""
        options = cls.make_options(values)
        return lambda name, layer: cls(layer, options, layer_name=name, min_tokens=min_tokens)

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight.data

    @property
    def storage_dtype(self) -> torch.dtype:
        """The weight's dtype at home (it may be an upcast float32 copy while its block is placed)."""
        from ..experts import weight_owner
        from ..placement import home_dtype

        return home_dtype(weight_owner(self.layer))

    def add_batch(self, inp: torch.Tensor) -> None:
        """Accumulate statistics from a batch of layer inputs of shape (..., in_features)."""
        x = inp.detach().reshape(-1, inp.shape[-1])
        if not torch.isfinite(x).all():
            raise NumericalError(
                f"layer {self.layer_name!r}: NaN/Inf in its calibration inputs; the model produces "
                "non-finite activations on this data (check the dtype: fp16 overflows are common)"
            )
        self._accumulate(x.float())
        self.nsamples += x.shape[0]

    def _accumulate(self, x: torch.Tensor) -> None:  # x: (tokens, in_features) float32
        pass

    def compute(self, target: LayerSparsity) -> PruneResult:
        raise NotImplementedError

    @property
    def starved(self) -> bool:
        """Whether the layer saw too few calibration tokens for its statistics: an expert the router rarely
        (or never) picked on the calibration data. Its Hessian or input norms would rest on a handful of tokens."""
        return self.needs_inputs and self.nsamples < self.min_tokens

    def prune(self, target: LayerSparsity) -> PruneResult:
        """What the engine and the level database ask for: :meth:`compute`, or :meth:`fallback` when starved."""
        return self.fallback(target) if self.starved else self.compute(target)

    def fallback(self, target: LayerSparsity) -> PruneResult:
        """Pruning without input statistics, for a starved layer: the largest magnitudes kept in each output
        row (each N:M group). A pruner that also quantizes overrides it to quantize the kept weights."""
        return magnitude_result(self.weight, target)

    def changes_unpruned(self) -> bool:
        """Whether ``compute`` changes a layer even at sparsity 0 (a pruner that also quantizes): the engine
        then runs it on every layer of the map, not only on those it prunes."""
        return False

    def free(self) -> None:
        """Drop accumulated statistics (called by the engine once the layer is pruned)."""


class ScorePruner(LayerPruner):
    """A pruner that only masks: keep the highest ``scores()`` per comparison group (or N:M group).

    Ranks are computed once per layer and reused for every target, so asking the same statistics for
    many sparsity levels (the search's level cache) costs one sort, not one per level.
    """

    @dataclass
    class Options:
        group: str = "row"

    def scores(self) -> torch.Tensor:
        raise NotImplementedError

    def _ranks(self, kind: str | int) -> torch.Tensor:
        cache = self.__dict__.setdefault("_rank_cache", {})
        if kind not in cache:
            s = self.scores()
            cache[kind] = nm_ranks(s, kind) if isinstance(kind, int) else score_ranks(s, kind)
        return cache[kind]

    def compute(self, target: LayerSparsity) -> PruneResult:
        if isinstance(target, NM):
            mask = nm_mask_from_ranks(self._ranks(target.m), target)
        elif target == 0.0:
            mask = torch.ones_like(self.weight, dtype=torch.bool)
        else:
            mask = mask_from_ranks(self._ranks(self.options.group), target, self.options.group)
        return PruneResult(apply_mask(self.weight, mask), mask)

    def free(self) -> None:
        self.__dict__.pop("_rank_cache", None)


_PRUNERS: Registry[type[LayerPruner]] = Registry("pruner")
#: class decorator: ``@register_pruner("name")`` makes a pruner available as ``--pruner name``
register_pruner = _PRUNERS.register
get_pruner = _PRUNERS.get


def available_pruners() -> list[str]:
    return sorted(_PRUNERS.names())


def magnitude_result(weight: torch.Tensor, target: LayerSparsity) -> PruneResult:
    """Keep the largest |W| of each row (of each N:M group): pruning that needs no data."""
    scores = weight.float().abs()
    if isinstance(target, NM):
        mask = nm_mask_from_ranks(nm_ranks(scores, target.m), target)
    elif target == 0.0:
        mask = torch.ones_like(weight, dtype=torch.bool)
    else:
        mask = mask_from_ranks(score_ranks(scores, "row"), target, "row")
    return PruneResult(apply_mask(weight, mask), mask)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

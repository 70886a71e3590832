"""Per-layer sparsity: the one object passed from allocation to the pruning engine.

A layer's target is either a float sparsity in [0, 1) (unstructured) or an :class:`NM` pattern
("N:M" = keep N non-zeros in every group of M consecutive input weights, so 2:4 is 50% sparse and
1:4 is 75% sparse). A :class:`SparsityMap` is a validated ``dict[str, float | NM]`` keyed by the
qualified names of prunable linear layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Union

from .errors import SparsityError, UnknownNameError


@dataclass(frozen=True, order=True)
class NM:
    """Semi-structured pattern: keep ``n`` of every ``m`` consecutive weights along the input dim."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)):
            raise SparsityError(f"N:M pattern needs integers, got {self.n!r}:{self.m!r}")
        if not (0 < self.n < self.m):
            raise SparsityError(f"N:M pattern {self.n}:{self.m} needs 0 < N < M")

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @classmethod
    def parse(cls, text: str) -> "NM":
        parts = str(text).strip().split(":")
        if len(parts) != 2:
            raise SparsityError(f"N:M pattern must look like '2:4', got {text!r}")
        try:
            n, m = int(parts[0]), int(parts[1])
        except ValueError:
            raise SparsityError(f"N:M pattern must look like '2:4', got {text!r}") from None
        return cls(n, m)


LayerSparsity = Union[float, NM]


def parse_layer_sparsity(value: object, where: str = "sparsity") -> LayerSparsity:
    """Turn a float, a numeric string or an 'N:M' string into a validated layer target."""
    if isinstance(value, NM):
        return value
    if isinstance(value, str) and ":" in value:
        return NM.parse(value)
    return fraction(value, f"{where}: sparsity", hint=" or 'N:M'")


def fraction(value: object, what: str, error: type[Exception] = SparsityError, hint: str = "") -> float:
    """``value`` as a float in [0, 1) (a sparsity, a spread), else ``error`` naming ``what``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise error(f"{what} must be a number in [0, 1){hint}, got {value!r}") from None
    if not math.isfinite(v) or not 0.0 <= v < 1.0:
        raise error(f"{what} must be in [0, 1), got {value!r}")
    return v


def sparsity_of(target: LayerSparsity) -> float:
    return target.sparsity if isinstance(target, NM) else float(target)


def format_layer_sparsity(target: LayerSparsity) -> float | str:
    """YAML/JSON form: floats stay floats, patterns become 'N:M' strings."""
    return str(target) if isinstance(target, NM) else float(target)


class SparsityMap(Mapping[str, LayerSparsity]):
    """Validated mapping ``layer name -> float sparsity | NM``.

    ``param_counts`` (layer name -> number of weights) is needed for the parameter-weighted average,
    which is what a global sparsity budget means.
    """

    def __init__(self, targets: Mapping[str, object], param_counts: Mapping[str, int] | None = None):
        self._targets: dict[str, LayerSparsity] = {
            str(k): parse_layer_sparsity(v, where=f"layer {k!r}") for k, v in targets.items()
        }
        self.param_counts = dict(param_counts) if param_counts is not None else None
        if self.param_counts is not None:
            unknown = sorted(set(self._targets) - set(self.param_counts))
            if unknown:
                raise UnknownNameError(
                    f"unknown layer name(s) in sparsity map: {', '.join(unknown[:5])}"
                    + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
                    + f"; prunable layers look like {next(iter(self.param_counts), '?')!r}"
                )

    # Mapping protocol
    def __getitem__(self, key: str) -> LayerSparsity:
        return self._targets[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    def __repr__(self) -> str:
        return f"SparsityMap({len(self)} layers, average={self.average():.4f})"

    @classmethod
    def uniform(cls, target: object, param_counts: Mapping[str, int]) -> "SparsityMap":
        t = parse_layer_sparsity(target)
        return cls({name: t for name in param_counts}, param_counts)

    def sparsities(self) -> dict[str, float]:
        return {k: sparsity_of(v) for k, v in self._targets.items()}

    def average(self, param_counts: Mapping[str, int] | None = None) -> float:
        """Parameter-weighted average sparsity (plain mean if no counts are known)."""
        return weighted_average(self.sparsities(), param_counts if param_counts is not None else self.param_counts)

    def to_dict(self) -> dict[str, float | str]:
        return {k: format_layer_sparsity(v) for k, v in self._targets.items()}

    def check_divisible(self, in_features: Mapping[str, int]) -> None:
        """N:M groups run along the input dimension; M must divide it."""
        for name, t in self._targets.items():
            if isinstance(t, NM) and in_features[name] % t.m:
                raise SparsityError(
                    f"layer {name!r}: N:M pattern {t} needs M={t.m} to divide the input "
                    f"dimension {in_features[name]}"
                )


def weighted_average(values: Mapping[str, float], param_counts: Mapping[str, int] | None) -> float:
    """Parameter-weighted average of per-layer sparsities (plain mean without counts; 0 when empty): the
    one definition of a model's overall sparsity, requested or measured."""
    if not values:
        return 0.0
    if param_counts is None:
        return math.fsum(float(v) for v in values.values()) / len(values)
    total = sum(int(param_counts[n]) for n in values)
    return math.fsum(float(v) * int(param_counts[n]) for n, v in values.items()) / total

"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScorePruner, register_pruner


def column_sq_sums(x: torch.Tensor) -> torch.Tensor:
    """Per input feature, the float64 sum of squares of ``x`` (tokens, in_features): ``||X_j||^2``."""
    # float64: exact enough over millions of tokens, and only an (in_features,) buffer
    return (x.double() ** 2).sum(0)


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's importance ``|W_ij| * ||X_j||_2`` (also OWL's outlier statistic)."""
    return weight.float().abs() * sq_norm.sqrt().float().unsqueeze(0)


@register_pruner("wanda")
class WandaPruner(ScorePruner):
    @dataclass
    class Options:
        group: str = "row"  # per-output comparison group, as in the paper

    def __init__(self, layer, options=None, layer_name=""):
        super().__init__(layer, options, layer_name)
        self.sq_norm = torch.zeros(layer.in_features, dtype=torch.float64, device=layer.weight.device)

    def _accumulate(self, x: torch.Tensor) -> None:
        self.sq_norm += column_sq_sums(x)
        self.free()  # new statistics invalidate cached ranks

    def scores(self) -> torch.Tensor:
        return wanda_scores(self.weight, self.sq_norm)

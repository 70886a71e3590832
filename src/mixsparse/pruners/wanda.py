"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScorePruner, register_pruner


@register_pruner("wanda")
class WandaPruner(ScorePruner):
    @dataclass
    class Options:
        group: str = "row"  # per-output comparison group, as in the paper

    def __init__(self, layer, options=None, layer_name="", min_tokens=0):
        super().__init__(layer, options, layer_name, min_tokens)
        self.sq_norm = torch.zeros(layer.in_features, dtype=torch.float64, device=layer.weight.device)

    def _accumulate(self, x: torch.Tensor) -> None:
        # float64 sum of squares: exact enough over millions of tokens, tiny (in_features,) buffer
        self.sq_norm += (x.double() ** 2).sum(0)
        self.free()  # new statistics invalidate cached ranks

    def scores(self) -> torch.Tensor:
        return self.weight.float().abs() * self.sq_norm.sqrt().float().unsqueeze(0)

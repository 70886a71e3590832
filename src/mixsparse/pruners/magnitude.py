"""Magnitude pruning: remove the smallest |W|. Needs no calibration data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import nm_mask, unstructured_mask
from ..sparsity import NM, LayerSparsity
from .base import LayerPruner, PruneResult, apply_mask, register_pruner


@register_pruner("magnitude")
class MagnitudePruner(LayerPruner):
    needs_inputs = False

    @dataclass
    class Options:
        # Wanda's magnitude baseline compares weights across the whole layer.
        group: str = "layer"

    def scores(self) -> torch.Tensor:
        return self.weight.float().abs()

    def compute(self, target: LayerSparsity) -> PruneResult:
        s = self.scores()
        mask = nm_mask(s, target) if isinstance(target, NM) else unstructured_mask(s, target, self.options.group)
        return PruneResult(apply_mask(self.weight, mask), mask)

"""Magnitude pruning: remove the smallest |W|. Needs no calibration data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScorePruner, register_pruner


@register_pruner("magnitude")
class MagnitudePruner(ScorePruner):
    needs_inputs = False

    @dataclass
    class Options:
        # Wanda's magnitude baseline compares weights across the whole layer.
        group: str = "layer"

    def scores(self) -> torch.Tensor:
        return self.weight.float().abs()

"""Mixed Sparsity Pruning: the Fisher allocation as a seed, then an evolutionary search over per-layer
levels with an exact budget, scored by KL to the dense model on held-out tokens (settings: ``search``)."""

from __future__ import annotations

from dataclasses import dataclass

from .fisher import FisherOptions, fisher_seed
from ..registry import Allocation, AllocationContext, AllocationMethod, register_allocation


@register_allocation("msp")
class Msp(AllocationMethod):
    assigns_patterns = True  # mixed N:M levels around an N:M target
    needs_validation = True

    @dataclass
    class Options(FisherOptions):
        """The seed's Fisher settings; ``min_sparsity``/``max_sparsity`` also bound the search's levels."""

    def check(self, cfg, counts: dict[str, int] | None = None) -> None:
        from ...search.driver import level_space

        level_space(cfg, self.options, counts or {"a": 1, "b": 1})  # the grid's settings (and layer sizes)

    def allocate(self, ctx: AllocationContext) -> Allocation:
        from ...search.driver import msp_search

        scores, continuous = fisher_seed(ctx, self.options)
        with ctx.stage("search"):
            return msp_search(ctx, self.options, continuous, scores)

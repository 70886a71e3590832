"""Joint allocation: each layer's sparsity *and* bit width, searched together under a budget of bits per prunable
weight (``search.bits_per_weight``), from the Fisher seed, by MSP's evolutionary search (see
:mod:`mixsparse.search.joint`). The final model is the searched candidate, pruned and quantized."""

from __future__ import annotations

from dataclasses import dataclass

from .fisher import FisherOptions, fisher_seed
from ..registry import Allocation, AllocationContext, AllocationMethod, register_allocation


@register_allocation("joint")
class Joint(AllocationMethod):
    needs_validation = True

    @dataclass
    class Options(FisherOptions):
        """The seed's Fisher settings (the seed's sparsities become shares of the bits budget)."""

    def check(self, cfg, counts: dict[str, int] | None = None) -> None:
        from ...search.joint import JointSpace

        s, q = cfg.search, cfg.quantize
        cols = q.group_size * 8 or 512  # a layer shape the grid divides: the levels' variants are checked here
        JointSpace.build(s.bits_per_weight, {"a layer": (64, cols)}, step=s.bits_step, max_shift=s.bits_shift,
                         bits=s.bits, group_size=q.group_size, symmetric=q.symmetric, max_sparsity=s.max_joint_sparsity)

    def allocate(self, ctx: AllocationContext) -> Allocation:
        from ...search.driver import joint_search

        scores, continuous = fisher_seed(ctx, self.options)
        with ctx.stage("search"):
            return joint_search(ctx, continuous, scores)

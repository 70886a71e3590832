"""Every layer at the run's target (an unstructured sparsity or one N:M pattern)."""

from __future__ import annotations

from ...sparsity import SparsityMap
from ..registry import Allocation, AllocationContext, AllocationMethod, register_allocation


@register_allocation("uniform")
class Uniform(AllocationMethod):
    assigns_patterns = True

    def allocate(self, ctx: AllocationContext) -> Allocation:
        return Allocation(self.name, SparsityMap.uniform(ctx.target, ctx.counts))

"""Shao et al.: Hutchinson estimates of each layer's Hessian trace, ranked and mapped linearly to
sparsities in ``target +- alpha``."""

from __future__ import annotations

from dataclasses import dataclass

from ..budget import linear_rank_allocation
from ..registry import Allocation, AllocationContext, AllocationMethod, Bounds, register_allocation


@register_allocation("hessian")
class Hessian(AllocationMethod):
    @dataclass
    class Options(Bounds):
        samples: int = 4  # double backward is ~5 forwards per probe and sample: keep it small on a CPU
        seqlen: int = 512
        probes: int = 8
        alpha: float = 0.1  # sparsities in [target - alpha, target + alpha]
        per_block: bool = False  # rank whole blocks instead of single linears

    def allocate(self, ctx: AllocationContext) -> Allocation:
        from ...sensitivity.hessian import hessian_trace

        o = self.options
        with ctx.stage("sensitivity"):
            scores = ctx.cached_scores(
                "hessian", {"samples": o.samples, "seqlen": o.seqlen, "probes": o.probes, "prefix": ctx.calib.prefix},
                lambda: hessian_trace(ctx.model, ctx.calib.ids(o.samples, o.seqlen), n_probes=o.probes,
                                      seed=ctx.cfg.data.seed, device=ctx.device, progress=ctx.progress))
        sm = linear_rank_allocation(scores, ctx.target, ctx.counts, o.alpha, blocks_name=ctx.blocks_name,
                                    per_block=o.per_block, min_sparsity=o.min_sparsity, max_sparsity=o.max_sparsity)
        return Allocation(self.name, sm, scores, "hessian")

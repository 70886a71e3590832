"""OWL (Yin et al., 2023): blocks with more activation outliers are kept denser."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ...names import block_index
from ..budget import owl_allocation
from ..registry import Allocation, AllocationContext, AllocationMethod, Bounds, register_allocation


@register_allocation("owl")
class Owl(AllocationMethod):
    @dataclass
    class Options(Bounds):
        m: float = 5.0  # a Wanda score is an outlier above m times its block's mean score
        lam: float = 0.08  # block sparsities span target +- lam

        def __post_init__(self) -> None:
            super().__post_init__()
            if not self.m > 0:
                raise ConfigError(f"m must be > 0, got {self.m}")

    def allocate(self, ctx: AllocationContext) -> Allocation:
        from ...sensitivity.owl import owl_outlier_ratios

        o, data = self.options, ctx.cfg.data
        with ctx.stage("sensitivity"):
            ratios = owl_outlier_ratios(ctx.model, ctx.calib.ids(data.calibration_samples, data.seqlen), M=o.m,
                                        device=ctx.device, progress=ctx.progress)
        sm = owl_allocation(ratios, ctx.target, ctx.counts, ctx.blocks_name, lam=o.lam, min_sparsity=o.min_sparsity,
                            max_sparsity=o.max_sparsity)
        sens = {n: float(ratios[block_index(n, ctx.blocks_name)]) for n in ctx.counts}
        return Allocation(self.name, sm, sens, "owl")

"""FIM-only allocation: the trace of each layer's empirical Fisher information, mapped to sparsities
(higher trace, more sensitive, denser). It is also MSP's seed."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ...sparsity import NM, SparsityMap
from ..budget import SCORE_MODES, score_allocation
from ..registry import Allocation, AllocationContext, AllocationMethod, Bounds, register_allocation


@dataclass
class FisherOptions(Bounds):
    samples: int = 16  # calibration sequences for the Fisher trace
    seqlen: int = 512
    normalize: bool = False  # divide the trace by the layer's parameter count
    mode: str = "log"  # "log" (standardised log-trace) or "rank"
    alpha: float = 0.15  # sparsities spread over target +- alpha

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in SCORE_MODES:
            raise ConfigError(f"mode must be 'log' or 'rank', got {self.mode!r}")


def fisher_seed(ctx: AllocationContext, o: FisherOptions) -> tuple[dict[str, float], dict[str, float]]:
    """Fisher traces (cached) and the continuous map they give: ``(scores, sparsities)``."""
    from ...sensitivity.fisher import fisher_trace

    with ctx.stage("sensitivity"):
        scores = ctx.cached_scores(
            "fisher", {"samples": o.samples, "seqlen": o.seqlen, "normalize": o.normalize, "prefix": ctx.calib.prefix},
            lambda: fisher_trace(ctx.model, ctx.calib.ids(o.samples, o.seqlen), device=ctx.device,
                                 normalize=o.normalize, progress=ctx.progress))
    if isinstance(ctx.target, NM):  # a mixed N:M search starts from the pattern's sparsity, on its own grid
        return scores, score_allocation(scores, ctx.target.sparsity, ctx.counts, mode=o.mode, alpha=o.alpha)
    return scores, score_allocation(scores, ctx.target, ctx.counts, mode=o.mode, alpha=o.alpha,
                                    min_sparsity=o.min_sparsity, max_sparsity=o.max_sparsity)


@register_allocation("fisher")
class Fisher(AllocationMethod):
    Options = FisherOptions

    def allocate(self, ctx: AllocationContext) -> Allocation:
        scores, continuous = fisher_seed(ctx, self.options)
        return Allocation(self.name, SparsityMap(continuous, ctx.counts), scores, "fisher")

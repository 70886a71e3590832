"""Allocation: how much sparsity each layer gets.

:mod:`.budget` holds the pure math every method ends with (exact global budget, score-to-sparsity
mappings, the discrete grid of the search); :mod:`.registry` the contract and the registry; each
method is one module of :mod:`.methods` that registers itself (uniform, owl, hessian, fisher, msp, file).
Importing this package imports no torch.
"""

from .budget import (
    BUDGET_TOLERANCE,
    SCORE_MODES,
    descending_ranks,
    exact_budget,
    linear_rank_allocation,
    log_offsets,
    offsets_to_sparsities,
    owl_allocation,
    owl_block_offsets,
    rank_offsets,
    score_allocation,
    snap_to_grid,
    uniform,
)
from .registry import (
    Allocation,
    AllocationContext,
    AllocationMethod,
    Bounds,
    available_allocations,
    get_allocation,
    register_allocation,
    unregister_allocation,
)
from ..sparsity import weighted_average
from . import methods  # noqa: F401,I001  (registers the built-in methods; after the registry it uses)

__all__ = [
    "Allocation", "AllocationContext", "AllocationMethod", "BUDGET_TOLERANCE", "Bounds", "SCORE_MODES",
    "available_allocations", "descending_ranks", "exact_budget", "get_allocation", "linear_rank_allocation",
    "log_offsets", "offsets_to_sparsities", "owl_allocation", "owl_block_offsets", "rank_offsets",
    "register_allocation", "score_allocation", "snap_to_grid", "uniform", "unregister_allocation",
    "weighted_average",
]

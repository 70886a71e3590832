"""Allocation: how much sparsity each layer gets.

:mod:`.budget` holds the pure math every method ends with (exact global budget, score-to-sparsity
mappings, the discrete grid of the search); :mod:`.registry` the contract and the registry; each
method is one module that registers itself (uniform, file, owl, hessian, fisher, msp). Importing this
package imports no torch.
"""

# the built-in methods register themselves, in the order `mixsparse list` shows them
from . import uniform, owl, hessian, fisher, msp, file  # noqa: F401,I001
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
    uniform as uniform_allocation,
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

__all__ = [
    "Allocation", "AllocationContext", "AllocationMethod", "BUDGET_TOLERANCE", "Bounds", "SCORE_MODES",
    "available_allocations", "descending_ranks", "exact_budget", "get_allocation", "linear_rank_allocation",
    "log_offsets", "offsets_to_sparsities", "owl_allocation", "owl_block_offsets", "rank_offsets",
    "register_allocation", "score_allocation", "snap_to_grid", "uniform_allocation", "unregister_allocation",
    "weighted_average",
]

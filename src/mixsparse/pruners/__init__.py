"""Base pruners. Each lives in one file and registers itself by name with :func:`register_pruner`."""

from .base import LayerPruner, PruneResult, ScorePruner, available_pruners, get_pruner, register_pruner
from . import magnitude, sparsegpt, wanda  # noqa: F401  (registration)

__all__ = ["LayerPruner", "PruneResult", "ScorePruner", "available_pruners", "get_pruner", "register_pruner"]

"""mixsparse: prune LLMs to extreme sparsity with per-layer sparsity allocation.

Pipeline: calibration data (:mod:`data`) -> sensitivity (:mod:`sensitivity`) -> allocation/search
(:mod:`allocation`, :mod:`search`) -> layer-wise pruning engine (:mod:`engine`, :mod:`pruners`) ->
evaluation (:mod:`evaluation`, :mod:`zeroshot`) -> export (:mod:`export`, :mod:`report`).

Heavy modules are imported on first use, so ``import mixsparse`` stays cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "prune": "pipeline",
    "run": "pipeline",
    "RunConfig": "config",
    "load_config": "config",
    "SparsityMap": "sparsity",
    "NM": "sparsity",
    "prune_layerwise": "engine",
    "LayerwiseRunner": "engine",
    "perplexity": "evaluation",
    "register_pruner": "pruners",
    "get_pruner": "pruners",
    "LayerPruner": "pruners",
    "load_model": "loading",
    "MixsparseError": "errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mixsparse' has no attribute {name!r}")

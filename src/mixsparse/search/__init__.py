"""MSP's search for per-layer sparsities: level space and operators (``space``), level database
(``database``), fitness (``fitness``), the evolutionary loop with its resumable state (``evolution``),
the run-level driver (``driver``) and the settings (``options``, torch-free).

Names are imported on first use, so the typed config can read :mod:`.options` without importing torch.
"""

from importlib import import_module

_LAZY = {
    "LevelDatabase": "database", "SearchConfig": "options", "SearchSection": "options", "SearchResult": "evolution",
    "SearchState": "evolution", "evolutionary_search": "evolution", "Fitness": "fitness", "TopK": "fitness",
    "topk_kl": "fitness", "LevelSpace": "space", "Offsets": "space", "_has_move": "space",
    "block_index_map": "space", "crossover": "space", "mutate": "space", "offsets_key": "space",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

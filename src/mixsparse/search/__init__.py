"""MSP's search for per-layer sparsities: level space and operators (``space``), level database
(``database``), fitness (``fitness``) and the evolutionary loop with its resumable state (``evolution``)."""

from .database import LevelDatabase
from .evolution import SearchConfig, SearchResult, SearchState, evolutionary_search
from .fitness import Fitness, TopK, topk_kl
from .space import LevelSpace, Offsets, _has_move, block_index_map, crossover, mutate, offsets_key

__all__ = ["Fitness", "LevelDatabase", "LevelSpace", "Offsets", "SearchConfig", "SearchResult", "SearchState", "TopK",
           "_has_move", "block_index_map", "crossover", "evolutionary_search", "mutate", "offsets_key", "topk_kl"]

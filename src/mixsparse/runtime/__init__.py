"""Sparse runtime: a pruned model that decodes from its packed weights (see ``load.py``) and one greedy decode
loop shared by dense and sparse models (``decode.py``), so a comparison measures what sparsity gives."""

from .linear import SparseLinear
from .load import RuntimeInfo, load_sparse

__all__ = ["RuntimeInfo", "SparseLinear", "load_sparse"]

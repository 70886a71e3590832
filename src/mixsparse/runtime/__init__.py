"""Sparse runtime: a pruned model that decodes from its packed weights (see ``load.py``) and one greedy decode
loop shared by dense and sparse models (``decode.py``), so a comparison measures what sparsity gives.

This package's ``__init__`` imports no torch (the CLI reads :mod:`.options` from it); the model parts load when
first named."""

from .options import HEAD_DTYPES

__all__ = ["HEAD_DTYPES", "RuntimeInfo", "SparseLinear", "load_sparse"]


def __getattr__(name: str):
    if name == "SparseLinear":
        from .linear import SparseLinear

        return SparseLinear
    if name in ("RuntimeInfo", "load_sparse"):
        from . import load

        return getattr(load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

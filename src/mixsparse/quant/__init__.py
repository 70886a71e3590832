"""Quantization of the kept weights: integer grids (:mod:`.grid`), round-to-nearest and the OBS sweep
shared with SparseGPT (:mod:`.gptq`), the layer-wise stage (:mod:`.stage`). This ``__init__`` imports no
torch: the typed config reads :mod:`.options`."""

from .options import METHODS, QuantizeSection

__all__ = ["METHODS", "QuantizeSection"]

"""Pure mask math on tensors. ``True`` in a mask means *keep* the weight.

Masks prune exactly ``round(group_size * sparsity)`` weights per comparison group (a row, the whole
layer, or each N:M group), lowest score first; ties go to the lower index (stable sort), so masks are
reproducible and exact on hand-built tensors.

Ranks make a mask at *any* sparsity cheap once scores are known: ``rank[i]`` is the position of weight
``i`` in the ascending order of its group, and the mask at sparsity ``s`` is ``rank >= k(s)``. The
evolutionary search keeps ranks, not masks, for score-based pruners.
"""

from __future__ import annotations

import torch

from .errors import SparsityError
from .sparsity import NM

GROUPS = ("row", "layer")


def prune_count(size: int, sparsity: float) -> int:
    """Number of weights to remove from a group of ``size`` (round half to even, like Python)."""
    if not 0.0 <= sparsity < 1.0:
        raise SparsityError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return int(round(size * sparsity))


def _ascending_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim in ascending order (stable: ties by index)."""
    order = torch.sort(scores, dim=-1, stable=True).indices
    ranks = torch.empty_like(order, dtype=torch.int32)
    positions = torch.arange(scores.shape[-1], dtype=torch.int32, device=scores.device)
    ranks.scatter_(-1, order, positions.expand_as(order).contiguous())
    return ranks


def score_ranks(scores: torch.Tensor, group: str = "row") -> torch.Tensor:
    """Ranks of a 2-D score matrix within each row (``row``) or the whole matrix (``layer``)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (out, in), got shape {tuple(scores.shape)}")
    if group == "row":
        return _ascending_ranks(scores)
    if group == "layer":
        return _ascending_ranks(scores.reshape(1, -1)).reshape(scores.shape)
    raise SparsityError(f"unknown comparison group {group!r}; choose one of {GROUPS}")


def mask_from_ranks(ranks: torch.Tensor, sparsity: float, group: str = "row") -> torch.Tensor:
    size = ranks.shape[-1] if group == "row" else ranks.numel()
    return ranks >= prune_count(size, sparsity)


def unstructured_mask(scores: torch.Tensor, sparsity: float, group: str = "row") -> torch.Tensor:
    """Keep-mask removing the lowest-scoring ``sparsity`` share of each comparison group."""
    if sparsity == 0.0:
        return torch.ones_like(scores, dtype=torch.bool)
    return mask_from_ranks(score_ranks(scores, group), sparsity, group)


def nm_ranks(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Ranks of each weight inside its group of ``m`` consecutive input weights."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise SparsityError(f"N:M needs M={m} to divide the input dimension {in_f}")
    return _ascending_ranks(scores.reshape(out_f, in_f // m, m)).reshape(out_f, in_f)


def nm_mask_from_ranks(ranks: torch.Tensor, pattern: NM) -> torch.Tensor:
    return ranks >= (pattern.m - pattern.n)


def nm_mask(scores: torch.Tensor, pattern: NM) -> torch.Tensor:
    """Keep-mask with exactly ``pattern.n`` non-zeros in every group of ``pattern.m`` inputs."""
    return nm_mask_from_ranks(nm_ranks(scores, pattern.m), pattern)


def is_nm(mask: torch.Tensor, pattern: NM) -> bool:
    """True when every group of M consecutive inputs keeps exactly N weights."""
    out_f, in_f = mask.shape
    if in_f % pattern.m:
        return False
    return bool((mask.reshape(out_f, -1, pattern.m).sum(-1) == pattern.n).all())


def split_counts(sizes: list[int], total: int) -> list[int]:
    """Split ``total`` pruned weights over consecutive blocks of the given sizes in proportion to
    their size, with cumulative rounding so the counts add up to ``total`` exactly."""
    counts, done, cum = [], 0, 0
    whole = sum(sizes)
    for size in sizes:
        cum += size
        upto = int(round(total * cum / whole)) if whole else 0
        counts.append(upto - done)
        done = upto
    return counts

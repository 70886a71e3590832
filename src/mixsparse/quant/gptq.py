"""The OBS column sweep shared by SparseGPT, GPTQ and their joint use (Frantar & Alistarh: SparseGPT
prunes and quantizes in one pass). Columns are visited in blocks; each column is replaced by its pruned
and/or quantized value and the error, weighted by the inverse Hessian, is spread over the columns not
yet visited. Pruned positions are fixed to exactly 0 (GPTQ on a pruned layer: the mask never moves).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..masks import prune_count, split_counts
from ..sparsity import NM, LayerSparsity
from .grid import QuantizedWeight, QuantSpec, dequantize, find_params, quantize, scale_dtype_for


def unstructured_selector(target: float, rows: int, starts: list[int], sizes: list[int]) -> Callable:
    """SparseGPT's adaptive mask: the exact layer total shared by blocks, lowest w^2 / [H^-1]_jj^2 first."""
    per_block = split_counts([s * rows for s in sizes], prune_count(rows * sum(sizes), target))

    def select(b: int, W1: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if per_block[b] > 0:
            sal = (W1**2 / d.unsqueeze(0) ** 2).flatten()
            idx = torch.sort(sal, stable=True).indices[: per_block[b]]
            mask1.view(-1)[idx] = True
        return mask1

    return select


def obs_sweep(W0: torch.Tensor, Hinv: torch.Tensor, blocksize: int, *, target: LayerSparsity | None = None,
              fixed: torch.Tensor | None = None, spec: QuantSpec | None = None, name: str = "",
              storage_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, QuantizedWeight | None]:
    """Returns ``(weight float32, pruned mask, quantized codes or None)``.

    ``Hinv``: upper Cholesky factor of the dampened inverse Hessian. The pruned positions are chosen
    (``target``: a sparsity or an N:M pattern) or given (``fixed``: True = pruned, kept at 0). With
    ``spec`` every kept weight is put on the grid; a group's scale comes from its current (already
    error-updated) values when the sweep reaches its first column, as in GPTQ. ``storage_dtype``: the dtype the
    weight is stored in at home, when ``W0`` is an upcast copy (the scales are stored in it)."""
    W = W0.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # W0 may be a transposed expert view
    rows, cols = W.shape
    prune = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    nm = target if isinstance(target, NM) else None
    bs = blocksize
    if nm is not None:
        bs = max(nm.m, (bs // nm.m) * nm.m)  # whole N:M groups per block
    starts = list(range(0, cols, bs))
    sizes = [min(bs, cols - s) for s in starts]
    select = unstructured_selector(float(target), rows, starts, sizes) if target is not None and nm is None else None
    sd = scale_dtype_for(storage_dtype or W0.dtype)
    if spec is not None:
        gs = spec.group_size or cols
        groups = spec.groups(cols, name)
        scales = torch.ones(rows, groups, device=W.device)
        zeros = torch.zeros(rows, groups, device=W.device)
        codes = torch.zeros(rows, cols, dtype=torch.int32, device=W.device)
    for b, (i1, count) in enumerate(zip(starts, sizes)):
        i2 = i1 + count
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if fixed is not None:
            mask1 = fixed[:, i1:i2].clone()
        elif select is not None:
            mask1 = select(b, W1, d)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            if nm is not None and i % nm.m == 0:
                sal = W1[:, i: i + nm.m] ** 2 / d[i: i + nm.m].unsqueeze(0) ** 2
                idx = torch.sort(sal, dim=1, stable=True).indices[:, : nm.m - nm.n]
                mask1[:, i: i + nm.m].scatter_(1, idx, True)
            if spec is not None:
                col = i1 + i
                if col % gs == 0:  # the group's range from its current values (pruned ones count as 0)
                    ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                    if fixed is not None:  # the whole group's pruned positions are known (later ones may have drifted)
                        known = fixed[:, col: col + gs]
                    else:
                        known = torch.cat([mask1[:, i:], torch.zeros(rows, max(0, gs - (count - i)), dtype=torch.bool,
                                                                      device=W.device)], dim=1)[:, :gs]
                    s, z = find_params(torch.where(known, torch.zeros((), device=W.device), ahead), spec, name, sd)
                    scales[:, col // gs], zeros[:, col // gs] = s.squeeze(1), z.squeeze(1)
                s, z = scales[:, col // gs: col // gs + 1], zeros[:, col // gs: col // gs + 1]
                qi = quantize(w.unsqueeze(1), s, z, spec)
                qi = torch.where(mask1[:, i: i + 1], z.to(torch.int32), qi)  # pruned: the code of 0
                codes[:, col] = qi.squeeze(1)
                q = dequantize(qi, s, z).squeeze(1)
            else:
                q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q  # exact zeros where pruned, reconstructed (or grid) value elsewhere
            Err1[:, i] = err
        W[:, i1:i2] = W1
        prune[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W = torch.where(prune, torch.zeros((), dtype=W.dtype, device=W.device), W)
    qw = QuantizedWeight.from_signed(codes, scales, zeros, spec, sd) if spec is not None else None
    return W, prune, qw

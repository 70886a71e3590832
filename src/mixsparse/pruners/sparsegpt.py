"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with weight reconstruction.

Hessian H = 2/n * sum x x^T of the layer inputs, dampened by ``percdamp * mean(diag H)``. Columns are
processed in blocks; inside a block the mask is chosen adaptively by the OBS saliency
w^2 / [H^-1]_jj^2 and every pruned weight's error is spread over the not-yet-processed columns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import NumericalError
from ..masks import prune_count, split_counts
from ..sparsity import NM, LayerSparsity
from .base import LayerPruner, PruneResult, register_pruner

log = logging.getLogger(__name__)


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float, max_retries: int = 4, name: str = "") -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*I)^-1. A Hessian that is not positive definite is retried
    with 10x more dampening (up to ``max_retries`` times) before giving up with a clear error."""
    if not torch.isfinite(hessian).all():
        raise NumericalError(f"layer {name!r}: Hessian has NaN/Inf entries (non-finite calibration activations)")
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0  # inputs that are always zero: their weights do not matter
    mean_diag = torch.mean(torch.diag(H)).item()
    damp = percdamp
    for attempt in range(max_retries + 1):
        Hd = H + damp * mean_diag * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                if attempt:
                    log.warning("layer %s: Hessian needed dampening %.3g (asked %.3g)", name, damp, percdamp)
                return U
        damp = damp * 10.0 if damp > 0 else 1e-3
    raise NumericalError(
        f"layer {name!r}: Hessian is not positive definite even with dampening {damp / 10:.3g}; "
        "use more calibration samples or a larger percdamp"
    )


@register_pruner("sparsegpt")
class SparseGPTPruner(LayerPruner):
    reconstructs = True

    @dataclass
    class Options:
        blocksize: int = 128
        percdamp: float = 0.01

    def __init__(self, layer, options=None, layer_name=""):
        super().__init__(layer, options, layer_name)
        n = layer.in_features
        self.H = torch.zeros(n, n, dtype=torch.float32, device=layer.weight.device)
        self._factor: torch.Tensor | None = None

    def _accumulate(self, x: torch.Tensor) -> None:
        # Running mean of 2 x x^T, rescaled as samples arrive (as in the reference implementation).
        t = x.shape[0]
        total = self.nsamples + t
        self.H *= self.nsamples / total
        x = x * (2.0 / total) ** 0.5
        self.H += x.t() @ x
        self._factor = None

    def factor(self) -> torch.Tensor:
        if self._factor is None:
            if self.nsamples == 0:
                raise NumericalError(f"layer {self.layer_name!r}: SparseGPT saw no calibration inputs")
            self._factor = inverse_hessian_factor(self.H, self.options.percdamp, name=self.layer_name)
        return self._factor

    def compute(self, target: LayerSparsity) -> PruneResult:
        W0 = self.weight
        rows, cols = W0.shape
        W = W0.float().clone()
        prune = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)  # True = pruned
        if not isinstance(target, NM) and prune_count(W.numel(), target) == 0:
            return PruneResult(W0.clone(), ~prune)
        Hinv = self.factor()
        bs = self.options.blocksize
        if isinstance(target, NM):
            bs = max(target.m, (bs // target.m) * target.m)  # whole N:M groups per block
        starts = list(range(0, cols, bs))
        sizes = [min(bs, cols - s) for s in starts]
        if not isinstance(target, NM):
            # exact total over the layer: blocks share it by cumulative rounding
            per_block = split_counts([s * rows for s in sizes], prune_count(W.numel(), target))
        for b, (i1, count) in enumerate(zip(starts, sizes)):
            i2 = i1 + count
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = torch.diag(Hinv1)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if not isinstance(target, NM) and per_block[b] > 0:
                sal = (W1**2 / d.unsqueeze(0) ** 2).flatten()
                idx = torch.sort(sal, stable=True).indices[: per_block[b]]
                mask1.view(-1)[idx] = True
            for i in range(count):
                w = W1[:, i]
                if isinstance(target, NM) and i % target.m == 0:
                    sal = W1[:, i : i + target.m] ** 2 / d[i : i + target.m].unsqueeze(0) ** 2
                    idx = torch.sort(sal, dim=1, stable=True).indices[:, : target.m - target.n]
                    mask1[:, i : i + target.m].scatter_(1, idx, True)
                q = torch.where(mask1[:, i], torch.zeros_like(w), w)
                err = (w - q) / d[i]
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                W1[:, i] = q  # exact zeros where pruned, reconstructed value elsewhere
                Err1[:, i] = err
            W[:, i1:i2] = W1
            prune[:, i1:i2] = mask1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        keep = ~prune
        W = torch.where(keep, W, torch.zeros((), dtype=W.dtype, device=W.device))
        if not torch.isfinite(W).all():
            raise NumericalError(f"layer {self.layer_name!r}: SparseGPT update produced NaN/Inf")
        return PruneResult(W.to(W0.dtype), keep)

    def free(self) -> None:
        self.H = torch.zeros(0)
        self._factor = None

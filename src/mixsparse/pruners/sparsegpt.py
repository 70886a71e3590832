"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with weight reconstruction.

Hessian H = 2/n * sum x x^T of the layer inputs, dampened by ``percdamp * mean(diag H)``. Columns are
processed in blocks; inside a block the mask is chosen adaptively by the OBS saliency
w^2 / [H^-1]_jj^2 and every pruned weight's error is spread over the not-yet-processed columns (the
sweep, shared with GPTQ, is :func:`mixsparse.quant.gptq.obs_sweep`). With ``bits`` set, the kept
weights are quantized in the same sweep (the paper's joint mode).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import NumericalError
from ..masks import prune_count
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
        # joint pruning + quantization in the same OBS sweep (quantize.method: joint sets these)
        bits: int = 0  # 0 = no quantization
        group_size: int = 128
        symmetric: bool = True

        def quant_spec(self):
            from ..quant.grid import QuantSpec

            return QuantSpec(self.bits, self.group_size, self.symmetric) if self.bits else None

    def __init__(self, layer, options=None, layer_name="", min_tokens=0):
        super().__init__(layer, options, layer_name, min_tokens)
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
        from ..quant.gptq import obs_sweep

        W0 = self.weight
        spec = self.options.quant_spec()
        if spec is None and not isinstance(target, NM) and prune_count(W0.numel(), target) == 0:
            return PruneResult(W0.clone(), torch.ones_like(W0, dtype=torch.bool))
        W, prune, quantized = obs_sweep(W0, self.factor(), self.options.blocksize, target=target, spec=spec,
                                        name=self.layer_name, storage_dtype=self.storage_dtype)
        if not torch.isfinite(W).all():
            raise NumericalError(f"layer {self.layer_name!r}: SparseGPT update produced NaN/Inf")
        return PruneResult(W.to(W0.dtype), ~prune, quantized)

    def fallback(self, target: LayerSparsity) -> PruneResult:
        res = super().fallback(target)
        spec = self.options.quant_spec()
        if spec is None:
            return res
        from ..quant.grid import quantize_rtn  # joint mode: the kept weights still go on the grid (0 stays 0)

        qw = quantize_rtn(res.weight, spec, self.layer_name, self.storage_dtype)
        return PruneResult(qw.dequantize().to(res.weight.dtype), res.mask, qw)

    def changes_unpruned(self) -> bool:
        return self.options.bits > 0

    def free(self) -> None:
        self.H = torch.zeros(0)
        self._factor = None

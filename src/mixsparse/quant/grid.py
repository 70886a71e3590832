"""Integer grids for weight quantization: pure tensor math on ``(rows, cols)`` weights.

A layer is split into groups of ``group_size`` consecutive input columns (``0``: one group per output
row, i.e. per channel); each (row, group) has a scale and, when asymmetric, an integer zero point.
Zero is always on the grid, so a pruned weight stays exactly zero and a standard dequantizer
``(q - zero) * scale`` reproduces it. Scales are rounded to the checkpoints' scale dtype before they are
used (bfloat16 for a bfloat16 model, else float16: compressed-tensors computes ``(q - zero) * scale`` in
the model's dtype), so the in-memory dequantized weights are the ones a reloaded checkpoint gives, bit
for bit: the product of a small integer and such a scale is exact in float32 and rounds once to the
model's dtype, as the loader's own multiplication does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, NumericalError

BITS = (2, 3, 4, 8)
FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # input columns per scale; 0 = one scale per output channel
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ConfigError(f"quantize.bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.group_size < 0:
            raise ConfigError(f"quantize.group_size must be >= 0 (0 = per channel), got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def groups(self, cols: int, name: str = "") -> int:
        gs = self.group_size or cols
        if cols % gs:
            raise ConfigError(f"quantize.group_size {self.group_size} does not divide the {cols} input features of "
                              f"{name or 'a layer'}; use a divisor of {cols} (e.g. 64 or 32) or 0 (per channel)")
        return cols // gs

    def label(self) -> str:
        return f"int{self.bits}-{'sym' if self.symmetric else 'asym'}-" + (f"g{self.group_size}" if self.group_size else "channel")


def scale_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float16


def find_params(w: torch.Tensor, spec: QuantSpec, name: str = "", scale_dtype: torch.dtype = torch.float16
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32 holding ``scale_dtype`` values) and integer zero point per row of ``w`` ``(rows, group)``.

    The range always contains 0. Symmetric: ``scale = max|w| / ((qmax - qmin) / 2)`` and zero point 0
    (the compressed-tensors convention: int4 covers [-8, 7] * scale). Asymmetric: ``scale = (max - min)
    / (qmax - qmin)`` and ``zero = qmin - round(min / scale)``."""
    w = w.float()
    lo = torch.clamp(w.min(dim=1, keepdim=True).values, max=0.0)
    hi = torch.clamp(w.max(dim=1, keepdim=True).values, min=0.0)
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / ((spec.qmax - spec.qmin) / 2)
    else:
        scale = (hi - lo) / (spec.qmax - spec.qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale gives 0
    limit = torch.finfo(scale_dtype).max
    if bool((scale > limit).any()):
        raise NumericalError(f"layer {name!r}: a quantization scale ({float(scale.max()):.3g}) overflows "
                             f"{str(scale_dtype).replace('torch.', '')} (weights beyond ~{limit * 7:.0e}); this layer "
                             "cannot be stored with such scales (load the model in bfloat16 or float32)")
    scale = scale.to(scale_dtype).float()
    tiny = torch.finfo(scale_dtype).smallest_normal * torch.finfo(scale_dtype).eps  # the smallest subnormal
    scale = torch.where(scale > 0, scale, torch.full_like(scale, tiny))  # underflow: a tiny positive scale
    if spec.symmetric:
        zero = torch.zeros_like(scale)
    else:
        zero = torch.clamp(spec.qmin - torch.round(lo / scale), spec.qmin, spec.qmax)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (int32) of ``w`` on the grid of ``scale``/``zero`` (broadcast over columns)."""
    return torch.clamp(torch.round(w.float() / scale) + zero, spec.qmin, spec.qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero) * scale


def quantize_rtn(weight: torch.Tensor, spec: QuantSpec, name: str = "", storage_dtype: torch.dtype | None = None
                 ) -> "QuantizedWeight":
    """Round-to-nearest: every group's scale from its own range, every weight to its nearest grid point.
    Pruned (zero) weights stay zero: 0 is on every grid."""
    rows, cols = weight.shape
    g = spec.groups(cols, name)
    w = weight.float().reshape(rows * g, cols // g)
    sd = scale_dtype_for(storage_dtype or weight.dtype)  # an upcast copy's scales are stored in its home dtype
    scale, zero = find_params(w, spec, name, sd)
    q = quantize(w, scale, zero, spec)
    return QuantizedWeight.from_signed(q.reshape(rows, cols), scale.reshape(rows, g), zero.reshape(rows, g), spec, sd)


@dataclass
class QuantizedWeight:
    """One quantized layer: unsigned codes ``(rows, cols)`` (uint8, ``q - qmin``), scales holding
    ``scale_dtype`` values and unsigned zero points ``(rows, groups)``; ``(code - zero) * scale`` is the
    weight (in float32, exact; the model holds it cast to its dtype)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    scale_dtype: torch.dtype = torch.float16

    @classmethod
    def from_signed(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
                    scale_dtype: torch.dtype = torch.float16) -> "QuantizedWeight":
        return cls((q - spec.qmin).to(torch.uint8), scale.float(), (zero - spec.qmin).float(), spec, scale_dtype)

    def cpu(self) -> "QuantizedWeight":
        return QuantizedWeight(self.codes.cpu(), self.scale.cpu(), self.zero.cpu(), self.spec, self.scale_dtype)

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        g = self.scale.shape[1]
        w = dequantize(self.codes.reshape(rows, g, cols // g), self.scale.unsqueeze(-1), self.zero.unsqueeze(-1))
        return w.reshape(rows, cols)

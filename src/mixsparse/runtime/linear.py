"""A linear layer that keeps its weight in mixsparse's compressed bitmask format and multiplies with it.

The bitmask and the non-zero values are the checkpoint's own tensors (memory-mapped from its safetensors file,
never densified in memory); ``row_ptr`` (where each row's values start, 8 bytes per row) is computed at load.
A few tokens (decoding) go through the sparse kernel; many tokens (a prompt) expand the layer once into a
dense scratch matrix and use the dense GEMM, which is faster there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# up to this many tokens per call the sparse kernel is used; beyond, one expansion + dense GEMM is cheaper
SPARSE_MAX_TOKENS = 8


def row_pointers(mask: torch.Tensor, rows: int, cols: int, kernels=None) -> torch.Tensor:
    """Offsets of each row's first value among the stored values (int64, ``rows + 1``). Without the kernels, a
    popcount table over a few hundred rows at a time (unpacking every bit at once left megabytes per layer in the
    allocator, hundreds of MB over a model)."""
    if kernels is not None:
        return kernels.bitmask_row_ptr(mask, rows, cols)
    pop = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64, device=mask.device)
    per_row = cols // 8
    counts = torch.zeros(rows + 1, dtype=torch.int64, device=mask.device)
    step = max(1, 4096 // max(per_row // 64, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        counts[r0 + 1 : r1 + 1] = pop[mask[r0 * per_row : r1 * per_row].reshape(r1 - r0, per_row).long()].sum(1)
    return counts.cumsum(0)


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` (out x in) held as bitmask + fp16/bf16 values; computes in float32.

    The bitmask, its row offsets, the bias and the choice between the sparse kernel (a few tokens) and one dense
    expansion + GEMM (a prompt) are shared with :class:`Q4SparseLinear`, which stores the kept weights otherwise
    and overrides :meth:`_kernel`, :meth:`dense`, :meth:`weight_bytes` and :meth:`_stored`."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor, values: torch.Tensor,
                 bias: torch.Tensor | None = None, kernels=None, isa: int = -1, row_ptr: torch.Tensor | None = None):
        super().__init__()
        self._init_packed(in_features, out_features, mask, bias, kernels, isa, row_ptr)
        self.register_buffer("values", values, persistent=False)
        if self.nnz != values.numel():
            raise ValueError(f"bitmask has {self.nnz} set bits but {values.numel()} values are stored")

    def _init_packed(self, in_features: int, out_features: int, mask: torch.Tensor, bias: torch.Tensor | None,
                     kernels, isa: int, row_ptr: torch.Tensor | None = None) -> None:
        if in_features % 8:
            raise ValueError(f"{type(self).__name__} needs in_features divisible by 8 (byte-aligned rows), "
                             f"got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("row_ptr", row_pointers(mask, out_features, in_features, kernels) if row_ptr is None
                             else row_ptr, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)
        self.kernels, self.isa = kernels, isa

    @property
    def nnz(self) -> int:
        return int(self.row_ptr[-1])

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mask, self.values, self.row_ptr))

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.bitmask_matmul(x, self.mask, self.values, self.row_ptr, self.out_features, self.isa)

    def dense(self) -> torch.Tensor:
        """The weight as a dense float32 matrix (a scratch copy)."""
        if self.kernels is not None:
            return self.kernels.bitmask_expand(self.mask, self.values, self.row_ptr, self.out_features, self.in_features)
        from ..export import bitmask_decode

        return bitmask_decode(self.mask, self.values, (self.out_features, self.in_features)).float()

    def _stored(self) -> str:
        return f"values={str(self.values.dtype).replace('torch.', '')}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.kernels is not None and x2.shape[0] <= SPARSE_MAX_TOKENS:
            # decoding calls this ~200 times per token: no op that is not needed (each costs ~1 us)
            y = self._kernel(x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.float().contiguous())
            if self.bias is not None:
                y.add_(self.bias)
        else:
            y = F.linear(x2.float(), self.dense(), self.bias)
        y = y.view(*shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        density = self.nnz / (self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, density={density:.3f}, "
                f"{self._stored()}, path={'kernel' if self.kernels is not None else 'torch'}")


class Q4SparseLinear(SparseLinear):
    """``SparseLinear`` whose kept weights are 4-bit codes with per-group scales (and zero points when asymmetric),
    exactly mixsparse's ``quantized`` encoding at 4 bits: half a byte per kept weight instead of two."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor, codes: torch.Tensor,
                 scale: torch.Tensor, zero: torch.Tensor | None, bias: torch.Tensor | None = None, kernels=None, isa: int = -1):
        nn.Module.__init__(self)  # no values: the shared parts only
        self._init_packed(in_features, out_features, mask, bias, kernels, isa)
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("zero", zero if zero is not None else torch.empty(0, dtype=torch.uint8), persistent=False)
        if codes.numel() * 2 < self.nnz:
            raise ValueError(f"bitmask has {self.nnz} set bits but only {codes.numel() * 2} codes are stored")

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mask, self.codes, self.scale, self.zero, self.row_ptr))

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        # the kernel keeps (code - zero) * scale in float32: exactly the weight of a float32 model; a bf16/fp16
        # model held it rounded to its dtype, which the kernel's products differ from at that rounding's level
        return self.kernels.q4_matmul(x, self.mask, self.codes, self.row_ptr, self.scale, self.zero,
                                      self.out_features, self.isa)

    def dense(self) -> torch.Tensor:
        # (code - zero) * scale in float32, as the kernel computes it: a prompt and a decoded token see one weight
        if self.kernels is not None and hasattr(self.kernels, "q4_expand"):  # the GPU kernels expand on the device
            return self.kernels.q4_expand(self.mask, self.codes, self.row_ptr, self.scale, self.zero,
                                          self.out_features, self.in_features)
        from ..export import quantized_decode

        stored = {"w::bitmask": self.mask, "w::codes": self.codes, "w::scale": self.scale}
        entry = {"bits": 4, "symmetric": self.zero.numel() == 0}
        if self.zero.numel():
            stored["w::zero"] = self.zero
        return quantized_decode(stored, "w", entry, (self.out_features, self.in_features))

    def _stored(self) -> str:
        return f"codes=int4, scales={str(self.scale.dtype).replace('torch.', '')}"


def quantize_rows_int8(w: torch.Tensor, rows_per_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float32 scale per row: ``w ~ q * scale[:, None]``, ``|q| <= 127``. A few thousand
    rows at a time: the float32 temporaries of a whole 49k x 576 head would add ~300 MB to the load's peak."""
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0], dtype=torch.float32)
    for r0 in range(0, w.shape[0], rows_per_chunk):
        part = w[r0 : r0 + rows_per_chunk].float()
        s = (part.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        q[r0 : r0 + rows_per_chunk] = torch.round(part / s[:, None]).clamp_(-127, 127)
        scale[r0 : r0 + rows_per_chunk] = s
    return q, scale


class DenseLowpLinear(SparseLinear):
    """``y = x W^T + b`` with a dense ``W`` in fp16/bf16, or int8 with one float32 scale per row: the LM head, which
    a token reads whole (on a small model the largest matrix of all), at a half or a quarter of its float32 bytes.
    Dense rows need no bitmask, so a kernel of their own (``dense_matmul``) multiplies them; the forward (kernel for
    a few tokens, expansion + GEMM for many) is :class:`SparseLinear`'s."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 kernels=None, isa: int = -1):
        nn.Module.__init__(self)
        if weight.dtype not in (torch.float16, torch.bfloat16, torch.int8) or (weight.dtype == torch.int8) != (scale is not None):
            raise ValueError(f"DenseLowpLinear takes fp16/bf16, or int8 with row scales; got {weight.dtype}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous(), persistent=False)
        self.register_buffer("scale", scale.float().contiguous() if scale is not None else torch.empty(0),
                             persistent=False)
        self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)
        self.kernels, self.isa = kernels, isa

    @property
    def nnz(self) -> int:
        return self.weight.numel()

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale))

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.dense_matmul(x, self.weight, self.scale, self.isa)

    def dense(self) -> torch.Tensor:
        w = self.weight.float()
        return w * self.scale[:, None] if self.scale.numel() else w

    def _stored(self) -> str:
        return f"dense {str(self.weight.dtype).replace('torch.', '')}" + (", row scales" if self.scale.numel() else "")

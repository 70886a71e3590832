"""The sparse runtime's GPU kernels, in Triton: the same formats and the same interface as the compiled CPU
kernels (``csrc/sparse_kernels.cpp``), so :class:`~mixsparse.runtime.SparseLinear` runs unchanged on a GPU.

Written by hand for the same reason as the CPU kernels: no maintained GPU library multiplies a bitmask with
packed values (vLLM's and torchao's sparse paths are gone; cuSPARSE's CSR needs a 32-bit column index per
non-zero, twice the fp16 values' bytes). The layout is the checkpoint's own: one bit per weight (first column in
the most significant bit of each byte, rows byte-aligned), the kept values (fp16/bf16/fp32) or 4-bit codes with
group scales in row-major order, and per-row offsets into them (``row_ptr``, computed at load).

A program takes ``BLOCK_R`` rows and walks their columns ``BLOCK_K`` at a time: each column's bit comes from its
mask byte, its value's index among the row's stored ones is the row's running offset plus a prefix sum of the
bits (``tl.cumsum`` along the tile), so every value is read once, from contiguous addresses per row. The weight
tile is built in registers in float32 and multiplied by the input (decode: :meth:`bitmask_matmul`) or written
out dense (a prompt of many tokens: :meth:`bitmask_expand`, then the dense GEMM).

Tested on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, tests/test_runtime_triton.py) against
the pure-torch path; timed on a GPU by ``benchmarks/gpu_check.py`` (``runtime_*`` steps).
"""

from __future__ import annotations

import contextlib

import torch

BLOCK_R = 16  # rows per program: a 4096-row layer gives 256 programs, about two per SM of an H100
BLOCK_K = 128  # columns per step: 16 mask bytes per row
BITMASK, Q4, DENSE = 0, 1, 2  # the weight formats (the kernels' FMT)


def reason() -> str | None:
    """Why the Triton kernels cannot run here (None when they can)."""
    import importlib.util

    return "triton is not installed" if importlib.util.find_spec("triton") is None else None


def _jit():
    from . import _triton_jit as J  # imports triton: only when a layer first runs on these kernels

    return J.triton, J.matmul, J.expand


class TritonKernels:
    """The compiled CPU module's interface (``bitmask_matmul``, ``bitmask_expand``, ``q4_matmul``,
    ``dense_matmul``, ``bitmask_row_ptr``, ``isa_level``) on the tensors' own device, plus ``q4_expand`` (the
    CPU path expands 4-bit layers in torch). ``isa`` arguments are accepted and ignored: there is one GPU path."""

    name = "triton"

    def isa_level(self, wanted: int = -1) -> int:
        return 0

    @staticmethod
    def bitmask_row_ptr(mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        from .linear import row_pointers

        return row_pointers(mask, rows, cols)

    def _run(self, x: torch.Tensor | None, N: int, K: int, fmt: int, values=None, mask=None, row_ptr=None,
             codes=None, scale=None, zero=None) -> torch.Tensor:
        triton, matmul, expand = _jit()
        if fmt == Q4:
            asym, G = zero is not None and zero.numel() > 0, scale.shape[-1]
        else:
            asym, G = scale is not None and scale.numel() > 0, 1  # DENSE: int8 rows times their scale
        dummy = values if values is not None else codes  # a pointer the kernel never reads (another format's)
        device = dummy.device
        # the checks the CPU module makes: on a GPU a wrong call would read out of bounds without a word
        if K % 8 or (mask is not None and (mask.numel() * 8 < N * K or row_ptr.numel() != N + 1)):
            raise ValueError(f"packed weight does not fit a {N} x {K} layer")
        if x is not None and (x.dtype != torch.float32 or not x.is_contiguous() or x.shape[1] != K or x.device != device):
            raise ValueError(f"input must be contiguous float32 (B x {K}) on {device}, got {x.dtype} {tuple(x.shape)} on {x.device}")
        args = tuple(t if t is not None and t.numel() else dummy for t in (mask, values, codes, scale, zero, row_ptr))
        args += (N, K, G)
        meta = dict(BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, FMT=fmt, ASYM=asym)
        # Triton launches on the current CUDA device: make it the tensors' (cuda:1 and others)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            if x is None:
                out = torch.empty(N, K, dtype=torch.float32, device=device)
                expand[(triton.cdiv(N, BLOCK_R),)](out, *args, **meta)
                return out
            y = torch.empty(x.shape[0], N, dtype=torch.float32, device=device)
            matmul[(triton.cdiv(N, BLOCK_R), x.shape[0])](x, y, *args, **meta)
            return y

    def bitmask_matmul(self, x, mask, values, row_ptr, N: int, isa: int = -1) -> torch.Tensor:
        return self._run(x, N, x.shape[1], BITMASK, values, mask, row_ptr)

    def bitmask_expand(self, mask, values, row_ptr, N: int, K: int) -> torch.Tensor:
        return self._run(None, N, K, BITMASK, values, mask, row_ptr)

    def q4_matmul(self, x, mask, codes, row_ptr, scale, zero, N: int, isa: int = -1) -> torch.Tensor:
        return self._run(x, N, x.shape[1], Q4, None, mask, row_ptr, codes, scale, zero)

    def q4_expand(self, mask, codes, row_ptr, scale, zero, N: int, K: int) -> torch.Tensor:
        return self._run(None, N, K, Q4, None, mask, row_ptr, codes, scale, zero)

    def dense_matmul(self, x, weight, scale, isa: int = -1) -> torch.Tensor:
        """Dense fp16/bf16 rows, or int8 rows times their scale: products and sums in float32, as on the CPU (the
        vendor's half-precision GEMM would round the input to the head's dtype)."""
        return self._run(x, weight.shape[0], x.shape[1], DENSE, weight, scale=scale)

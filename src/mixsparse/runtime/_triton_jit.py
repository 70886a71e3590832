"""The Triton kernels of :mod:`.triton_kernels` (a module of their own: Triton resolves the functions a kernel
calls among its module's globals, and importing it, which imports triton, happens only when a GPU layer first runs;
``TRITON_INTERPRET`` is read when a kernel is defined)."""

import triton
import triton.language as tl


@triton.jit
def weights(rows, rmask, off, k0, K, G, mask_ptr, vals_ptr, codes_ptr, scale_ptr, zero_ptr,
            BLOCK_K: tl.constexpr, FMT: tl.constexpr, ASYM: tl.constexpr):
    """The float32 weight tile of ``rows`` x columns ``k0 .. k0 + BLOCK_K`` and the rows' offsets after it.
    FMT (triton_kernels' constants): 0 BITMASK (kept values), 1 Q4 (kept 4-bit codes, group scales, zero points if
    ASYM) or 2 DENSE (every weight stored; int8 ones times their row's scale if ASYM)."""
    c = k0 + tl.arange(0, BLOCK_K)
    inside = rmask[:, None] & (c < K)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    if FMT == 2:
        w = tl.load(vals_ptr + r64 * K + c[None, :], mask=inside, other=0).to(tl.float32)
        if ASYM:
            w = w * tl.load(scale_ptr + rows, mask=rmask, other=0.0)[:, None]
        after = off
    else:
        byte = tl.load(mask_ptr + r64 * (K // 8) + (c // 8)[None, :], mask=inside, other=0).to(tl.int32)
        bit = (byte >> (7 - (c % 8))[None, :]) & 1
        on = inside & (bit != 0)
        idx = off[:, None] + tl.cumsum(bit, axis=1).to(tl.int64) - 1  # the value's number among the stored ones
        if FMT == 1:
            packed = tl.load(codes_ptr + (idx >> 1), mask=on, other=0).to(tl.int32)
            code = (packed >> ((1 - (idx & 1)) * 4).to(tl.int32)) & 15  # even numbers: the high nibble
            g = r64 * G + (c // (K // G))[None, :]
            s = tl.load(scale_ptr + g, mask=on, other=0.0).to(tl.float32)
            if ASYM:
                w = (code.to(tl.float32) - tl.load(zero_ptr + g, mask=on, other=0).to(tl.float32)) * s
            else:
                w = (code.to(tl.float32) - 8.0) * s
        else:
            w = tl.load(vals_ptr + idx, mask=on, other=0.0).to(tl.float32)
        w = tl.where(on, w, 0.0)
        after = off + tl.sum(bit, axis=1).to(tl.int64)
    return w, after  # one return: the compiler takes no early return from a called function


@triton.jit
def first_offsets(rowptr_ptr, rows, rmask, FMT: tl.constexpr):
    if FMT == 2:
        off = tl.zeros(rows.shape, dtype=tl.int64)  # dense rows: no offsets
    else:
        off = tl.load(rowptr_ptr + rows, mask=rmask, other=0)
    return off


@triton.jit
def matmul(x_ptr, y_ptr, mask_ptr, vals_ptr, codes_ptr, scale_ptr, zero_ptr, rowptr_ptr, N, K, G,
           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, FMT: tl.constexpr, ASYM: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = tl.program_id(1).to(tl.int64)  # one input vector per program column: decoding has one
    rmask = rows < N
    off = first_offsets(rowptr_ptr, rows, rmask, FMT)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w, off = weights(rows, rmask, off, k0, K, G, mask_ptr, vals_ptr, codes_ptr, scale_ptr, zero_ptr,
                         BLOCK_K, FMT, ASYM)
        c = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + b * K + c, mask=c < K, other=0.0)
        acc += tl.sum(w * xv[None, :], axis=1)
    tl.store(y_ptr + b * N + rows, acc, mask=rmask)


@triton.jit
def expand(out_ptr, mask_ptr, vals_ptr, codes_ptr, scale_ptr, zero_ptr, rowptr_ptr, N, K, G,
           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, FMT: tl.constexpr, ASYM: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    off = first_offsets(rowptr_ptr, rows, rmask, FMT)
    for k0 in range(0, K, BLOCK_K):
        w, off = weights(rows, rmask, off, k0, K, G, mask_ptr, vals_ptr, codes_ptr, scale_ptr, zero_ptr,
                         BLOCK_K, FMT, ASYM)
        c = k0 + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + c[None, :], w, mask=rmask[:, None] & (c < K)[None, :])

"""The sparse runtime's Triton kernels (GPU), run here on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``,
set in conftest.py): every format against the exact weights and against the CPU paths, whole models included.
On a GPU the same kernels are compiled and timed by ``benchmarks/gpu_check.py``."""

import os

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (a dev dependency)")

from mixsparse.errors import ConfigError  # noqa: E402
from mixsparse.export import bitmask_encode, quantized_encode  # noqa: E402
from mixsparse.quant.grid import QuantSpec, quantize_rtn  # noqa: E402
from mixsparse.runtime import load_sparse  # noqa: E402
from mixsparse.runtime.linear import DenseLowpLinear, Q4SparseLinear, SparseLinear, quantize_rows_int8  # noqa: E402
from mixsparse.runtime.triton_kernels import BLOCK_K, BLOCK_R, TritonKernels  # noqa: E402

from .test_runtime import CASES, _reference_logits, _saved  # noqa: E402
from .tiny import tiny_ids  # noqa: E402

TK = TritonKernels()
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")


def _sparse(rows, cols, density, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) > density] = 0
    w[1] = 0  # an empty row
    w[2] = torch.randn(cols, generator=g)  # a full one
    return w


# rows: within one program, a program and a few rows; columns: within one step, a step and a byte, several steps
SHAPES = [(5, 24), (BLOCK_R + 3, BLOCK_K + 8), (2 * BLOCK_R, 3 * BLOCK_K + 40)]


@pytest.mark.parametrize("rows, cols", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bitmask_kernel_equals_the_stored_weight(rows, cols, dtype):
    w = _sparse(rows, cols, 0.3, seed=rows + cols).to(dtype)
    mask, values = bitmask_encode(w)
    x = torch.randn(11, cols)
    lin = SparseLinear(cols, rows, mask, values, kernels=TK)
    ref = x.double() @ w.double().t()
    for b in (1, 3):  # the kernel: one program column per input vector
        torch.testing.assert_close(lin(x[:b]).double(), ref[:b], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.dense(), w.float(), rtol=0, atol=0)  # the expansion (a prompt's path) is exact
    torch.testing.assert_close(lin(x), SparseLinear(cols, rows, mask, values)(x), rtol=1e-5, atol=1e-5)  # torch path


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("cols, group", [(160, 16), (264, 0), (3 * BLOCK_K + 40, 8)])
def test_int4_kernel_equals_the_dequantized_weight(symmetric, cols, group):
    w = _sparse(BLOCK_R + 5, cols, 0.4, seed=cols)
    qw = quantize_rtn(w, QuantSpec(4, group, symmetric), "w")
    enc, parts = quantized_encode(qw)
    assert enc == "quantized"
    ref_w = qw.dequantize()
    lin = Q4SparseLinear(cols, w.shape[0], parts["bitmask"], parts["codes"], parts["scale"], parts.get("zero"),
                         kernels=TK)
    x = torch.randn(3, cols)
    torch.testing.assert_close(lin(x), x @ ref_w.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.dense(), ref_w, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
def test_dense_head_kernel_equals_the_stored_rows(dtype):
    w = torch.randn(BLOCK_R * 2 + 1, 200)
    low, scale = quantize_rows_int8(w) if dtype == torch.int8 else (w.to(dtype), None)
    ref_w = low.float() * scale[:, None] if scale is not None else low.float()
    x = torch.randn(2, 200)
    lin = DenseLowpLinear(low, scale, kernels=TK)
    torch.testing.assert_close(lin(x), x @ ref_w.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.dense(), ref_w)


@pytest.mark.parametrize("case", list(CASES))
def test_a_whole_model_on_the_triton_kernels_gives_the_dense_with_zeros_logits(tmp_path, case):
    d = _saved(tmp_path, **CASES[case])
    ids = tiny_ids(1, 12, seed=3)
    want = _reference_logits(d, ids)
    model, info = load_sparse(d, kernels="triton", head_dtype="float16" if case == "tied-head" else "float32")
    assert info.kernels == "triton" and len(info.sparse) >= 14 and not info.dense
    if "int4" in case:  # codes and group scales as stored
        assert sum(isinstance(m, Q4SparseLinear) for m in model.modules()) == 14
    with torch.no_grad():
        prefill = model(ids).logits  # 12 tokens: each layer expanded by the kernel, then the dense GEMM
        decode = torch.cat([model(ids[:, : t + 1]).logits[:, -1:] for t in range(3)], 1)  # the matrix-vector kernel
    if case == "tied-head":  # the head in fp16: the same model on the CPU kernels (or torch path) is the reference
        cpu, _ = load_sparse(d, head_dtype="float16")
        with torch.no_grad():
            want = cpu(ids).logits
    torch.testing.assert_close(prefill, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decode, want[:, :3], rtol=1e-4, atol=1e-4)


def test_a_wrong_call_is_refused_before_the_kernel_reads_out_of_bounds():
    w = _sparse(8, 64, 0.3, seed=0).half()
    mask, values = bitmask_encode(w)
    lin = SparseLinear(64, 8, mask, values, kernels=TK)
    with pytest.raises(ValueError, match=r"input must be contiguous float32 \(B x 64\)"):
        TK.bitmask_matmul(torch.randn(1, 64).double(), lin.mask, lin.values, lin.row_ptr, 8)
    with pytest.raises(ValueError, match="does not fit a 16 x 64 layer"):
        TK.bitmask_matmul(torch.randn(1, 64), lin.mask, lin.values, lin.row_ptr, 16)


@pytest.mark.parametrize("head", ["float32", "float16"])
def test_moving_to_a_device_keeps_a_tied_head_and_embedding_one_tensor(tmp_path, head):
    """``Module.to`` would give each of the two modules its own copy on the device (the meta device stands in for a
    GPU here: what is checked is that both modules hold one moved tensor)."""
    from mixsparse.runtime.load import to_device

    model, _ = load_sparse(_saved(tmp_path, 0.7, tied=True), head_dtype=head)
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    a, b = (emb.weight_lowp, out.weight) if head == "float16" else (emb.weight, out.weight)
    assert a.untyped_storage()._cdata == b.untyped_storage()._cdata  # shared on the CPU
    to_device(model, torch.device("meta"))
    a, b = (emb.weight_lowp, out.weight) if head == "float16" else (emb.weight, out.weight)
    assert a.is_meta and b.is_meta and a.untyped_storage()._cdata == b.untyped_storage()._cdata
    assert all(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def test_kernel_choices_that_cannot_work_are_refused_in_one_line(tmp_path, monkeypatch):
    from mixsparse.runtime import kernels

    with pytest.raises(ConfigError, match="kernels must be one of auto, compiled, triton, torch"):
        load_sparse(tmp_path, kernels="cuda")
    with pytest.raises(ConfigError, match="runs on the CPU only: leave kernels at 'auto'"):
        load_sparse(tmp_path, device="cuda", kernels="torch")
    with pytest.raises(ConfigError, match="runs on cpu or cuda, not mps"):
        load_sparse(tmp_path, device="mps")
    monkeypatch.setattr(kernels, "_loaded", lambda: (None, "no compiler"))
    with pytest.raises(ConfigError, match=r"compiled sparse kernels are unavailable \(no compiler\)"):
        load_sparse(tmp_path, kernels="compiled")  # named: no quiet fallback (auto falls back with a warning)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match=r"only in Triton's interpreter \(TRITON_INTERPRET=1"):
        load_sparse(tmp_path, kernels="triton")


COMPILE = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mixsparse.runtime import _triton_jit as J

ptrs = ("mask_ptr", "vals_ptr", "codes_ptr", "scale_ptr", "zero_ptr", "rowptr_ptr")
# (FMT, ASYM, the pointers' element types): every format with the dtypes the loader gives it
cases = [(0, False, ("u8", "fp16", "fp16", "fp16", "fp16", "i64")), (0, False, ("u8", "bf16", "bf16", "bf16", "bf16", "i64")),
         (0, False, ("u8", "fp32", "fp32", "fp32", "fp32", "i64")),
         (1, False, ("u8", "u8", "u8", "fp16", "u8", "i64")), (1, True, ("u8", "u8", "u8", "bf16", "u8", "i64")),
         (1, True, ("u8", "u8", "u8", "fp32", "u8", "i64")),
         (2, False, ("fp16", "fp16", "fp16", "fp16", "fp16", "fp16")), (2, False, ("bf16",) * 6),
         (2, True, ("i8", "i8", "i8", "fp32", "i8", "i8"))]
for kernel, head in ((J.matmul, ("x_ptr", "y_ptr")), (J.expand, ("out_ptr",))):
    for fmt, asym, types in cases:
        sig = {p: "*fp32" for p in head} | {p: "*" + t for p, t in zip(ptrs, types)}
        sig |= {"N": "i32", "K": "i32", "G": "i32"} | dict.fromkeys(("BLOCK_R", "BLOCK_K", "FMT", "ASYM"), "constexpr")
        src = ASTSource(kernel, sig, constexprs={"BLOCK_R": J_BLOCK_R, "BLOCK_K": J_BLOCK_K, "FMT": fmt, "ASYM": asym})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert len(k.asm["cubin"]) > 1000 and ".entry " + kernel.__name__ in k.asm["ptx"], (kernel.__name__, fmt)
print("compiled", 2 * len(cases))
'''


def test_the_kernels_compile_for_a_hopper_gpu_without_one():
    """The interpreter runs the kernels' Python; this compiles them to sm_90 machine code (H100/H200), which
    the interpreter does not check (types, a branch the compiler refuses), with no GPU present."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    code = COMPILE.replace("J_BLOCK_R", str(BLOCK_R)).replace("J_BLOCK_K", str(BLOCK_K))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled 18" in proc.stdout, proc.stderr[-3000:]

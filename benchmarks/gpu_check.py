"""The GPU check: every stage of mixsparse on a real accelerator, as one command of a few minutes.

GPU time comes in short slots (one H200, ~15 minutes in all, at most 10 per command, no network), so
this is one prepared script that records everything it measures, step by step, and keeps going when a
step fails (the failure and its traceback are recorded, and the exit status says so):

1. ``placement_tests``: ``tests/test_placement.py`` with the real device in place of the simulated one
   (``MIXSPARSE_TEST_DEVICE``): every stage's numbers against the CPU's on a tiny model, the model back home.
2. On a randomly initialised model of Llama-3-8B's block shape (``--layers`` of its 32 blocks, bf16, built
   on the device; no weights needed: shapes alone set time and memory), calibrated on real text:
   ``wanda_70`` and ``sparsegpt_70`` (uniform 70%), ``msp_whole`` and ``msp_blockwise`` (level database +
   a few generations of the search, with the model on the device or at home on the CPU).
3. ``moe_50``: a two-block Mixtral-shaped model (fused experts) pruned to 50% by Wanda and SparseGPT on the
   device, experts included.
4. On a two-block model of the same shape: ``recovery_blockwise`` (block-wise reconstruction after Wanda
   70%, zeros checked), ``gptq_4bit`` (4-bit group-128 GPTQ with the mask fixed), ``export_compressed``
   (compressed checkpoint written, read back, compared bit-exactly).
5. The sparse runtime's Triton kernels: ``runtime_kernel`` (70% layers of a 7B model's MLP shapes, bitmask fp16
   and int4: error, time against the dense fp16 GEMV and against the bound of their bytes at the measured copy
   bandwidth) and ``runtime_model`` (a 2-block model of the shape loaded by ``load_sparse(device=...)``: logits
   and greedy tokens against the dense-with-zeros model, decode tokens/s against dense fp16 and float32).

Writes ``<out>/check.json`` (after each step) and ``<out>/check.md``. The kit (tokenizer + a few hundred
KB of real text) comes from ``python benchmarks/gpu_kit.py`` (writes ``.gpu_kit/``, which travels with
the working tree as a carried path). The test suite runs this whole script on the CPU with a tiny shape
(``tests/test_gpu_check.py``), so it cannot rot.

    bash scripts/gpu_check.sh                         # on the GPU machine (see the README)
    python benchmarks/gpu_check.py --shape tiny --device cpu --out /tmp/gpu   # what the test suite runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from common import RESULTS, provenance, write_markdown
from large_model import DTYPES, Shape, llama_config

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class CheckShape(Shape):
    """The engine benchmark's shape (samples x seqlen: calibration windows) and the search's size."""

    fitness_windows: int = 2
    generations: int = 3


SHAPES = {
    # Llama-3-8B's blocks (GQA 32/8 heads, 14336 MLP, 128k vocabulary); 8 of its 32 blocks by default
    "8b": CheckShape(hidden=4096, intermediate=14336, layers=8, heads=32, kv_heads=8, vocab=128256, samples=16,
                     seqlen=512, rope_theta=500000.0, fitness_windows=2, generations=3),
    "tiny": CheckShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512, samples=4, seqlen=32,
                       fitness_windows=2, generations=2),
}


def build(shape: CheckShape, layers: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A random model built directly on ``device`` (no CPU copy, no float32 copy)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(replace(shape, layers=layers, vocab=vocab), dtype),
                                                 dtype=dtype)
    return model.eval()


def load_kit(kit: Path, vocab: int, shape: CheckShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration and fitness windows of real text, tokenized by the kit's tokenizer."""
    from transformers import AutoTokenizer

    from mixsparse.data import calibration_ids, eval_windows

    if not (kit / "tokenizer").is_dir():
        raise FileNotFoundError(f"{kit}/tokenizer is missing: run `python benchmarks/gpu_kit.py` first")
    tok = AutoTokenizer.from_pretrained(kit / "tokenizer")
    if len(tok) > vocab:
        raise ValueError(f"the kit's tokenizer has {len(tok)} tokens, more than the model's {vocab}")
    calib = calibration_ids(tok, (kit / "calibration.txt").read_text(), shape.samples, shape.seqlen, seed=0)
    fit = eval_windows(tok, (kit / "validation.txt").read_text(), shape.seqlen, shape.fitness_windows * shape.seqlen)
    return calib, fit


class Check:
    """Runs steps, records each (ok, figures or error) and rewrites the JSON after each one."""

    def __init__(self, out: Path, meta: dict, deadline: float):
        self.out, self.deadline, self.t0 = out, deadline, time.perf_counter()
        self.data = {"meta": meta, "steps": {}}
        out.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, fn, device: torch.device) -> dict | None:
        elapsed = time.perf_counter() - self.t0
        if elapsed > self.deadline:
            self.data["steps"][name] = {"ok": False, "error": f"not started: {elapsed:.0f} s past the start, "
                                                              f"over --deadline {self.deadline:.0f} s"}
            self._save()
            return None
        print(f"[{elapsed:6.1f} s] {name} ...", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            res = fn() or {}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                res["peak_device_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            res = {"ok": bool(res.pop("ok", True)), "seconds": round(time.perf_counter() - t0, 2), **res}
        except Exception as e:  # noqa: BLE001 - a failed step is recorded and the check goes on
            res = {"ok": False, "seconds": round(time.perf_counter() - t0, 2), "error": f"{type(e).__name__}: {e}"[:2000],
                   "traceback": traceback.format_exc()[-4000:]}
        self.data["steps"][name] = res
        print(f"    -> {json.dumps({k: v for k, v in res.items() if k != 'traceback'})[:600]}", flush=True)
        self._save()
        return res

    def _save(self) -> None:
        self.data["meta"]["total_seconds"] = round(time.perf_counter() - self.t0, 1)
        (self.out / "check.json").write_text(json.dumps(self.data, indent=1) + "\n")

    @property
    def ok(self) -> bool:
        return all(s["ok"] for s in self.data["steps"].values())


def placement_tests(device: torch.device, out: Path) -> dict:
    """The stage tests with the real device (or, on a CPU, the simulated one) in a child pytest."""
    xml = out / "placement-junit.xml"
    env = dict(os.environ)
    if device.type != "cpu":
        env["MIXSPARSE_TEST_DEVICE"] = str(device)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_placement.py", f"--junitxml={xml}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    cases = ET.parse(xml).getroot().iter("testcase") if xml.exists() else []
    passed, failed, skipped = [], [], []
    for c in cases:
        name = c.get("name")
        bad = c.find("failure") if c.find("failure") is not None else c.find("error")
        if bad is not None:
            failed.append({"test": name, "message": (bad.get("message") or "")[:600]})
        elif c.find("skipped") is not None:
            skipped.append(name)
        else:
            passed.append(name)
    xml.unlink(missing_ok=True)
    res = {"ok": proc.returncode == 0 and not failed and passed != [], "passed": len(passed), "failed": failed,
           "skipped": skipped, "device": str(device) if device.type != "cpu" else "simulated"}
    if proc.returncode != 0 and not failed:
        res["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
    return res


def prune_step(model, calib, pruner: str, device: torch.device, layers: int) -> dict:
    from mixsparse.engine import prune_layerwise
    from mixsparse.modeling import measured_sparsity, param_counts
    from mixsparse.sparsity import SparsityMap

    t0 = time.perf_counter()
    prune_layerwise(model, calib, SparsityMap.uniform(0.7, param_counts(model)), pruner, device=device, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    _, sparsity = measured_sparsity(model)
    return {"measured_sparsity": round(sparsity, 6), "seconds_per_block": round(seconds / layers, 3),
            "ok": abs(sparsity - 0.7) < 0.01}


def search_step(model, calib, fit_windows, device: torch.device, mode: str, generations: int) -> dict:
    from mixsparse.modeling import param_counts
    from mixsparse.placement import Placement
    from mixsparse.search import Fitness, LevelDatabase, LevelSpace, SearchConfig, evolutionary_search

    space = LevelSpace.unstructured(0.7, param_counts(model), step=0.05, max_shift=0.1)
    placement = Placement(device, mode)
    t0 = time.perf_counter()
    db = LevelDatabase.build(model, space, calib, "wanda", device=placement, progress=False)
    build_s = time.perf_counter() - t0
    with db:
        fit = Fitness(db, fit_windows, "kl", device=placement, placement=mode, dtype="model", incremental=True)
        ref_s = time.perf_counter() - t0 - build_s
        cfg = SearchConfig(generations=generations, population=2, offspring=4, stages=[[1, 2], [fit_windows.shape[0], 1]],
                           patience=generations + 1, seed=0)
        res = evolutionary_search(fit, space, [{n: 0 for n in space.param_counts}], cfg, progress=False)
        del fit
    return {"placement": mode, "model_home": str(next(model.parameters()).device),
            "level_database_seconds": round(build_s, 2), "dense_reference_seconds": round(ref_s, 2),
            "generations": res.generations, "evaluations": res.evaluations,
            "seconds_per_generation": round(res.seconds / max(res.generations, 1), 3),
            "best_fitness": res.fitness, "average_sparsity": round(res.sparsity_map.average(), 6)}


def recovery_step(model, calib, device: torch.device) -> dict:
    from mixsparse.engine import prune_layerwise
    from mixsparse.modeling import param_counts, prunable_linears
    from mixsparse.recovery.blockwise import reconstruct_blockwise
    from mixsparse.recovery.common import DenseStore
    from mixsparse.recovery.options import BlockwiseOptions
    from mixsparse.sparsity import SparsityMap

    with tempfile.TemporaryDirectory() as d:
        dense = DenseStore.snapshot(model, Path(d) / "dense", "gpu-check")
        prune_layerwise(model, calib, SparsityMap.uniform(0.7, param_counts(model)), "wanda", device=device,
                        progress=False)
        zeros = {n: (lin.weight == 0).clone() for n, lin in prunable_linears(model).items()}
        t0 = time.perf_counter()
        rec = reconstruct_blockwise(model, calib, dense, BlockwiseOptions(epochs=2, batch_size=2, lr=1e-4), device=device,
                                    progress=False)
        seconds = time.perf_counter() - t0
    kept = all(torch.equal(lin.weight == 0, zeros[n]) for n, lin in prunable_linears(model).items())
    blocks = [{k: b.get(k) for k in ("block", "mse_before", "mse_after", "master_weights")} for b in rec["blocks"]]
    # lr 1e-4 on a bf16 model: updates below bf16's resolution, which only float32 master weights keep
    return {"ok": kept and all(b["mse_after"] < b["mse_before"] for b in blocks), "zeros_unchanged": kept,
            "blocks": blocks, "recovery_seconds": round(seconds, 2), "autocast": rec["autocast"]}


def moe_step(shape: CheckShape, calib, device: torch.device, dtype: torch.dtype) -> dict:
    """Fused MoE experts on the device: a 2-block Mixtral-shaped model (8 experts, top-2; the shape's hidden size,
    a quarter of its MLP per expert) pruned to 50% by Wanda and SparseGPT, every expert from its routed tokens
    (the observation loop is checked against the device's grouped_mm kernel on the first batch)."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from mixsparse.engine import prune_layerwise
    from mixsparse.modeling import coverage, measured_sparsity, param_counts
    from mixsparse.sparsity import SparsityMap

    cfg = MixtralConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate // 4,
                        num_hidden_layers=2, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=max(2048, shape.seqlen),
                        tie_word_embeddings=False, dtype=dtype)
    out = {}
    for pruner in ("wanda", "sparsegpt"):
        torch.manual_seed(2)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        t0 = time.perf_counter()
        rep = prune_layerwise(model, calib, SparsityMap.uniform(0.5, param_counts(model)), pruner, device=device,
                              progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        _, sparsity = measured_sparsity(model)
        experts = coverage(model)["by_kind"]["experts"]
        out[pruner] = {"seconds": round(time.perf_counter() - t0, 2), "measured_sparsity": round(sparsity, 6),
                       "experts_sparsity": round(experts["sparsity"], 6), "starved_layers": len(rep.fallbacks)}
        del model
    out["ok"] = all(abs(v["measured_sparsity"] - 0.5) < 0.01 and abs(v["experts_sparsity"] - 0.5) < 0.01
                    for v in out.values())
    return out


def gptq_step(model, calib, device: torch.device) -> dict:
    from mixsparse.modeling import prunable_linears
    from mixsparse.quant.grid import QuantSpec
    from mixsparse.quant.stage import quantize_model

    zeros = {n: (lin.weight == 0).clone() for n, lin in prunable_linears(model).items()}
    codes, rec = quantize_model(model, "gptq", QuantSpec(bits=4, group_size=min(128, model.config.hidden_size // 2)), calib, device=device, progress=False)
    kept = all(torch.equal(lin.weight[zeros[n]], torch.zeros_like(lin.weight[zeros[n]]))
               for n, lin in prunable_linears(model).items())
    return {"ok": kept and len(codes) == len(zeros), "layers": len(codes), "scheme": rec["scheme"],
            "zeros_kept": kept}, codes


def export_step(model, codes, device: torch.device) -> dict:
    from mixsparse.export import load_compressed, save_compressed

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        sizes = save_compressed(model, Path(d) / "c", dtype=None, quantized=codes)
        write_s = time.perf_counter() - t0
        back = load_compressed(Path(d) / "c")
        read_s = time.perf_counter() - t0 - write_s
        mine = {n: p.detach().cpu() for n, p in model.named_parameters()}
        theirs = dict(back.named_parameters())
        exact = mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n].detach()) for n in mine)
    return {"ok": exact, "bit_exact": exact, "write_seconds": round(write_s, 2), "read_seconds": round(read_s, 2),
            **{k: v for k, v in sizes.items() if isinstance(v, (int, float))}}


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of one ``fn()`` after two warm-up calls, as a caller sees it (Python and launches included)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _gpu_time(fn, device: torch.device) -> float:
    """Seconds of ``fn``'s GPU work alone, replayed from a CUDA graph (a small layer's kernel takes less time than
    Python takes to launch it, so timing calls would time the launch); the CPU has no such split: its call time."""
    if device.type != "cuda":
        return _timed(fn, device, 50)
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=50, return_mode="median") / 1e3


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Bytes read + written per second by a device-to-device copy of ``mib`` MiB (the bound a GEMV can reach)."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _gpu_time(lambda: dst.copy_(src), device)


def runtime_kernel_step(shape: CheckShape, device: torch.device) -> dict:
    """The sparse runtime's matrix-vector kernel (Triton on a GPU, the compiled one on a CPU) on 70%-sparse layers
    of a 7B model's MLP shapes (the tiny shape's on a CPU): exact against the dense product, its time against the
    dense fp16 GEMV and against the bound set by its bytes at the device's copy bandwidth."""
    from mixsparse.export import bitmask_encode, quantized_encode
    from mixsparse.quant.grid import QuantSpec, quantize_rtn
    from mixsparse.runtime import kernels as cpu_kernels
    from mixsparse.runtime.linear import Q4SparseLinear, SparseLinear
    from mixsparse.runtime.triton_kernels import TritonKernels

    kern = TritonKernels() if device.type == "cuda" else cpu_kernels.get()
    if kern is None:
        return {"ok": False, "error": f"no kernels here: {cpu_kernels.reason()}"}
    big = shape.hidden >= 1024
    shapes = [(11008, 4096), (4096, 11008)] if big else [(shape.intermediate, shape.hidden)]
    bw = copy_bandwidth(device, 1024 if big else 64)
    out, ok = {"copy_bandwidth_gbs": round(bw / 1e9, 1), "backend": getattr(kern, "name", "compiled")}, True
    for rows, cols in shapes:
        torch.manual_seed(rows)
        w = torch.randn(rows, cols)
        w[torch.rand(rows, cols) < 0.7] = 0
        x = torch.randn(1, cols, device=device)
        mask, values = bitmask_encode(w.half())
        qw = quantize_rtn(w, QuantSpec(4, 128 if big else 16, True), "w")
        _, parts = quantized_encode(qw)
        layers = {"bitmask-fp16": SparseLinear(cols, rows, mask, values, kernels=kern),
                  "bitmask-int4": Q4SparseLinear(cols, rows, parts["bitmask"], parts["codes"], parts["scale"], None,
                                                 kernels=kern)}
        # the exact products (float64 on the CPU) each format's kernel must give
        want = {"bitmask-fp16": x.double().cpu() @ w.half().double().t(),
                "bitmask-int4": x.double().cpu() @ qw.dequantize().double().t()}

        def rel_err(fmt: str) -> float:
            return float((layers[fmt](x).double().cpu() - want[fmt]).abs().max() / want[fmt].abs().max())

        dense16 = w.half().to(device)
        x16 = x.half()
        entry = {"dense_fp16_us": round(_gpu_time(lambda: x16 @ dense16.t(), device) * 1e6, 1)}
        for fmt, lin in layers.items():
            lin.to(device)
            err = rel_err(fmt)
            sec = _gpu_time(lambda lin=lin: lin(x), device)
            moved = lin.weight_bytes() + 4 * (cols + rows)  # the packed weight, the input and the output
            entry[fmt] = {"us": round(sec * 1e6, 1), "call_us": round(_timed(lambda lin=lin: lin(x), device, 50) * 1e6, 1),
                          "bound_us": round(moved / bw * 1e6, 1), "over_bound": round(sec * bw / moved, 2),
                          "weight_bytes": lin.weight_bytes(),
                          "speedup_vs_dense_fp16": round(entry["dense_fp16_us"] / (sec * 1e6), 2),
                          "max_rel_error": float(f"{err:.3g}")}
            ok &= err < 1e-5
        if device.type == "cuda" and rows == shapes[0][0]:  # the tile shape, for the next session to choose
            from mixsparse.runtime import triton_kernels as TK

            lin, chosen = layers["bitmask-fp16"], (TK.BLOCK_R, TK.BLOCK_K)
            entry["tiles_us"] = {}
            try:
                for r, k in ((8, 128), (16, 64), (16, 128), (16, 256), (32, 128), (32, 256), (64, 64)):
                    TK.BLOCK_R, TK.BLOCK_K = r, k
                    err = rel_err("bitmask-fp16")
                    entry["tiles_us"][f"{r}x{k}"] = round(_gpu_time(lambda: lin(x), device) * 1e6, 1)
                    ok &= err < 1e-5
            finally:
                TK.BLOCK_R, TK.BLOCK_K = chosen
        out[f"{rows}x{cols}"] = entry
    out["ok"] = ok
    return out


def runtime_model_step(shape: CheckShape, calib, device: torch.device, dtype: torch.dtype) -> dict:
    """A 2-block model of the shape (32k vocabulary), Wanda 70%, saved compressed (fp16 values; 4-bit codes), loaded
    by the sparse runtime on the device: logits against the dense-with-zeros model on the device, greedy tokens,
    and decode tokens/s in one loop against the dense model in fp16 and float32."""
    from mixsparse.engine import prune_layerwise
    from mixsparse.export import load_compressed, save_compressed
    from mixsparse.modeling import param_counts
    from mixsparse.quant.grid import QuantSpec
    from mixsparse.quant.stage import quantize_model
    from mixsparse.runtime import load_sparse
    from mixsparse.runtime.decode import greedy
    from mixsparse.sparsity import SparsityMap

    vocab = min(shape.vocab, 32000)
    model = build(shape, 2, vocab, dtype, device, seed=2)
    calib = calib.clamp_max(vocab - 1)
    prune_layerwise(model, calib, SparsityMap.uniform(0.7, param_counts(model)), "wanda", device=device, progress=False)
    new = 64 if shape.hidden >= 1024 else 8
    prompt = calib[:1, :128].to(device)
    out, ok = {}, True
    with tempfile.TemporaryDirectory() as d:
        save_compressed(model, Path(d) / "fp16", dtype=torch.float16)
        codes, _ = quantize_model(model.float(), "rtn", QuantSpec(4, 128 if shape.hidden >= 1024 else 16, True),
                                  progress=False)
        save_compressed(model, Path(d) / "int4", dtype=torch.float16, quantized=codes)
        del model
        for fmt in ("fp16", "int4"):
            ref = load_compressed(Path(d) / fmt, dtype=torch.float32).to(device).eval()
            sparse, info = load_sparse(Path(d) / fmt, device=device)
            with torch.no_grad():
                want, got = ref(prompt).logits, sparse(prompt).logits  # the prompt: expansion + dense GEMM
                step_want = ref(prompt[:, :5]).logits[:, -1]
                step_got = sparse(prompt[:, :5]).logits[:, -1]  # 5 tokens: the matrix-vector kernel
            scale = float(want.abs().max())
            err = max(float((want - got).abs().max()), float((step_want - step_got).abs().max())) / scale
            a, b = greedy(ref, prompt, new), greedy(sparse, prompt, new)
            same = sum(x == y for x, y in zip(a.tokens, b.tokens))
            out[f"bitmask-{fmt}@0.7"] = {"kernels": info.kernels, "sparse_layers": len(info.sparse),
                                          "dense_layers": len(info.dense), "max_rel_logit_error": float(f"{err:.3g}"),
                                          "same_greedy_tokens": f"{same}/{new}", "tokens_per_s": round(b.tokens_per_s, 1),
                                          "weight_bytes": info.weight_bytes}
            ok &= err < 1e-4 and not info.dense
            if fmt == "fp16":
                out["dense-fp32@0"] = {"tokens_per_s": round(a.tokens_per_s, 1)}
                half = ref.half()
                out["dense-fp16@0"] = {"tokens_per_s": round(greedy(half, prompt, new).tokens_per_s, 1)}
                del half
            del ref, sparse
    out["ok"] = ok
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="decoder blocks of the big model (default: the shape's)")
    ap.add_argument("--device", default="auto", help="cuda, cuda:N or cpu; auto = cuda if available")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--kit", default=str(REPO / ".gpu_kit"))
    ap.add_argument("--out", default=str(RESULTS / "gpu"))
    ap.add_argument("--deadline", type=float, default=420.0, help="seconds after which no new step starts")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device")
    shape = SHAPES[args.shape]
    if args.layers:
        shape = replace(shape, layers=args.layers)
    dtype = DTYPES[args.dtype]
    skip = set(filter(None, args.skip.split(",")))
    meta = {**provenance(argv), "shape": args.shape, "layers": shape.layers, "dtype": args.dtype,
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cuda": torch.version.cuda, "settings": shape.__dict__}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    check = Check(Path(args.out), meta, args.deadline)
    steps = {}

    def step(name, fn):
        if name not in skip:
            steps[name] = check.run(name, fn, device)

    step("placement_tests", lambda: placement_tests(device, Path(args.out)))

    calib, fit_windows = load_kit(Path(args.kit), shape.vocab, shape)
    model = build(shape, shape.layers, shape.vocab, dtype, device)
    meta["big_model_params"] = sum(p.numel() for p in model.parameters())
    meta["calibration"] = list(calib.shape)

    def fresh():  # each pruner starts from dense weights: rebuild in place of the pruned one
        nonlocal model
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = build(shape, shape.layers, shape.vocab, dtype, device)
        return model

    step("wanda_70", lambda: prune_step(model, calib, "wanda", device, shape.layers))
    step("sparsegpt_70", lambda: prune_step(fresh(), calib, "sparsegpt", device, shape.layers))
    step("msp_whole", lambda: search_step(fresh(), calib, fit_windows, device, "whole", shape.generations))
    # the same model at home on the CPU, blocks sent to the device one at a time
    step("msp_blockwise", lambda: search_step(model.to("cpu"), calib, fit_windows, device, "blockwise",
                                              shape.generations))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    step("moe_50", lambda: moe_step(shape, calib, device, dtype))
    small = build(shape, 2, shape.vocab, dtype, device, seed=1)
    step("recovery_blockwise", lambda: recovery_step(small, calib, device))
    codes = {}

    def gptq():
        res, c = gptq_step(small, calib, device)
        codes.update(c)
        return res

    step("gptq_4bit", gptq)
    step("export_compressed", lambda: export_step(small, codes, device))
    step("runtime_kernel", lambda: runtime_kernel_step(shape, device))
    step("runtime_model", lambda: runtime_model_step(shape, calib, device, dtype))
    check._save()
    render(check.data, Path(args.out) / "check.md")
    print("GPU check:", "all steps passed" if check.ok else "FAILED: " + ", ".join(
        n for n, s in check.data["steps"].items() if not s["ok"]), flush=True)
    return 0 if check.ok else 1


FIGURES = ("seconds", "copy_bandwidth_gbs", "seconds_per_block", "seconds_per_generation", "level_database_seconds",
           "dense_reference_seconds", "recovery_seconds", "write_seconds", "read_seconds", "peak_device_mb",
           "measured_sparsity", "best_fitness", "passed")


def render(data: dict, path: Path) -> None:
    m = data["meta"]
    lines = ["# GPU check", "",
             f"{m['device_name']} ({m['device']}), torch {m['machine']['torch']}, CUDA {m['cuda']}, transformers "
             f"{m.get('transformers')}; {m['dtype']}; big model: {m['layers']} blocks of the `{m['shape']}` shape "
             f"({m.get('big_model_params', 0) / 1e9:.2f} B parameters), calibration {m.get('calibration')} tokens.",
             "", f"Command: `{m['command']}` at commit {m['commit']}, {m['date']}; {m['total_seconds']} s in all.", "",
             "| step | ok | figures |", "|---|---|---|"]
    for name, s in data["steps"].items():
        figs = ", ".join(f"{k} {s[k]}" for k in FIGURES if k in s)
        if not s["ok"]:
            figs += ("; " if figs else "") + str(s.get("error") or s.get("failed") or s.get("output_tail", ""))[:300]
        lines.append(f"| {name} | {'yes' if s['ok'] else '**no**'} | {figs} |")
    details = {n: {k: v for k, v in s.items() if k not in FIGURES and k not in ("ok", "traceback", "error")}
               for n, s in data["steps"].items()}
    lines += ["", "Details:", "", "```json", json.dumps(details, indent=1)[:6000], "```"]
    write_markdown(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

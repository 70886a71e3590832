"""Decode speed and memory of pruned models on the sparse runtime against the dense model, in the same loop.

Prunes the embedded model (Wanda, uniform, 32 x 512 calibration windows) and writes its compressed checkpoint
in each format, then measures each variant in a fresh process (``python -m mixsparse.runtime.bench``): batch 1,
128 new tokens after a 128-token prompt of test text, median of 5. Keys ``"<format>@<sparsity>"``:

* ``dense-fp32@0``, ``dense-bf16@0``: the unpruned model densified, in mixsparse's greedy loop;
* ``hf-dense-fp32@0``: the same model through ``model.generate()`` (what users run today);
* ``bitmask-fp16@0.7``, ``bitmask-bf16@0.7``, ``bitmask-int4@0.7`` (RTN 4-bit, group 64: codes and scales as
  stored), ``nm-fp16@0.5`` (2:4, as bitmask + values), and ``+head-fp16`` / ``+head-int8`` variants (the tied
  head and embedding held in fp16, or int8 with one scale per row, through the dense-row kernel).

Each entry has ``tokens_per_s``, ``peak_rss_mb``, ``weight_bytes`` and ``bytes_per_token_read`` (the weights a
decode step multiplies: every linear and the head), with the machine's measured read and copy bandwidth and the
tokens/s bound the read bandwidth implies, and the test perplexity of the model as the runtime computes it (8,192
wiki test tokens: what a lossy part, such as the int8 head, costs). Also a per-layer kernel entry (one MLP projection at 70%,
per stored kind and instruction set, streamed from memory and hot in the caches): its time against its bandwidth bound. Run it alone (a second torch process on 2 cores slows both).

    python benchmarks/runtime.py --dir /tmp/msrt
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import AVX2_ENV, RESULTS, Results, fmt, produced_by, provenance_lines, write_markdown

FORMATS = ("dense-fp32@0", "dense-bf16@0", "hf-dense-fp32@0", "bitmask-fp16@0.7", "bitmask-fp16+head-fp16@0.7",
           "bitmask-bf16@0.7", "bitmask-int4@0.7", "bitmask-int4+head-fp16@0.7", "bitmask-int4+head-int8@0.7",
           "nm-fp16@0.5")
HEADS = {"head-fp16": "float16", "head-int8": "int8"}  # a format's "+head-..." part: the head's dtype


def bandwidth() -> dict:
    """Read (a sum over 512 MiB) and copy (512 MiB to another buffer, read + write bytes) bandwidth, GB/s, best of 5."""
    a = torch.ones(128 * 2**20, dtype=torch.float32)
    b = torch.empty_like(a)
    reads, copies = [], []
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        reads.append(a.numel() * 4 / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        b.copy_(a)
        copies.append(2 * a.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return {"read_gb_s": round(max(reads), 2), "copy_gb_s": round(max(copies), 2), "threads": torch.get_num_threads()}


def checkpoints(root: Path, calib_samples: int) -> dict[str, Path]:
    """The compressed checkpoint of each format (made once; kept in ``root`` for reruns)."""
    from mixsparse.data import Calibration
    from mixsparse.config import RunConfig
    from mixsparse.engine import prune_layerwise
    from mixsparse.export import save_compressed
    from mixsparse.loading import load_model
    from mixsparse.modeling import param_counts
    from mixsparse.quant.grid import QuantSpec
    from mixsparse.quant.stage import quantize_model
    from mixsparse.sparsity import NM, SparsityMap

    want = {"dense@0": (0.0, torch.float16, None), "fp16@0.7": (0.7, torch.float16, None),
            "bf16@0.7": (0.7, torch.bfloat16, None), "int4@0.7": (0.7, torch.float16, QuantSpec(4, 64, True)),
            "nm@0.5": (NM(2, 4), torch.float16, None)}
    out = {}
    for key, (target, dtype, quant) in want.items():
        d = root / key
        out[key] = d
        if (d / "compression.json").is_file():
            continue
        model, tok = load_model("embedded")
        cfg = RunConfig()
        ids = Calibration(tok, cfg).ids(calib_samples, 512)
        smap = SparsityMap.uniform(target, param_counts(model))
        if target != 0.0:
            prune_layerwise(model, ids, smap, "wanda", device="cpu", progress=False)
        codes = quantize_model(model, "rtn", quant, progress=False)[0] if quant else {}
        save_compressed(model, d, dtype=dtype, sparsity_map=smap, tokenizer=tok, quantized=codes, overwrite=True)
        print(f"checkpoint {key} written", flush=True)
    return out


def run_variant(variant: str, path: Path, args, head: str = "float32", avx2: bool = False) -> dict:
    """One variant in a fresh process; ``avx2``: torch's kernels and mixsparse's capped at AVX2 (a CPU without
    AVX-512, as the 2-core AMD EPYC of the issue)."""
    import os

    cmd = [sys.executable, "-m", "mixsparse.runtime.bench", variant, str(path), "--prompt", str(args.prompt),
           "--new", str(args.new), "--repeats", str(args.repeats), "--head-dtype", head, "--isa", "1" if avx2 else "-1"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(AVX2_ENV if avx2 else {})})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def loaded_facts(variant: str, path: Path, head: str, ppl_tokens: int = 8192) -> dict:
    """From one load of the variant in this process: ``bytes_per_token_read``, the weight bytes a decode step
    multiplies (every sparse or dense linear including the head; the embedding table only through a tied head: a
    lookup reads one row), and (sparse and dense fp32) ``test_ppl`` on the first ``ppl_tokens`` wiki test tokens
    (512-token windows), the model as the runtime computes it."""
    from torch import nn
    from transformers import AutoTokenizer

    from mixsparse.data import eval_windows, load_corpus
    from mixsparse.evaluation import perplexity
    from mixsparse.runtime import SparseLinear
    from mixsparse.runtime.bench import load
    from mixsparse.runtime.load import compressed_dir

    model, _ = load("sparse" if variant == "sparse" else variant.replace("hf-", ""), path, head_dtype=head)
    total = 0
    for m in model.modules():
        if isinstance(m, SparseLinear):
            total += m.weight_bytes()
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    out = {"bytes_per_token_read": total}
    if variant in ("sparse", "dense-fp32"):
        tok = AutoTokenizer.from_pretrained(compressed_dir(path))
        windows = eval_windows(tok, load_corpus("wiki", "test"), 512, ppl_tokens)
        out["test_ppl"] = round(perplexity(model, windows, progress=False), 3)
    return out


def _layers(kind: str, count: int, rows: int = 1536, cols: int = 576, sparsity: float = 0.7) -> list:
    """``count`` distinct 70% layers of one stored kind (fp16 / bf16 values, or 4-bit codes as the int4 variant
    stores them: RTN, group 64, symmetric), kernels unset."""
    from mixsparse.export import bitmask_encode, quantized_encode
    from mixsparse.quant.grid import QuantSpec, quantize_rtn
    from mixsparse.runtime.linear import Q4SparseLinear, SparseLinear

    out = []
    for _ in range(count):
        w = torch.randn(rows, cols)
        w[torch.rand_like(w) < sparsity] = 0
        if kind == "int4":
            _, parts = quantized_encode(quantize_rtn(w, QuantSpec(4, 64, True), "w"))
            out.append(Q4SparseLinear(cols, rows, parts["bitmask"], parts["codes"], parts["scale"], None))
        else:
            mask, values = bitmask_encode(w.to(getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[kind])))
            out.append(SparseLinear(cols, rows, mask, values))
    return out


def _timed(f, calls: int, rounds: int = 9) -> float:
    """Median over ``rounds`` of the mean time of ``calls`` calls of ``f`` (after a warm-up), seconds."""
    for _ in range(max(1, calls // 4)):
        f()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            f()
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times)


def layer_kernel(bw: dict, streamed_mb: int = 128) -> dict:
    """One 70% MLP projection of the embedded model's shape (1536 x 576), batch 1, per stored kind (fp16, bf16,
    int4) and instruction set: the kernel's time against the time to read its bytes at the measured read bandwidth,
    timed two ways. ``hot``: the same layer called again and again (its bytes stay in the caches, so this is the
    kernel's instruction cost); ``streamed``: distinct layers called in turn, ``streamed_mb`` MB of them (4x the 32
    MiB L3 of the machines used here), so each call reads its layer from memory, as decoding does (each layer
    once per token).
    The bound compares with ``streamed``. Also a 7B-shaped projection (8192 x 4096, fp16, the faster ISA, hot) and
    dense float32 ``F.linear`` on the small shape."""
    from mixsparse.export import bitmask_encode
    from mixsparse.runtime import SparseLinear, kernels

    torch.manual_seed(0)
    out = {}
    k = kernels.get()
    isas = {} if k is None else {n: i for n, i in (("avx2", 1), ("avx512", 2)) if int(k.isa_level(i)) == i}
    for kind in ("fp16", "bf16", "int4"):
        layers = _layers(kind, 1)
        layers += _layers(kind, -(-streamed_mb * 10**6 // layers[0].weight_bytes()) - 1)
        x = torch.randn(1, 576)
        nbytes = layers[0].weight_bytes()
        bound = nbytes / (bw["read_gb_s"] * 1e9)
        for name, isa in isas.items():
            for lin in layers:
                lin.kernels, lin.isa = k, isa
            hot = _timed(lambda: layers[0]._kernel(x), 400)
            def stream():
                for lin in layers:
                    lin._kernel(x)
            streamed_s = _timed(stream, 3, 7) / len(layers)
            out.setdefault(kind, {})[name] = {
                "hot_us": round(hot * 1e6, 2), "streamed_us": round(streamed_s * 1e6, 2),
                "bound_us": round(bound * 1e6, 2), "streamed_ratio_to_bound": round(streamed_s / bound, 2),
                "hot_ratio_to_bound": round(hot / bound, 2), "bytes": nbytes}
        del layers
    if k is not None:
        w = torch.randn(8192, 4096)
        w[torch.rand_like(w) < 0.7] = 0
        mask, values = bitmask_encode(w.half())
        del w
        lin = SparseLinear(4096, 8192, mask, values, kernels=k)
        x = torch.randn(1, 4096)
        raw = min(_timed(lambda i=i: k.bitmask_matmul(x, lin.mask, lin.values, lin.row_ptr, 8192, i), 20)
                  for i in isas.values())
        bound = lin.weight_bytes() / (bw["read_gb_s"] * 1e9)
        out["large-8192x4096"] = {"kernel_us": round(raw * 1e6, 1), "bound_us": round(bound * 1e6, 1),
                                  "kernel_ratio_to_bound": round(raw / bound, 2), "bytes": lin.weight_bytes()}
    dense = torch.randn(1536, 576)
    x = torch.randn(1, 576)
    out["dense-fp32"] = {"hot_us": round(_timed(lambda: torch.nn.functional.linear(x, dense), 400) * 1e6, 2),
                         "bound_us": round(dense.numel() * 4 / (bw["read_gb_s"] * 1e9) * 1e6, 2)}
    return out


def breakdown(path: Path, bw: dict) -> dict:
    """Where a decode step's time goes on the sparse model (fp16 head): the whole step, the sparse kernels alone
    (every layer called once, batch 1, straight into the extension) and their bandwidth bound, in ms per token."""
    from mixsparse.runtime import SparseLinear, load_sparse
    from mixsparse.runtime.bench import prompt_ids
    from mixsparse.runtime.decode import greedy

    model, _ = load_sparse(path, head_dtype="float16")
    ids = prompt_ids(path, 128)
    greedy(model, ids, 8)
    steps = [1e3 * statistics.median(greedy(model, ids, 33).step_seconds) for _ in range(3)]
    lins = [m for m in model.modules() if isinstance(m, SparseLinear)]
    xs = [torch.randn(1, m.in_features) for m in lins]
    kern = []
    for _ in range(7):
        t = time.perf_counter()
        for m, x in zip(lins, xs):
            m._kernel(x)  # straight into the extension: no reshape, bias or dtype work
        kern.append(1e3 * (time.perf_counter() - t))
    nbytes = sum(m.weight_bytes() for m in lins)
    return {"step_ms": round(statistics.median(steps), 2), "kernels_ms": round(statistics.median(kern), 2),
            "kernels_bound_ms": round(nbytes / (bw["read_gb_s"] * 1e9) * 1e3, 2), "sparse_layers": len(lins),
            "kernel_bytes": nbytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="where the compressed checkpoints are written (kept for reruns)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--avx2", action="store_true", help="also measure each variant with only AVX2 kernels (forced)")
    ap.add_argument("--render", action="store_true", help="only rewrite runtime.md from runtime.json")
    ap.add_argument("--breakdown", action="store_true", help="only measure where a decode step's time goes")
    args = ap.parse_args()
    if args.render:
        render(Results(RESULTS / "runtime.json", None))
        return
    res = Results(RESULTS / "runtime.json", {"command": "python benchmarks/runtime.py " + " ".join(sys.argv[1:]),
                                             "prompt": args.prompt, "new": args.new, "repeats": args.repeats})
    bw = bandwidth()
    if args.breakdown:
        res.add("breakdown@0.7", breakdown(checkpoints(Path(args.dir), args.calib_samples)["fp16@0.7"], bw))
        render(res)
        return
    res.add("bandwidth", bw)
    res.add("kernel-layer@0.7", layer_kernel(bw))
    ck = checkpoints(Path(args.dir), args.calib_samples)
    where = {"bitmask-fp16": "fp16@0.7", "bitmask-bf16": "bf16@0.7", "bitmask-int4": "int4@0.7", "nm-fp16": "nm@0.5"}
    for key in args.formats.split(","):
        fmt_, _ = key.split("@")
        if fmt_.endswith("dense-fp32") or fmt_ == "dense-bf16":
            variant, path, head = fmt_, ck["dense@0"], "float32"
        else:
            variant, path = "sparse", ck[where[fmt_.split("+")[0]]]
            head = next((dt for part, dt in HEADS.items() if part in fmt_), "float32")
        entry = run_variant(variant, path, args, head)
        if args.avx2:  # the same variant with AVX2 kernels only (torch's and mixsparse's)
            forced = run_variant(variant, path, args, head, avx2=True)
            entry["avx2_forced"] = {k: forced[k] for k in ("tokens_per_s", "tokens_per_s_all", "peak_rss_mb", "kernels")
                                    if k in forced}
        entry.update(loaded_facts(variant, path, head))
        entry["bound_tokens_per_s"] = round(bw["read_gb_s"] * 1e9 / entry["bytes_per_token_read"], 1)
        res.add(key, entry)
        print(key, {k: entry[k] for k in ("tokens_per_s", "peak_rss_mb", "weight_bytes", "bytes_per_token_read")},
              flush=True)
    render(res)


def render(res: Results) -> None:
    e, meta = res.data["entries"], res.data["meta"]
    bw = e.get("bandwidth", {})
    base = (e.get("dense-fp32@0") or {}).get("tokens_per_s")
    hf = (e.get("hf-dense-fp32@0") or {}).get("tokens_per_s")
    base_bytes = (e.get("dense-fp32@0") or {}).get("weight_bytes")
    a_base = ((e.get("dense-fp32@0") or {}).get("avx2_forced") or {}).get("tokens_per_s")
    a_hf = ((e.get("hf-dense-fp32@0") or {}).get("avx2_forced") or {}).get("tokens_per_s")
    def avx2(v: dict) -> str:
        a = (v.get("avx2_forced") or {}).get("tokens_per_s")
        if a is None:
            return "—"
        return f"{fmt(a, 1)}, {fmt(a / a_base, 2) if a_base else '—'}x, {fmt(a / a_hf, 2) if a_hf else '—'}x"

    rows = ["| format @ sparsity | tokens/s | vs dense fp32 (same loop) | vs hf generate fp32 | AVX2 forced: tokens/s, "
            "vs dense fp32, vs hf | weight bytes | vs dense fp32 | bytes read / token | read-bandwidth bound, tokens/s | "
            "peak RSS MB | test ppl | kernels |", "|---|" + "---|" * 11]
    for key, v in e.items():
        if "tokens_per_s" not in v:
            continue
        rows.append(f"| {key} | {fmt(v['tokens_per_s'], 1)} | {fmt(v['tokens_per_s'] / base, 2) if base else '—'}x | "
                    f"{fmt(v['tokens_per_s'] / hf, 2) if hf else '—'}x | {avx2(v)} | {v['weight_bytes'] / 2**20:,.1f} MiB | "
                    f"{fmt(v['weight_bytes'] / base_bytes, 2) if base_bytes else '—'}x | "
                    f"{v['bytes_per_token_read'] / 2**20:,.1f} MiB | {fmt(v['bound_tokens_per_s'], 1)} | "
                    f"{fmt(v['peak_rss_mb'], 0)} | {fmt(v.get('test_ppl'))} | {v.get('kernels', 'dense (torch)')} |")
    k = {n: v for n, v in e.get("kernel-layer@0.7", {}).items() if n != "provenance"}
    klines = []
    if any(kind in k for kind in ("fp16", "bf16", "int4")):
        klines = ["| stored | ISA | bytes | read-bandwidth bound, µs | streamed, µs | vs bound | hot, µs | vs bound |",
                  "|---|---|---|---|---|---|---|---|"]
        for kind in ("fp16", "bf16", "int4"):
            for isa, v in (k.get(kind) or {}).items():
                klines.append(f"| {kind} | {isa} | {v['bytes']:,} | {v['bound_us']} | {v['streamed_us']} | "
                              f"{v['streamed_ratio_to_bound']}x | {v['hot_us']} | {v['hot_ratio_to_bound']}x |")
        klines.append("")
    if "large-8192x4096" in k:
        v = k["large-8192x4096"]
        klines.append(f"- 8192x4096 (a 7B-shaped MLP projection, fp16, hot), the faster ISA: {v['kernel_us']} µs, bound "
                      f"{v['bound_us']} µs ({v['kernel_ratio_to_bound']}x the bound)")
    if "dense-fp32" in k:
        v = k["dense-fp32"]
        klines.append(f"- dense float32 `F.linear` of the small shape, hot: {v.get('hot_us', v.get('us'))} µs "
                      f"(read-bandwidth bound {v['bound_us']} µs: it runs from the caches)")
    b = e.get("breakdown@0.7")
    blines = [f"Where a decode step goes (bitmask-fp16+head-fp16@0.7): {b['step_ms']} ms per token, of which the "
              f"{b['sparse_layers']} sparse kernels called alone take {b['kernels_ms']} ms; reading their "
              f"{b['kernel_bytes'] / 2**20:,.1f} MiB at the measured read bandwidth would take {b['kernels_bound_ms']} ms.",
              ""] if b else []
    text = ["# Sparse runtime: decode speed and memory", "", produced_by(meta), "",
            f"Batch 1, {meta.get('new')} new tokens after a {meta.get('prompt')}-token prompt of test text, greedy, median "
            f"of {meta.get('repeats')}; each variant in a fresh process (its own peak RSS). Embedded model "
            "(SmolLM2-135M), Wanda uniform. Measured bandwidth: read "
            f"{bw.get('read_gb_s')} GB/s, copy {bw.get('copy_gb_s')} GB/s (read + write bytes), {bw.get('threads')} threads.",
            "", *rows, "", *blines, "One MLP projection's kernel (1536 x 576 at 70%, batch 1), per stored kind and "
            "instruction set. Streamed: 128 MB of distinct such layers called in turn (4x the L3), so each call reads its "
            "layer from memory, as decoding does; hot: one layer again and again (from the caches: the kernel's "
            "instruction cost). The bound is the layer's bytes at the measured read bandwidth.", "", *klines, "",
            *provenance_lines(e, meta)]
    write_markdown(RESULTS / "runtime.md", "\n".join(text) + "\n")


if __name__ == "__main__":
    main()

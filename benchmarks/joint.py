"""Which layers to prune and which to quantize, in one search: the joint (sparsity, bits) search against dense GPTQ
and pruning + GPTQ at equal bytes of the prunable layers, on the embedded model.

Rows (keys ``<method>@<bits per weight>``, the budget; each entry holds the measured ``bits_per_weight`` and
``prunable_bytes`` of mixsparse's compressed checkpoint at float16, and the test ``ppl``):

* ``gptq4@4.25``, ``gptq3@3.25``: dense GPTQ (group-64 symmetric), sequential (each block sees the quantized ones);
* ``uniform50-gptq4@3.25``: SparseGPT 50% on every layer, sequential, then GPTQ 4-bit with the mask fixed;
* ``msp50-gptq4@3.25``: MSP's search at 50% (Wanda levels, the same generations and fitness as the joint search),
  its map pruned by SparseGPT sequentially, then GPTQ 4-bit with the mask fixed;
* ``joint@B``: allocation joint (per-layer (sparsity, bits) under B bits per weight, bits 2/3/4/8, from the Fisher
  seed at 50%), the searched candidate itself (one-shot: each layer's variant was computed on dense activations);
* ``joint-seq@B``: the same search (its level database and state are reused), each layer then pruned and quantized
  again at its (sparsity, bits), sequentially like the other rows (``search.final: sequential``).

One calibration set (wiki calibration split) for every pruner, GPTQ and level database; the searches score KL to
the dense model on the wiki validation split; perplexity on the wiki test split. Run it alone (2 cores).

    python benchmarks/joint.py
    python benchmarks/joint.py --rows joint@2.75,joint@4.25 --generations 50
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS, Results, command_line, fmt, load_setup, produced_by, provenance_lines, write_markdown
from mixsparse.config import load_config
from mixsparse.engine import prune_layerwise
from mixsparse.evaluation import perplexity
from mixsparse.export import save_compressed
from mixsparse.modeling import measured_sparsity, param_counts
from mixsparse.pipeline import allocate
from mixsparse.placement import Placement
from mixsparse.quant.grid import QuantSpec
from mixsparse.quant.stage import quantize_model
from mixsparse.sparsity import SparsityMap

ROWS = ["gptq4@4.25", "gptq3@3.25", "uniform50-gptq4@3.25", "msp50-gptq4@3.25", "joint@3.25", "joint-seq@3.25"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--generations", type=int, default=50, help="of MSP's and the joint search alike")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=20480)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS / "joint"))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--redo", default="")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if args.render_only:
        render(Results(Path(args.out + ".json"), None), args.out)
        return
    model, tok, pristine, calib, test = load_setup("embedded", args.calib_samples, args.seqlen, args.eval_tokens)
    meta = {"command": command_line(), "model": "embedded", "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "calibration": f"wiki calibration split, {args.calib_samples}x{args.seqlen} (pruners, GPTQ, level databases)",
            "evaluation": f"wiki test split, {test.numel()} tokens in windows of {args.seqlen}",
            "grid": f"symmetric, group {args.group_size}, float16 scales", "generations": args.generations,
            "contention": "none (run alone)"}
    res = Results(Path(args.out + ".json"), meta, fresh=args.fresh)
    redo = {k for k in args.redo.split(",") if k}
    place = Placement(torch.device("cpu"), "whole")
    counts = param_counts(model)
    work = Path(args.out + "_work")
    base = {"data.calibration_samples": args.calib_samples, "data.seqlen": args.seqlen, "model.device": "cpu",
            "search.generations": args.generations, "search.time_budget": None,
            "quantize.group_size": args.group_size}

    def gptq(bits: int):
        codes, rec = quantize_model(model, "gptq", QuantSpec(bits, args.group_size, True), calib, device=place,
                                    progress=False)
        return codes

    def search(key: str, overrides: dict):
        # joint and joint-seq of one budget share a directory: the same level database and search, final modes apart
        d = work / key.replace("@", "_").replace("joint-seq", "joint")
        if key in redo:
            shutil.rmtree(d, ignore_errors=True)  # a fresh search: no resumable state picked up
        d.mkdir(parents=True, exist_ok=True)
        cfg = load_config(None, {**base, **overrides})
        return allocate(model, tok, cfg, device=torch.device("cpu"), run_dir=d, cache_dir=work / "scores",
                        progress=True)

    for key in args.rows.split(","):
        if res.has(key) and key not in redo:
            continue
        method, budget = key.split("@")
        model.load_state_dict(pristine)
        t0 = time.perf_counter()
        entry: dict = {"method": method, "budget_bits_per_weight": float(budget)}
        smap = None
        if method.startswith("gptq"):
            codes = gptq(int(method[4:]))
        elif method == "uniform50-gptq4":
            smap = SparsityMap.uniform(0.5, counts)
            prune_layerwise(model, calib, smap, "sparsegpt", device=place, sequential=True, progress=False)
            codes = gptq(4)
        elif method == "msp50-gptq4":
            alloc = search(key, {"prune.sparsity": 0.5, "prune.allocation": "msp", "prune.pruner": "wanda"})
            entry["search"] = {k: alloc.search[k] for k in ("generations", "seconds", "best_fitness", "init_fitness",
                                                           "uniform_fitness", "evaluations")}
            smap = alloc.sparsity_map
            model.load_state_dict(pristine)
            prune_layerwise(model, calib, smap, "sparsegpt", device=place, sequential=True, progress=False)
            codes = gptq(4)
        elif method in ("joint", "joint-seq"):
            alloc = search(key, {"prune.sparsity": 0.5, "prune.allocation": "joint", "prune.pruner": "sparsegpt",
                                 "quantize.method": "joint", "search.bits_per_weight": float(budget),
                                 "search.final": "sequential" if method == "joint-seq" else "stitched"})
            j = alloc.search["joint"]
            entry["search"] = {k: alloc.search[k] for k in ("generations", "seconds", "cache_seconds", "best_fitness",
                                                           "init_fitness", "uniform_fitness", "evaluations")}
            entry["plan"] = {n: [v["sparsity"], v["bits"]] for n, v in j["per_layer"].items()}
            shares: dict[str, int] = {}
            for n, v in j["per_layer"].items():
                kind = f"int{v['bits']}" if v["sparsity"] == 0 else f"sparse+int{v['bits']}"
                shares[kind] = shares.get(kind, 0) + counts[n]
            entry["param_shares"] = {k: round(c / sum(counts.values()), 4) for k, c in sorted(shares.items())}
            smap, codes = alloc.sparsity_map, alloc.quantized
        else:
            raise SystemExit(f"unknown row {key!r}")
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        entry["ppl"] = perplexity(model, test, device=place, progress=False)
        with tempfile.TemporaryDirectory() as d:
            sizes = save_compressed(model, Path(d) / "c", dtype=torch.float16, sparsity_map=smap, quantized=codes)
        _, overall = measured_sparsity(model)
        entry.update(prunable_bytes=sizes["prunable_compressed_bytes"], bits_per_weight=sizes["bits_per_weight"],
                     total_bytes=sizes["compressed_bytes"], sparsity=overall)
        res.add(key, entry)
        print(f"{key}: ppl {entry['ppl']:.2f}, {entry['bits_per_weight']:.4f} bits/weight, {entry['seconds']:.0f} s",
              flush=True)
        render(res, args.out)
    render(res, args.out)


def render(res: Results, out: str) -> None:
    e, meta = res.data["entries"], res.data["meta"]
    lines = ["# Joint sparsity x bits search at equal bytes", "", produced_by(meta), "",
             f"Model: {meta['model']}; {meta['calibration']}; {meta['evaluation']}; grid {meta['grid']}; searches: "
             f"{meta['generations']} generations each, KL to dense on the wiki validation split.", "",
             "Bytes: mixsparse's compressed checkpoint, prunable decoder linears only (packed codes, bitmask where "
             "pruned, float16 scales). Sequential rows prune/quantize block after block on the outputs of the blocks "
             "before, joint-seq too; joint is the searched candidate itself (each layer's variant computed on dense "
             "activations).", "",
             "| row | ppl | x uniform 50% + GPTQ 4-bit | bits/weight | prunable MiB | sparsity | bit widths (share of "
             "weights) | seconds |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    ref = (e.get("uniform50-gptq4@3.25") or {}).get("ppl")
    for key, v in sorted(e.items(), key=lambda kv: (-kv[1]["budget_bits_per_weight"], kv[1]["ppl"])):
        shares = ", ".join(f"{k} {100 * s:.0f}%" for k, s in (v.get("param_shares") or {}).items())
        lines.append(f"| {key} | {fmt(v['ppl'])} | {fmt(v['ppl'] / ref if ref else None, 3)}x | "
                     f"{fmt(v['bits_per_weight'], 3)} | {fmt(v['prunable_bytes'] / 2**20, 1)} "
                     f"| {fmt(v['sparsity'], 3)} | {shares or '-'} | {fmt(v['seconds'], 0)} |")
    lines += ["", *provenance_lines(e, meta)]
    write_markdown(Path(out + ".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Sparse + quantized on the embedded model: test perplexity, checkpoint bytes and bits per weight for dense
and 50%/70% sparse models (uniform and MSP allocations, Wanda), each stored in float16, or with its kept
weights quantized to 4 bits (RTN and GPTQ with the mask fixed) or 8 bits (RTN).

MSP maps are the ones benchmarks/allocation.py searched with Wanda (allocation.json), pruned one-shot on dense
activations with this script's calibration (32 windows by default; the search's level database used 8), so the
model is pruned like the stitched one the search scored but is not that model. Sizes are those of mixsparse's compressed checkpoint
(bitmask + packed codes + float16 scales); "fp16" rows are evaluated with their weights rounded to float16.
Writes benchmarks/results/quantization.json (entries "<allocation>/<pruner>@<target>/<scheme>", target
"dense" for the unpruned rows, with "ppl", "prunable_bytes", "total_bytes", "bits_per_weight") and
quantization.md. Run it alone.

    python benchmarks/quantization.py
    python benchmarks/quantization.py --cells msp/wanda@0.7 --schemes fp16,gptq4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import (RESULTS, Results, command_line, fmt, load_setup, produced_by, provenance_lines, prune_cell,
                    write_markdown)
from mixsparse.evaluation import perplexity
from mixsparse.export import save_compressed
from mixsparse.modeling import measured_sparsity, prunable_linears
from mixsparse.placement import Placement
from mixsparse.quant.grid import QuantSpec
from mixsparse.quant.stage import quantize_model

CELLS = ["dense/none@dense", "uniform/wanda@0.5", "msp/wanda@0.5", "uniform/wanda@0.7", "msp/wanda@0.7"]
SCHEMES = {"fp16": None, "rtn4": ("rtn", 4), "gptq4": ("gptq", 4), "int8": ("rtn", 8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--asym", action="store_true", help="asymmetric grids (zero points)")
    ap.add_argument("--suffix", default="", help="appended to the scheme names of the entries, e.g. -asym-g32")
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows (pruning and GPTQ)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--out", default=str(RESULTS / "quantization"))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--redo", default="")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if args.render_only:
        render(Results(Path(args.out + ".json"), None), args.out)
        return
    meta = {"command": command_line(), "model": "embedded", "threads": torch.get_num_threads(), "torch": torch.__version__,
            "calibration": f"wiki calibration split, {args.calib_samples}x{args.seqlen} (pruning and GPTQ)",
            "evaluation": f"wiki test split, {args.eval_tokens} tokens in windows of {args.seqlen}",
            "group_size": args.group_size, "symmetric": not args.asym,
            "msp_maps": "benchmarks/results/allocation.json (msp/<pruner>@<target>)", "contention": "none (run alone)"}
    res = Results(Path(args.out + ".json"), meta, fresh=args.fresh)
    redo = {k for k in args.redo.split(",") if k}
    model, tok, pristine, calib, test = load_setup("embedded", args.calib_samples, args.seqlen, args.eval_tokens)
    place = Placement(torch.device("cpu"), "whole")
    for cell in args.cells.split(","):
        todo = [s for s in args.schemes.split(",")
                if not res.has(f"{cell}/{s}{args.suffix}") or f"{cell}/{s}{args.suffix}" in redo]
        if not todo:
            continue
        model.load_state_dict(pristine)
        smap, _ = prune_cell(model, calib, cell, place, msp_mode="one-shot")
        pruned = {k: v.clone() for k, v in model.state_dict().items()}
        for scheme in todo:
            model.load_state_dict(pruned)
            codes, seconds = None, 0.0
            if SCHEMES[scheme] is None:
                with torch.no_grad():
                    for lin in prunable_linears(model).values():
                        lin.weight.copy_(lin.weight.half().float())
            else:
                method, bits = SCHEMES[scheme]
                t0 = time.perf_counter()
                codes, _ = quantize_model(model, method, QuantSpec(bits, args.group_size, not args.asym), calib,
                                          device=place, progress=False)
                seconds = time.perf_counter() - t0
            ppl = perplexity(model, test, device=place, progress=False)
            with tempfile.TemporaryDirectory() as d:
                sizes = save_compressed(model, Path(d) / "c", dtype=torch.float16, sparsity_map=smap, quantized=codes)
            _, overall = measured_sparsity(model)
            entry = {"ppl": ppl, "prunable_bytes": sizes["prunable_compressed_bytes"],
                     "total_bytes": sizes["compressed_bytes"], "bits_per_weight": sizes["bits_per_weight"],
                     "prunable_fp16_dense_bytes": sizes["prunable_dense_bytes"], "sparsity": overall,
                     "quantize_seconds": round(seconds, 1),
                     "grid": f"{'asymmetric' if args.asym else 'symmetric'}, group {args.group_size}"}
            res.add(f"{cell}/{scheme}{args.suffix}", entry)
            print(f"{cell}/{scheme}{args.suffix}: ppl {ppl:.2f}, {entry['bits_per_weight']:.3f} bits/weight, "
                  f"{entry['total_bytes'] / 2**20:.1f} MiB", flush=True)
    render(res, args.out)


def render(res: Results, out: str) -> None:
    e, meta = res.data["entries"], res.data["meta"]
    dense = e.get("dense/none@dense/fp16") or {}
    lines = ["# Sparse + quantized", "",
             produced_by(meta), "",
             f"Model: {meta['model']}; {meta['calibration']}; {meta['evaluation']}; MSP maps: {meta['msp_maps']}. "
             "Each row's grid is in its scheme column; rows without one are symmetric group-64 (the defaults of the "
             "command without --suffix that made them, `python quantization.py`).", "",
             "Bytes are mixsparse's compressed checkpoint: prunable = the decoder linears (bitmask + values or packed "
             "codes + float16 scales), total = the whole file (embeddings in float16).", "",
             "| cell | scheme | ppl | x fp16 of the cell | prunable MiB | x dense fp16 prunable | bits/weight | total MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, v in e.items():
        cell, scheme = key.rsplit("/", 1)
        if v.get("grid") and scheme != "fp16" and "-" in scheme:
            scheme += f" ({v['grid']})"
        base = e.get(f"{cell}/fp16") or {}
        ref = dense.get("prunable_bytes")
        lines.append(f"| {cell} | {scheme} | {fmt(v['ppl'])} | {fmt(v['ppl'] / base['ppl'] if base else None, 3)} | "
                     f"{fmt(v['prunable_bytes'] / 2**20, 1)} | {fmt(v['prunable_bytes'] / ref if ref else None, 3)} | "
                     f"{fmt(v['bits_per_weight'], 3)} | {fmt(v['total_bytes'] / 2**20, 1)} |")
    lines += ["", *provenance_lines(e, meta)]
    write_markdown(Path(out + ".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

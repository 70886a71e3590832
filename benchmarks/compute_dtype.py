"""A bf16 model on a CPU without native bf16: the whole prune + block-wise recovery job in float32 compute (the
placement policy's upcast, ``model.compute_dtype: auto``) against the model's own bf16 (``model``), and the same
job on the float32 model, as result entries keyed ``"<dtype>/<compute>"``.

Each cell runs, in a fresh directory, the command of issue 23:

    mixsparse prune --sparsity 0.7 --dtype DTYPE --calib-samples 8 --eval-tokens 4096 --recover blockwise \\
        --set recover.blockwise.epochs=2 --set model.compute_dtype=COMPUTE

with ``--isa avx2`` under ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 (the kernels
of a CPU without AVX512-BF16/AMX) and stores wall seconds, the run's stage timings, the recovered perplexity and
the peak RSS in results/compute_dtype.{json,md}. Run it alone (a second torch process on 2 cores slows both).

    python benchmarks/compute_dtype.py --isa avx2                       # all three cells
    python benchmarks/compute_dtype.py --isa avx2 --cells bfloat16/float32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import AVX2_ENV, RESULTS, Results, fmt, produced_by, provenance, provenance_lines, write_markdown

CELLS = {"float32/float32": ("float32", "auto"), "bfloat16/float32": ("bfloat16", "auto"),
         "bfloat16/bfloat16": ("bfloat16", "model")}
ARGS = ["--sparsity", "0.7", "--calib-samples", "8", "--eval-tokens", "4096", "--recover", "blockwise",
        "--set", "recover.blockwise.epochs=2"]


def run_cell(key: str, env: dict, isa: str, work: Path) -> dict:
    dtype, compute = CELLS[key]
    out = work / key.replace("/", "-")
    argv = ["prune", "--dtype", dtype, *ARGS, "--set", f"model.compute_dtype={compute}", "--out", str(out), "--quiet"]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mixsparse", *argv], env=env, check=True)
    wall = time.perf_counter() - t0
    rec = json.loads((out / "run.json").read_text())
    ppl, pl = rec["perplexity"], rec.get("placement") or {}
    command = (" ".join(f"{k}={v}" for k, v in AVX2_ENV.items()) + " " if isa == "avx2" else "") + \
        "mixsparse " + " ".join(argv).replace(str(out), "RUN")
    return {"seconds": round(wall, 1), "timings": rec.get("timings"), "ppl_dense": ppl["dense"],
            "ppl_pruned": ppl["pruned"], "ppl_recovered": ppl["recovered"],
            "sparsity": rec["pruning"]["overall_sparsity"], "compute_dtype": pl.get("compute_dtype"),
            "whole_upcast": pl.get("whole_upcast"), "peak_rss_mb": (rec.get("peak_memory") or {}).get("cpu_rss_mb"),
            "command": command}


def render(res: Results) -> None:
    e, meta = res.data["entries"], res.data["meta"]
    base = e.get("float32/float32")
    rows = ["| dtype / compute | seconds | vs float32 | prune | recovery | ppl dense | ppl pruned | ppl recovered | "
            "vs float32 | peak RSS (MB) |", "|---|" + "---|" * 9]
    for key, v in e.items():
        t = v.get("timings") or {}
        rel = (f"{v['seconds'] / base['seconds']:.2f}x" if base else "—")
        prel = (f"{v['ppl_recovered'] / base['ppl_recovered'] - 1:+.1%}" if base else "—")
        rows.append(f"| {key} | {fmt(v['seconds'], 0)} | {rel} | {fmt(t.get('prune'), 0)} | {fmt(t.get('recover'), 0)} | "
                    f"{v['ppl_dense']:.2f} | {v['ppl_pruned']:.2f} | {v['ppl_recovered']:.2f} | {prel} | "
                    f"{fmt(v['peak_rss_mb'], 0)} |")
    notes = [f"- {k}: {v['note']}" for k, v in e.items() if v.get("note")]
    text = ["# bf16 on a CPU without native bf16: compute dtype", "", produced_by(meta), "",
            "The embedded SmolLM2-135M, Wanda 70% uniform, 8 calibration windows, block-wise recovery (2 epochs), "
            "perplexity on 4,096 wiki test tokens; `<dtype>/<compute>`: the model's dtype and what placed blocks "
            "compute in (`bfloat16/float32`: `model.compute_dtype: auto`, the default; `bfloat16/bfloat16`: "
            "`model`, the behaviour before). Seconds are wall time including process start.", "",
            *rows, "", *(["Notes:", "", *notes, ""] if notes else []), *provenance_lines(e, meta)]
    write_markdown(RESULTS / "compute_dtype.md", "\n".join(text) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", choices=["native", "avx2"], default="avx2")
    ap.add_argument("--cells", default=",".join(CELLS), help="comma-separated keys of " + ", ".join(CELLS))
    ap.add_argument("--note", help="free text stored with the entries (e.g. what else ran)")
    args = ap.parse_args()
    cells = args.cells.split(",")
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        ap.error(f"unknown cell(s) {unknown}; known: {', '.join(CELLS)}")
    res = Results(RESULTS / "compute_dtype.json", {"command": "python benchmarks/compute_dtype.py " +
                                                  " ".join(sys.argv[1:])})
    env = {**os.environ, **(AVX2_ENV if args.isa == "avx2" else {})}
    with tempfile.TemporaryDirectory() as work:
        for key in cells:
            entry = run_cell(key, env, args.isa, Path(work))
            prov = provenance()
            if args.isa == "avx2":
                prov["machine"]["forced"] = AVX2_ENV
            entry["provenance"] = {**prov, "command": entry.pop("command"),
                                   "settings": {"isa": args.isa, "cell": key}}
            if args.note:
                entry["note"] = args.note
            res.add(key, entry)
            print(key, {k: entry[k] for k in ("seconds", "ppl_recovered", "peak_rss_mb", "compute_dtype")}, flush=True)
            render(res)
    render(res)


if __name__ == "__main__":
    main()

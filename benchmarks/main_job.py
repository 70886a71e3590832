"""The README's main job (configs/msp70.yaml), timed on this machine's CPU kind, as result entries.

Runs `mixsparse prune --config configs/msp70.yaml` in a fresh directory (with ``--isa avx2``, under
ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2, i.e. the kernels of a CPU
without native bf16), and stores per CPU kind the stage timings, generations done and why the search
stopped, perplexities, zero-shot accuracies and peak RSS in results/main_job_time.{json,md}; with
``--keep`` it also replaces results/main_job/ (run.json, report, plots) and writes its README from run.json.
Run it alone (a second torch process on 2 cores slows both).

    python benchmarks/main_job.py --label native-bf16 --keep
    python benchmarks/main_job.py --label avx2 --isa avx2
    python benchmarks/main_job.py --label avx2 --record /tmp/runs/msp70-avx2 --command "..."   # a finished run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import AVX2_ENV, RESULTS, Results, fmt, produced_by, provenance, provenance_lines, write_markdown

REPO = Path(__file__).resolve().parent.parent


def entry_of(run_dir: Path, wall: float | None) -> dict:
    rec = json.loads((run_dir / "run.json").read_text())
    s = rec.get("search") or {}
    t = rec.get("timings") or {}
    return {"wall_seconds": round(wall, 1) if wall else None, "stage_seconds": round(sum(t.values()), 1),
            "timings": t, "generations": s.get("generations"), "stopped_by": s.get("stopped_by"),
            "time_budget": s.get("time_budget"), "fitness_dtype": s.get("fitness_dtype"),
            "search_seconds": s.get("seconds"), "best_fitness": s.get("best_fitness"),
            "ppl_dense": rec["perplexity"]["dense"], "ppl_pruned": rec["perplexity"]["pruned"],
            "sparsity": rec["pruning"]["overall_sparsity"], "zeroshot": rec.get("zeroshot"),
            "peak_rss_mb": (rec.get("peak_memory") or {}).get("cpu_rss_mb")}


def keep(run_dir: Path, e: dict, label: str) -> None:
    dest = RESULTS / "main_job"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("run.json", "report.md", "allocation.yaml", "config.yaml"):
        shutil.copy(run_dir / name, dest / name)
    if (run_dir / "plots").is_dir():
        shutil.copytree(run_dir / "plots", dest / "plots")
    t, p = e["timings"], e["provenance"]
    zs = "; ".join(f"{k} {v['accuracy']:.1%} ± {v['stderr']:.1%} (n={v['n']})" for k, v in (e["zeroshot"] or {}).items())
    text = ["# The README's main job, run once at full size", "",
            f"Entry `{label}` of `main_job_time.json` (generated from this directory's run.json by "
            f"`benchmarks/main_job.py`): `{p['command']}` at commit {p['commit']}, {p['date']}, on "
            f"{p['machine']['cpu']} ({', '.join(p['machine']['isa'])}).", "",
            f"- {e['stage_seconds'] / 60:.1f} min of stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()),
            f"- search: {e['generations']} generations, stopped by {e['stopped_by']} (budget {e['time_budget']} s), "
            f"fitness in {e['fitness_dtype']}; peak RSS {e['peak_rss_mb']:,.0f} MB",
            f"- measured sparsity {e['sparsity']:.2%}; test perplexity (20,480 wiki test tokens) dense "
            f"{e['ppl_dense']:.2f} → pruned **{e['ppl_pruned']:.2f}**",
            f"- zero-shot: {zs}",
            "- copied here: `report.md`, `run.json`, `config.yaml`, `allocation.yaml`, `plots/` (checkpoints are not committed)"]
    write_markdown(dest / "README.md", "\n".join(text) + "\n")


def render(res: Results) -> None:
    e, meta = res.data["entries"], res.data["meta"]
    rows = ["| CPU kind | wall (min) | stages (min) | dense eval | Fisher | search (gen., stopped by) | pruned eval | "
            "zero-shot | ppl dense → pruned | sentiment | cloze | peak RSS (MB) |", "|---|" + "---|" * 11]
    for label, v in e.items():
        t = v["timings"]
        zs = v["zeroshot"] or {}
        rows.append(f"| {label} ({v['fitness_dtype']} fitness) | {fmt((v['wall_seconds'] or 0) / 60, 1)} | "
                    f"{fmt(v['stage_seconds'] / 60, 1)} | {t.get('eval_dense', 0):.0f} s | {t.get('sensitivity', 0):.0f} s | "
                    f"{t.get('search', 0):.0f} s ({v['generations']}, {v['stopped_by']}) | {t.get('eval_pruned', 0):.0f} s | "
                    f"{t.get('zeroshot', 0):.0f} s | {v['ppl_dense']:.2f} → {v['ppl_pruned']:.2f} | "
                    f"{zs.get('sentiment', {}).get('accuracy', float('nan')):.3f} | "
                    f"{zs.get('cloze', {}).get('accuracy', float('nan')):.3f} | {fmt(v['peak_rss_mb'], 0)} |")
    notes = [f"- {k}: {v['note']}" for k, v in e.items() if v.get("note")]
    text = ["# The main job's time on each CPU kind", "", produced_by(meta), "",
            "`configs/msp70.yaml` (MSP 70% with Wanda, `search.time_budget: 780`); search time includes the level "
            "database. Stage seconds are run.json's timings; wall includes process start and imports.", "",
            *rows, "", *(["Notes:", "", *notes, ""] if notes else []), *provenance_lines(e, meta)]
    write_markdown(RESULTS / "main_job_time.md", "\n".join(text) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True, help="entry key: the CPU kind, e.g. native-bf16 or avx2")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native")
    ap.add_argument("--keep", action="store_true", help="also replace results/main_job/ with this run")
    ap.add_argument("--record", help="record this finished run directory instead of running the job")
    ap.add_argument("--command", help="with --record: the command that made it")
    ap.add_argument("--wall", type=float, help="with --record: its wall seconds")
    ap.add_argument("--commit", help="with --record: the commit it ran at")
    ap.add_argument("--date", help="with --record: when it ran")
    ap.add_argument("--note", help="free text stored with the entry (e.g. what else ran)")
    args = ap.parse_args()
    res = Results(RESULTS / "main_job_time.json", {"command": "python benchmarks/main_job.py ..."})
    env = {**os.environ, **(AVX2_ENV if args.isa == "avx2" else {})}
    with tempfile.TemporaryDirectory() as work:
        if args.record:
            run_dir, wall, command = Path(args.record), args.wall, args.command
        else:
            run_dir = Path(work) / "msp70"
            cmd = [sys.executable, "-m", "mixsparse", "prune", "--config", str(REPO / "configs/msp70.yaml"),
                   "--out", str(run_dir), "--quiet"]
            command = (" ".join(f"{k}={v}" for k, v in AVX2_ENV.items()) + " " if args.isa == "avx2" else "") + \
                "mixsparse prune --config configs/msp70.yaml --out RUN --quiet"
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True)
            wall = time.perf_counter() - t0
        entry = entry_of(run_dir, wall)
        if args.note:
            entry["note"] = args.note
        prov = provenance()
        if args.record:
            prov.update({k: v for k, v in (("commit", args.commit), ("date", args.date)) if v})
        if args.isa == "avx2":
            prov["machine"]["forced"] = AVX2_ENV
        entry["provenance"] = {**prov, "command": command, "settings": {"config": "configs/msp70.yaml"}}
        res.add(args.label, entry)
        if args.keep:
            keep(run_dir, res.get(args.label), args.label)
    render(res)


if __name__ == "__main__":
    main()

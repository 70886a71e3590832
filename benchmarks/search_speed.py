"""Search speed, old path vs new path: seconds per generation and final test perplexity of the MSP
search (Wanda, embedded model) at 70% and 80%, same seed and settings.

"before" is measured by running this script with an older mixsparse on PYTHONPATH (a git worktree of
the commit before the change), "after" with the current one; both land in one results file:

    git worktree add /tmp/ms_before <old commit>
    PYTHONPATH=/tmp/ms_before/src python benchmarks/search_speed.py --label before
    python benchmarks/search_speed.py --label after

``--avx2`` forces torch's AVX2 kernels (a CPU without native bf16: the fitness then runs in float32) and
stores the entry under ``"<target>-avx2"``:

    python benchmarks/search_speed.py --avx2 --targets 0.7 --label before
    python benchmarks/search_speed.py --avx2 --targets 0.7 --label after

Seconds per generation exclude the Fisher trace and the level cache (built once per run): they are
the search history's time from the scored initial population to the last generation, divided by the
number of generations. Test perplexity is measured on the final (stitched) model.
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

import torch

from common import AVX2_ENV, RESULTS, command_line, load_setup, machine, measure, write_markdown
from mixsparse.io import atomic_write_json


def git_commit(path: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True, help="'before' or 'after' (or another name)")
    ap.add_argument("--targets", default="0.7,0.8")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--generations", type=int, default=30, help="every entry of the table runs this many")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--out", default=str(RESULTS / "search_speed"))
    ap.add_argument("--note", default="", help="free text stored with the entry (e.g. measured under contention)")
    ap.add_argument("--avx2", action="store_true", help="force torch's AVX2 kernels; entries go under '<target>-avx2'")
    args = ap.parse_args()
    if args.avx2 and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
        # the variables must be set before torch loads its kernels: run again with them
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})

    import mixsparse
    from mixsparse.config import load_config, parse_override
    from mixsparse.evaluation import perplexity
    from mixsparse.pipeline import allocate

    overrides = {"data.calibration_samples": args.calib_samples, "data.seqlen": args.seqlen, "model.device": "cpu",
                 "search.generations": args.generations, "search.time_budget": None}
    overrides.update(dict(parse_override(s) for s in args.set))
    model, tok, pristine, _, test = load_setup("embedded", args.calib_samples, args.seqlen, args.eval_tokens)
    path = Path(args.out + ".json")
    data = json.loads(path.read_text()) if path.exists() else {}
    src = Path(mixsparse.__file__).resolve().parent
    code_commit = git_commit(src)  # the code this process imported (read now, not when an entry is written)
    for target in [t.strip() for t in args.targets.split(",") if t.strip()]:
        model.load_state_dict(pristine)
        cfg = load_config(None, {**overrides, "prune.sparsity": float(target), "prune.allocation": "msp",
                                 "prune.pruner": "wanda"})
        with tempfile.TemporaryDirectory() as run_dir, measure() as m:
            alloc = allocate(model, tok, cfg, device=torch.device("cpu"), run_dir=Path(run_dir),
                             cache_dir=Path(args.out + "_work"), progress=False)
        hist = alloc.search["history"]
        gens = alloc.search["generations"]
        spg = (hist[-1]["seconds"] - hist[0]["seconds"]) / max(1, gens)
        ppl = perplexity(model, test, progress=False)
        entry = {"seconds_per_generation": round(spg, 3), "test_ppl": round(ppl, 3), "generations": gens,
                 "best_fitness": alloc.search["best_fitness"], "search_seconds": alloc.search["seconds"],
                 "cache_seconds": alloc.search.get("cache_seconds"), "peak_rss_mb": m["peak_rss_mb"],
                 "evaluations": alloc.search["evaluations"], "mixsparse_commit": code_commit,
                 "command": command_line(), "overrides": {k: str(v) for k, v in overrides.items()},
                 "torch": torch.__version__, "threads": torch.get_num_threads(), "note": args.note,
                 "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "fitness_dtype": alloc.search.get("fitness_dtype"), "blocks_run": alloc.search.get("blocks_run")}
        data.setdefault(target + ("-avx2" if args.avx2 else ""), {})[args.label] = entry
        atomic_write_json(path, data)
        print(target, args.label, entry["seconds_per_generation"], entry["test_ppl"], flush=True)
    render(data, Path(args.out + ".md"))


def render(data: dict, path: Path) -> None:
    lines = ["# Search speed: old vs new evaluation path (MSP, Wanda, embedded model, 2 CPU cores)", "",
             "Seconds per generation exclude the Fisher trace and the level database build; test perplexity (8,192 "
             "wiki test tokens) on the final (stitched) model. Same seed and settings (30 generations, 8 children, "
             "stages [[1,3],[4,1]], 8x512 calibration, 4 fitness windows of 512 tokens) in every row. `before` is the "
             "old path (full forward from the embeddings, fp32, full-vocabulary KL); `after` the new defaults (layer-wise "
             "candidate forward, bf16 fitness, top-64 KL); the other rows switch one cutter on or off. Best fitness is "
             "not comparable across KL kinds (top-k KL is a lower bound of the full KL). Rows `<target>-avx2` run with "
             "torch's AVX2 kernels forced (`--avx2`: a CPU without native bf16, where the fitness runs in float32); "
             "each entry records its machine and date.", "",
             "| target | path | s / generation | speed-up vs before | test ppl | ppl vs before | best fitness | peak RSS (MB) | commit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for target, rows in sorted(data.items()):
        b = rows.get("before")
        for label, e in sorted(rows.items(), key=lambda kv: (kv[0] != "before", kv[0] != "after", kv[0])):
            speed = f"{b['seconds_per_generation'] / e['seconds_per_generation']:.2f}x" if b else "—"
            ppl = f"{e['test_ppl'] / b['test_ppl']:.3f}x" if b else "—"
            lines.append(f"| {target} | {label} | {e['seconds_per_generation']:.2f} | {speed} | {e['test_ppl']:.1f} | {ppl} | "
                         f"{e['best_fitness']:.4f} | {e['peak_rss_mb']:.0f} | {e['mixsparse_commit']} |")
    lines += ["", "Commands (each entry also records its overrides):", ""]
    for target, rows in sorted(data.items()):
        for label, e in rows.items():
            m = e.get("machine")
            where = f" ({m['cpu']}, {', '.join(m['isa'])}{', forced ' + str(m['forced']) if m.get('forced') else ''}; " \
                    f"{e['date']})" if m else ""
            lines.append(f"- {target} {label}: `{e['command']}` {e.get('note') or ''}{where}")
    write_markdown(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

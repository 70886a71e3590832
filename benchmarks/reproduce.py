"""Same numbers before and after a restructuring: the main job's quick config run by two source trees, and
rows of the allocation table measured again by both and compared with benchmarks/results/allocation.json.

    python benchmarks/reproduce.py quick --label after
    python benchmarks/reproduce.py quick --label before --src /path/to/old/checkout/src
    python benchmarks/reproduce.py allocation --label after --fresh
    python benchmarks/reproduce.py allocation --label before --src /path/to/old/checkout/src --fresh
    python benchmarks/reproduce.py render

``quick`` runs ``mixsparse prune --config configs/quick.yaml`` in a subprocess (``--src`` puts another
checkout's ``src`` first on PYTHONPATH and takes that checkout's configs/quick.yaml) and keeps what the run
recorded; ``allocation`` runs a checkout's allocation.py with the settings of the stored rows.
Results: results/reproduce.{json,md}.
Run alone: two torch processes on 2 cores slow each other ~10x.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, Results, command_line, fmt, produced_by, write_markdown

from mixsparse.io import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent


def _digest(per_layer: dict) -> str:
    return hashlib.sha256(json.dumps(per_layer, sort_keys=True).encode()).hexdigest()[:12]


def quick(args, res: Results) -> None:
    env = os.environ.copy()
    root = ROOT
    if args.src:  # that checkout's own configs/quick.yaml: the same settings in the schema its code reads
        env["PYTHONPATH"] = str(Path(args.src).resolve()) + os.pathsep + env.get("PYTHONPATH", "")
        root = Path(args.src).resolve().parent
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        cmd = [sys.executable, "-m", "mixsparse.cli", "prune", "--config", str(root / "configs" / "quick.yaml"),
               "--out", str(out), "--quiet", *[a for kv in args.set for a in ("--set", kv)]]
        subprocess.run(cmd, check=True, env=env, cwd=d)
        # read as plain JSON: the "before" tree may predate the typed record
        rec = json.loads((out / "run.json").read_text())
        code = subprocess.run([sys.executable, "-c", "import mixsparse, sys; print(mixsparse.__file__)"], env=env,
                              cwd=d, capture_output=True, text=True, check=True).stdout.strip()
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    alloc, ppl = rec["allocation"], rec["perplexity"]
    res.add(f"quick/{args.label}", {
        "source": code, "commit": commit, "ppl_dense": ppl["dense"], "ppl_pruned": ppl["pruned"],
        "overall_sparsity": rec["pruning"]["overall_sparsity"], "per_layer_digest": _digest(alloc["per_layer"]),
        "search_best_fitness": rec["search"]["best_fitness"], "search_evaluations": rec["search"]["evaluations"],
        "zeroshot": rec.get("zeroshot"), "seconds_total": round(sum(rec["timings"].values()), 1),
        "search_seconds": rec["search"]["seconds"],
        "timings": rec["timings"], "command": " ".join(cmd[1:3] + ["prune", "--config", "configs/quick.yaml"]
                                                       + [a for kv in args.set for a in ("--set", kv)]),
        "run_by": command_line()})
    print(f"quick/{args.label}: ppl {ppl['dense']:.3f} -> {ppl['pruned']:.3f}, zero-shot {rec.get('zeroshot')}")


def allocation(args, res: Results) -> None:
    """allocation.py of this checkout (or of ``--src``'s) into results/reproduce_work/allocation-LABEL; an entry
    already measured there is kept unless ``--fresh`` (allocation.py resumes)."""
    env, root = os.environ.copy(), ROOT
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve()) + os.pathsep + env.get("PYTHONPATH", "")
        root = Path(args.src).resolve().parent
    work = RESULTS / "reproduce_work"
    work.mkdir(exist_ok=True)
    out = work / f"allocation-{args.label}"
    cmd = [sys.executable, str(root / "benchmarks" / "allocation.py"), "--targets", args.targets, "--pruners",
           args.pruners, "--calib-samples", "8", "--eval-tokens", "8192", "--generations", str(args.generations),
           "--out", str(out), *(["--fresh"] if args.fresh else [])]
    subprocess.run(cmd, check=True, env=env, cwd=root / "benchmarks")
    new = json.loads(out.with_suffix(".json").read_text())["entries"]
    old = json.loads((RESULTS / "allocation.json").read_text())["entries"]
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    for key, entry in new.items():
        if key == "dense":
            continue
        res.add(f"allocation/{args.label}/{key}", {
            "stored_ppl": (old.get(key) or {}).get("ppl"), "ppl": entry["ppl"], "commit": commit,
            "per_layer_digest": _digest(entry["per_layer"]), "allocation_seconds": entry.get("allocation_seconds"),
            "command": " ".join(["python", "allocation.py", *cmd[2:cmd.index("--out")]])})
        print(f"{args.label} {key}: {entry['ppl']:.2f} (stored {(old.get(key) or {}).get('ppl')})")


def render(res: Results) -> None:
    e = res.data["entries"]
    lines = ["# Same numbers after the restructuring", "",
             produced_by(res.data["meta"]), "",
             "Run alone on 2 CPU cores (no other torch process). `quick`: `mixsparse prune --config configs/quick.yaml`"
             " run by the code before and after; the per-layer map is compared by a digest of its JSON.", "",
             *[f"- {n}" for n in res.data["meta"].get("notes") or []], "",
             "| run | commit | dense ppl | pruned ppl | sparsity | map digest | best fitness | evaluations | zero-shot | total s |",
             "|---|---|---:|---:|---:|---|---:|---:|---|---:|"]
    for key, v in e.items():
        if key.startswith("quick/"):
            zs = ", ".join(f"{t} {r['accuracy']:.3f}" for t, r in (v.get("zeroshot") or {}).items())
            lines.append(f"| {key} | {v.get('commit', '?')} | {fmt(v['ppl_dense'], 4)} | {fmt(v['ppl_pruned'], 4)} | {v['overall_sparsity']:.6f} | "
                         f"{v['per_layer_digest']} | {fmt(v['search_best_fitness'], 6)} | {v['search_evaluations']} | "
                         f"{zs} | {fmt(v['seconds_total'], 1)} |")
    cells: dict[str, dict[str, dict]] = {}
    for k, v in e.items():
        if k.startswith("allocation/"):
            _, label, cell = k.split("/", 2)
            cells.setdefault(cell, {})[label] = v
    if cells:
        labels = sorted({label for by in cells.values() for label in by}, key=lambda lb: (lb != "before", lb))
        any_entry = next(iter(next(iter(cells.values())).values()))
        lines += ["", f"Allocation rows measured again by each checkout (`{any_entry['command']}`), against the stored "
                  "`allocation.json`; a map digest that agrees between checkouts means the same per-layer map:", "",
                  "| cell | stored ppl | " + " | ".join(f"{lb} ppl (commit, map)" for lb in labels) + " |",
                  "|---|---:|" + "---:|" * len(labels)]
        for cell, by in cells.items():
            stored = next(iter(by.values()))["stored_ppl"]
            lines.append(f"| {cell} | {fmt(stored)} | " + " | ".join(
                f"{fmt(by[lb]['ppl'])} ({by[lb]['commit']}, {by[lb]['per_layer_digest']})" if lb in by else "—"
                for lb in labels) + " |")
    write_markdown(RESULTS / "reproduce.md", "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["quick", "allocation", "render"])
    ap.add_argument("--label", default="after")
    ap.add_argument("--src", help="another checkout's src/ to run (quick)")
    ap.add_argument("--targets", default="0.7")
    ap.add_argument("--pruners", default="wanda")
    ap.add_argument("--generations", type=int, default=30)
    ap.add_argument("--fresh", action="store_true", help="allocation: measure every entry again")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="quick: config overrides")
    ap.add_argument("--note", help="a line for the results file (how a measurement was made)")
    args = ap.parse_args()
    path = RESULTS / "reproduce.json"
    notes = (json.loads(path.read_text())["meta"].get("notes") or []) if path.exists() else []
    res = Results(path, {"command": command_line()} if args.what != "render" else None)
    res.data["meta"]["notes"] = notes + ([args.note] if args.note else [])
    if args.note:
        atomic_write_json(path, res.data)
    if args.what == "quick":
        quick(args, res)
    elif args.what == "allocation":
        allocation(args, res)
    render(res)


if __name__ == "__main__":
    main()

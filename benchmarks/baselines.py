"""Dense vs magnitude / Wanda / SparseGPT at 50-80% unstructured and 2:4 on the embedded model.

Writes benchmarks/results/baselines.json and baselines.md (test-split perplexity, wall time and peak
memory of each run). Uniform allocation; the engine prunes layer by layer, sequentially.

    python benchmarks/baselines.py                 # full table (~30 min on 2 CPU cores)
    python benchmarks/baselines.py --eval-tokens 4096 --calib-samples 4   # quick look
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import RESULTS, Results, command_line, fmt, load_setup, measure, write_markdown
from mixsparse.engine import prune_layerwise
from mixsparse.evaluation import perplexity
from mixsparse.modeling import measured_sparsity, param_counts
from mixsparse.sparsity import SparsityMap

SETTINGS = ["0.5", "0.6", "0.7", "0.8", "2:4"]
PRUNERS = ["magnitude", "wanda", "sparsegpt"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pruners", default=",".join(PRUNERS))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--out", default=str(RESULTS / "baselines"))
    ap.add_argument("--fresh", action="store_true", help="ignore entries already measured")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    model, tok, pristine, calib, test = load_setup(args.model, args.calib_samples, args.seqlen, args.eval_tokens, args.seed)
    counts = param_counts(model)
    meta = {"command": command_line(), "model": args.model, "calibration": f"wiki calibration split, {args.calib_samples}x{args.seqlen}",
            "evaluation": f"wiki test split, {test.numel()} tokens in {test.shape[0]} windows of {args.seqlen}",
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    res = Results(Path(args.out + ".json"), meta, fresh=args.fresh)

    if not res.has("dense"):
        with measure() as m:
            ppl = perplexity(model, test)
        res.add("dense", {"pruner": "dense", "setting": "-", "ppl": ppl, "sparsity": 0.0, **m})
        print("dense", ppl, flush=True)
    for setting in args.settings.split(","):
        for pruner in args.pruners.split(","):
            key = f"{pruner}@{setting}"
            if res.has(key):
                continue
            model.load_state_dict(pristine)
            with measure() as m:
                prune_layerwise(model, calib, SparsityMap.uniform(setting, counts), pruner, progress=False)
            _, overall = measured_sparsity(model)
            with measure() as e:
                ppl = perplexity(model, test, progress=False)
            res.add(key, {"pruner": pruner, "setting": setting, "ppl": ppl, "sparsity": overall,
                          "prune_seconds": m["seconds"], "peak_rss_mb": m["peak_rss_mb"], "eval_seconds": e["seconds"]})
            print(key, round(ppl, 2), m, flush=True)
    render(res, args.out + ".md")


def render(res: Results, path: str) -> None:
    e = res.data["entries"]
    meta = res.data["meta"]
    dense = e.get("dense", {}).get("ppl")
    lines = ["# Baselines: uniform sparsity, base pruners", "",
             f"Command: `{meta['command']}`", "",
             f"Model: {meta['model']}; calibration: {meta['calibration']}; evaluation: {meta['evaluation']}; "
             f"torch {meta['torch']}, {meta['threads']} threads.", "",
             f"Dense perplexity: **{fmt(dense)}**", "",
             "| setting | pruner | measured sparsity | test PPL | x dense | prune time (s) | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        for pruner in PRUNERS:
            r = e.get(f"{pruner}@{setting}")
            if r:
                lines.append(f"| {setting} | {pruner} | {r['sparsity']:.4f} | {fmt(r['ppl'])} | "
                             f"{fmt(r['ppl'] / dense if dense else None)} | {fmt(r['prune_seconds'], 1)} | {fmt(r['peak_rss_mb'], 0)} |")
    write_markdown(Path(path), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

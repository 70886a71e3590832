"""Recovery after pruning, mask fixed: test perplexity and zero-shot accuracy before and after each
recovery mode (none, blockwise, finetune, lora), for uniform and MSP allocations at 70% and 80% with
Wanda and at 70% with SparseGPT, on the embedded model, with the CPU time each recovery took.

MSP maps are the ones benchmarks/allocation.py searched (allocation.json, default 200-generation search
where the table says so) and are pruned as that benchmark pruned them: one-shot on dense activations when the
map was searched with the same pruner (exactly the "stitched" model the search scored), sequentially when it
was searched with another (SparseGPT reuses Wanda's map). Uniform prunes sequentially (the engine's default). Writes
benchmarks/results/recovery.json (entries "<allocation>/<pruner>@<target>/<mode>" with "ppl", "dense_ppl",
"seconds", "sparsity") and recovery.md. Run it alone: a second torch process on 2 cores distorts times.

    python benchmarks/recovery.py                                  # every cell and mode
    python benchmarks/recovery.py --cells msp/wanda@0.7 --modes none,blockwise
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import RESULTS, Results, command_line, fmt, load_setup, produced_by, prune_cell, write_markdown
from mixsparse.config import load_config, parse_override
from mixsparse.evaluation import perplexity
from mixsparse.modeling import measured_sparsity
from mixsparse.placement import Placement
from mixsparse.recovery.stage import dense_snapshot, recover
from mixsparse.zeroshot import evaluate_zeroshot

CELLS = ["msp/wanda@0.7", "uniform/wanda@0.7", "msp/wanda@0.8", "uniform/wanda@0.8", "msp/sparsegpt@0.7",
         "uniform/sparsegpt@0.7"]
MODES = ["none", "blockwise", "finetune", "lora"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--calib-samples", type=int, default=8, help="pruning calibration windows (the MSP maps' setting)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--zeroshot-n", type=int, default=None, help="examples per zero-shot task (task defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="recovery settings, e.g. recover.finetune.steps=100 (repeatable)")
    ap.add_argument("--out", default=str(RESULTS / "recovery"))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--redo", default="", help="comma-separated entry keys to measure again")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if args.render_only:
        render(Results(Path(args.out + ".json"), None), args.out)
        return
    torch.manual_seed(0)
    overrides = dict(parse_override(s) for s in args.set)
    cfg0 = load_config(None, {"model.device": "cpu", "data.seqlen": args.seqlen, **overrides})
    meta = {"command": command_line(), "model": "embedded", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "calibration": f"wiki calibration split, {args.calib_samples}x{args.seqlen} for pruning",
            "evaluation": f"wiki test split, {args.eval_tokens} tokens in windows of {args.seqlen}",
            "zeroshot": f"sentiment + cloze, n={args.zeroshot_n or 'task default'}",
            "recover": json.loads(json.dumps(cfg0.to_dict()["recover"])), "overrides": overrides,
            "msp_maps": "benchmarks/results/allocation.json (msp/<pruner>@<target>)", "contention": "none (run alone)"}
    res = Results(Path(args.out + ".json"), meta, fresh=args.fresh)
    redo = {k for k in args.redo.split(",") if k}
    model, tok, pristine, calib, test = load_setup("embedded", args.calib_samples, args.seqlen, args.eval_tokens)
    place = Placement(torch.device("cpu"), "whole")

    def zeroshot() -> dict:
        zs = evaluate_zeroshot(model, tok, tasks=("sentiment", "cloze"), n=args.zeroshot_n, device=place, progress=False)
        return {t: round(r["accuracy"], 4) for t, r in zs.items()}

    if not res.has("dense") or "dense" in redo:
        res.add("dense", {"ppl": perplexity(model, test, device=place, progress=False), "zeroshot": zeroshot()})
    dense_ppl = res.get("dense")["ppl"]
    work = Path(args.out + "_work")
    store = dense_snapshot(model, work)
    for cell in args.cells.split(","):
        target = cell.rsplit("@", 1)[1]
        todo = [m for m in args.modes.split(",") if not res.has(f"{cell}/{m}") or f"{cell}/{m}" in redo]
        if not todo:
            continue
        model.load_state_dict(pristine)
        _, prune_seconds = prune_cell(model, calib, cell, place, msp_sequential=True)
        pruned_state = {k: v.clone() for k, v in model.state_dict().items()}
        for mode in todo:
            model.load_state_dict(pruned_state)
            cfg = load_config(None, {**cfg0.to_dict(), "recover": {**cfg0.to_dict()["recover"], "mode": mode},
                                     "prune": {"sparsity": float(target)}})
            t0 = time.perf_counter()
            rec = recover(model, tok, cfg, dense=store, device=place, progress=False) if mode != "none" else {}
            seconds = time.perf_counter() - t0
            _, overall = measured_sparsity(model)
            ppl = perplexity(model, test, device=place, progress=False)
            entry = {"ppl": ppl, "dense_ppl": dense_ppl, "seconds": round(seconds if mode != "none" else prune_seconds, 1),
                     "sparsity": overall, "ratio_to_dense": ppl / dense_ppl, "zeroshot": zeroshot(),
                     "what_seconds_counts": "pruning" if mode == "none" else f"{mode} recovery"}
            if rec.get("blocks"):
                entry["block_mse"] = [[b["mse_before"], b["mse_after"]] for b in rec["blocks"]]
            if rec.get("val_ppl"):
                entry["val_ppl"] = rec["val_ppl"]
                entry["final_loss"] = rec["loss"][-1][1]
            res.add(f"{cell}/{mode}", entry)
            print(f"{cell}/{mode}: ppl {ppl:.1f} ({ppl / dense_ppl:.2f}x dense) in {entry['seconds']} s, "
                  f"zero-shot {entry['zeroshot']}", flush=True)
    render(res, args.out)


def render(res: Results, out: str) -> None:
    e, meta = res.data["entries"], res.data["meta"]
    dense = e.get("dense") or {}
    lines = ["# Recovery after pruning (mask fixed)", "",
             produced_by(meta), "",
             f"Model: {meta['model']}; {meta['calibration']}; {meta['evaluation']}; zero-shot: {meta['zeroshot']}; "
             f"{meta['threads']} CPU threads, torch {meta['torch']}, {meta['contention']}. MSP maps: {meta['msp_maps']}.", "",
             f"Dense: perplexity {fmt(dense.get('ppl'))}, zero-shot {dense.get('zeroshot')}.", "",
             "Seconds: pruning time for `none`, recovery time (data preparation included, evaluation excluded) otherwise.", "",
             "| cell | mode | ppl | x dense | sentiment | cloze | seconds | sparsity |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, v in e.items():
        if key == "dense":
            continue
        cell, mode = key.rsplit("/", 1)
        zs = v.get("zeroshot") or {}
        lines.append(f"| {cell} | {mode} | {fmt(v['ppl'])} | {fmt(v.get('ratio_to_dense'))} | {fmt(zs.get('sentiment'), 3)} "
                     f"| {fmt(zs.get('cloze'), 3)} | {fmt(v['seconds'], 1)} | {v['sparsity']:.4f} |")
    lines += ["", "Recovery settings:", "", "```json", json.dumps(meta.get("recover"), indent=1), "```", ""]
    write_markdown(Path(out + ".md"), "\n".join(lines))


if __name__ == "__main__":
    main()

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

Tuned rows (the levers of issue #22: more calibration windows and epochs, an lr schedule, block-wise then a
LoRA pass with KL to the dense logits) carry a label and their own settings, and are scored on the wiki
validation split too; the Markdown marks, per cell, the labelled row of least validation perplexity among
those within the 20-minute recovery budget (the choice) and reports its test perplexity:

    python benchmarks/recovery.py --cells msp/wanda@0.8 --modes blockwise --label b128c \
        --set recover.blockwise.samples=128 --set recover.blockwise.schedule=cosine
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import (RESULTS, Results, command_line, fmt, load_setup, produced_by, provenance_lines, prune_cell,
                    write_markdown)
from mixsparse.config import load_config, parse_override
from mixsparse.data import eval_windows, load_corpus, window_prefix
from mixsparse.evaluation import perplexity
from mixsparse.modeling import measured_sparsity
from mixsparse.placement import Placement
from mixsparse.recovery import stage_records
from mixsparse.recovery.stage import dense_snapshot, recover
from mixsparse.zeroshot import evaluate_zeroshot

CELLS = ["msp/wanda@0.7", "uniform/wanda@0.7", "msp/wanda@0.8", "uniform/wanda@0.8", "msp/sparsegpt@0.7",
         "uniform/sparsegpt@0.7"]
MODES = ["none", "blockwise", "finetune", "lora"]
BUDGET_S = 20 * 60  # the recovery budget on 2 CPU cores
TARGETS = {"0.7": 3.0, "0.8": 6.0}  # x dense perplexity


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
    ap.add_argument("--label", default="", help="name of a tuned setting: entries become <cell>/<mode>:<label>")
    ap.add_argument("--val-tokens", type=int, default=8192, help="wiki validation tokens scored (the choice)")
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
            "validation": f"wiki validation split, {args.val_tokens} tokens (the choice of labelled rows)",
            "zeroshot": f"sentiment + cloze, n={args.zeroshot_n or 'task default'}",
            "recover": json.loads(json.dumps(cfg0.to_dict()["recover"])), "overrides": overrides,
            "msp_maps": "benchmarks/results/allocation.json (msp/<pruner>@<target>)", "contention": "none (run alone)"}
    path = Path(args.out + ".json")
    if args.label and path.exists() and not args.fresh:
        # the meta's settings describe the unlabelled rows; a labelled row keeps its own in its entry
        old = json.loads(path.read_text())["meta"]
        meta.update({k: old[k] for k in ("recover", "overrides") if k in old})
    res = Results(path, meta, fresh=args.fresh)
    redo = {k for k in args.redo.split(",") if k}
    model, tok, pristine, calib, test = load_setup("embedded", args.calib_samples, args.seqlen, args.eval_tokens)
    val = eval_windows(tok, load_corpus("wiki", "validation"), args.seqlen, args.val_tokens, prefix=window_prefix(tok))
    suffix = f":{args.label}" if args.label else ""
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
        todo = [m for m in args.modes.split(",") if not res.has(f"{cell}/{m}{suffix}") or f"{cell}/{m}{suffix}" in redo]
        if not todo:
            continue
        model.load_state_dict(pristine)
        _, prune_seconds = prune_cell(model, calib, cell, place, msp_mode="as-searched")
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
                     "what_seconds_counts": "pruning" if mode == "none" else f"{mode} recovery",
                     "validation_ppl": perplexity(model, val, device=place, progress=False)}
            if args.label:  # this row's own settings (the meta's are those of the unlabelled rows), in its provenance too
                entry["label"], entry["settings"] = args.label, {"overrides": overrides, "recover": cfg.to_dict()["recover"]}
            for stage in stage_records(rec):  # a chained mode: the block errors and the training curve
                if stage.get("blocks"):
                    entry["block_mse"] = [[b["mse_before"], b["mse_after"]] for b in stage["blocks"]]
                if stage.get("val_ppl"):
                    entry["val_ppl"] = stage["val_ppl"]
                    entry["final_loss"] = stage["loss"][-1][1]
                entry.setdefault("stage_seconds", {})[stage.get("mode", mode)] = stage.get("seconds")
            res.add(f"{cell}/{mode}{suffix}", entry, settings=entry.get("settings"))
            print(f"{cell}/{mode}{suffix}: val {entry['validation_ppl']:.1f}, ppl {ppl:.1f} ({ppl / dense_ppl:.2f}x dense) in {entry['seconds']} s, "
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
    tuned = {k: v for k, v in e.items() if v.get("label")}
    for key, v in e.items():
        if key == "dense" or key in tuned:
            continue
        cell, mode = key.rsplit("/", 1)
        zs = v.get("zeroshot") or {}
        lines.append(f"| {cell} | {mode} | {fmt(v['ppl'])} | {fmt(v.get('ratio_to_dense'))} | {fmt(zs.get('sentiment'), 3)} "
                     f"| {fmt(zs.get('cloze'), 3)} | {fmt(v['seconds'], 1)} | {v['sparsity']:.4f} |")
    lines += ["", "Recovery settings of the rows above:", "", "```json", json.dumps(meta.get("recover"), indent=1), "```", ""]
    if tuned:
        lines += _tuned(tuned, meta.get("validation", "wiki validation split"))
    lines += provenance_lines(e, meta)
    write_markdown(Path(out + ".md"), "\n".join(lines))


def _tuned(tuned: dict, validation: str) -> list[str]:
    """The labelled rows: the choice per cell is the least validation perplexity within the budget; only its
    test perplexity is the reported result (the others are shown for the record, not chosen on them)."""
    chosen = {}
    for key, v in tuned.items():
        cell, mode = key.rsplit("/", 1)
        if not mode.startswith("none") and v["seconds"] <= BUDGET_S and (
                cell not in chosen or v["validation_ppl"] < tuned[chosen[cell]]["validation_ppl"]):
            chosen[cell] = key
    lines = ["## Tuned recovery within 20 minutes (chosen on the validation split)", "",
             f"Targets: <= {TARGETS['0.7']:g}x dense at 70%, <= {TARGETS['0.8']:g}x at 80%, within {BUDGET_S // 60} minutes of "
             "recovery on 2 CPU cores. Each row runs mixsparse's default recovery settings with its overrides (its JSON "
             f"entry holds them all); `none` is the pruned model before recovery (seconds: pruning). Validation: "
             f"{validation}; the choice per cell is the least validation perplexity, its test perplexity the result.", "",
             "| cell | mode:label | overrides | seconds | validation ppl (choice) | test ppl | x dense | target | sentiment | cloze |",
             "|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for key in sorted(tuned, key=lambda k: (k.rsplit("/", 1)[0], tuned[k]["seconds"])):
        v = tuned[key]
        cell, mode = key.rsplit("/", 1)
        target = TARGETS.get(cell.rsplit("@", 1)[1])
        ratio = v.get("ratio_to_dense")
        met = "—" if target is None or mode.startswith("none") else (
            "met" if ratio <= target and v["seconds"] <= BUDGET_S else "not met")
        mark = " **(chosen)**" if chosen.get(cell) == key else ""
        over = "—" if mode.startswith("none") else (
            ", ".join(f"{k.removeprefix('recover.')}={val}" for k, val in v["settings"]["overrides"].items()) or "defaults")
        zs = v.get("zeroshot") or {}
        lines.append(f"| {cell} | {mode} | {over} | {fmt(v['seconds'], 1)} | {fmt(v['validation_ppl'])}{mark} | {fmt(v['ppl'])} "
                     f"| {fmt(ratio)} | {met} | {fmt(zs.get('sentiment'), 3)} | {fmt(zs.get('cloze'), 3)} |")
    return lines + [""]


if __name__ == "__main__":
    main()

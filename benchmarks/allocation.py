"""Allocation methods side by side: {uniform, OWL, Hessian-trace, FIM-only, MSP-EA} x {Wanda, SparseGPT}
at 50-80% unstructured, and uniform 2:4 vs mixed N:M at 50%, on the embedded model.

Writes benchmarks/results/allocation.json / allocation.md and a per-layer plot for each target.
Search and sensitivity only see calibration and validation text; the test split is used once per
pruned model, for the reported perplexity. Sensitivity scores are computed once and cached.

    python benchmarks/allocation.py                       # everything (long: see the README's timings)
    python benchmarks/allocation.py --targets 0.7 --pruners wanda --generations 10   # one column, quick
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import RESULTS, Results, command_line, fmt, load_setup, measure, provenance_lines, write_markdown
from mixsparse.config import load_config
from mixsparse.engine import prune_layerwise
from mixsparse.evaluation import perplexity
from mixsparse.modeling import measured_sparsity, param_counts
from mixsparse.pipeline import allocate
from mixsparse.report import plot_allocations

METHODS = ["uniform", "owl", "hessian", "fisher", "msp"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--targets", default="0.7,0.8,0.6,0.5", help="unstructured targets, in the order to run")
    ap.add_argument("--pruners", default="wanda,sparsegpt")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--nm", action="store_true", help="also run uniform 2:4 vs mixed N:M")
    ap.add_argument("--nm-only", action="store_true")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--generations", type=int, default=None, help="override search.generations")
    ap.add_argument("--search-pruners", default="wanda",
                    help="pruners that get their own MSP search; the others reuse the map searched with the first "
                         "of these at the same target (MSP is plug-and-play: the map works with any pruner)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--out", default=str(RESULTS / "allocation"))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--redo", default="", help="comma-separated entry keys to measure again (e.g. msp/wanda@0.8)")
    ap.add_argument("--variant", help="store MSP cells as msp-VARIANT/... (e.g. a longer search: copy msp/PRUNER_TARGET/"
                                      "search_state.json into the variant's work dir first to extend that search)")
    ap.add_argument("--render-only", action="store_true", help="only rewrite the Markdown and plots from the JSON")
    args = ap.parse_args()
    if args.render_only:
        render(Results(Path(args.out + ".json"), None), args.out)
        return

    from mixsparse.config import parse_override

    base = {"data.calibration_samples": args.calib_samples, "data.seqlen": args.seqlen, "model.device": "cpu"}
    if args.generations is not None:
        base["search.generations"] = args.generations
    base.update(dict(parse_override(s) for s in args.set))

    model, tok, pristine, calib, test = load_setup(args.model, args.calib_samples, args.seqlen, args.eval_tokens)
    counts = param_counts(model)
    cache_dir = Path(args.out + "_work")
    meta = {"command": command_line(), "model": args.model,
            "calibration": f"wiki calibration split, {args.calib_samples}x{args.seqlen}",
            "evaluation": f"wiki test split, {test.numel()} tokens in {test.shape[0]} windows of {args.seqlen}",
            "search_fitness": "KL to dense on the wiki validation split", "overrides": {k: str(v) for k, v in base.items()},
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    res = Results(Path(args.out + ".json"), meta, fresh=args.fresh)
    if not res.has("dense"):
        res.add("dense", {"ppl": perplexity(model, test, progress=False)})

    redo = {k for k in args.redo.split(",") if k}

    def run(key: str, target, method: str, pruner: str, extra: dict | None = None) -> None:
        if res.has(key) and key not in redo:
            return
        if key in redo:  # a fresh search: its old resumable state must not be picked up
            import shutil

            shutil.rmtree(cache_dir / key.replace("@", "_").replace(":", "-"), ignore_errors=True)
        model.load_state_dict(pristine)
        cfg = load_config(None, {**base, "prune.sparsity": target, "prune.allocation": method, "prune.pruner": pruner,
                                 **(extra or {})})
        work = cache_dir / key.replace("@", "_").replace(":", "-")
        work.mkdir(parents=True, exist_ok=True)
        searched_with = None
        if method == "msp" and pruner not in args.search_pruners.split(","):
            searched_with = args.search_pruners.split(",")[0]
            source = res.get(f"msp/{searched_with}@{target}")
            if source is None:
                print(f"skip {key}: run msp/{searched_with}@{target} first", flush=True)
                return
            from mixsparse.io import atomic_write_yaml

            extra = {**(extra or {}), "prune.allocation": "file",
                     "prune.allocation_file": str(atomic_write_yaml(work / "searched.yaml", source["per_layer"]))}
            cfg = load_config(None, {**base, "prune.sparsity": target, "prune.pruner": pruner, **extra})
        t0 = time.perf_counter()
        # sensitivity scores are computed once and shared by every run through one cache directory
        alloc = allocate(model, tok, cfg, device=torch.device("cpu"), run_dir=work, cache_dir=cache_dir / "scores",
                         progress=False)
        alloc_s = time.perf_counter() - t0
        if not alloc.stitched:
            model.load_state_dict(pristine)
            with measure() as m:
                prune_layerwise(model, calib, alloc.sparsity_map, pruner, progress=False)
        else:
            m = {"seconds": 0.0}
        _, overall = measured_sparsity(model)
        ppl = perplexity(model, test, progress=False)
        entry = {"target": str(target), "method": method, "pruner": pruner, "ppl": ppl, "sparsity": overall,
                 "requested_average": alloc.sparsity_map.average(counts), "allocation_seconds": round(alloc_s, 1),
                 "prune_seconds": m["seconds"], "per_layer": alloc.sparsity_map.to_dict(),
                 "sensitivity_kind": alloc.sensitivity_kind, "searched_with": searched_with, "command": command_line()}
        if alloc.search:
            entry["search"] = {k: v for k, v in alloc.search.items() if k != "history"}
            entry["search_history"] = alloc.search["history"]
        res.add(key, entry)
        print(f"{key}: ppl {ppl:.2f} sparsity {overall:.4f} alloc {alloc_s:.0f}s", flush=True)

    if not args.nm_only:
        for target in args.targets.split(","):
            for pruner in args.pruners.split(","):
                for method in args.methods.split(","):
                    tag = f"{method}-{args.variant}" if args.variant and method == "msp" else method
                    run(f"{tag}/{pruner}@{target}", float(target), method, pruner)
            render(res, args.out)
    if args.nm or args.nm_only:
        for pruner in args.pruners.split(","):
            run(f"uniform/{pruner}@2:4", "2:4", "uniform", pruner)
            run(f"msp/{pruner}@2:4", "2:4", "msp", pruner, {"search.patterns": ["1:4", "2:4", "3:4"]})
    render(res, args.out)


def _search_cell(msp: dict | None) -> str:
    if not msp:
        return "—"
    if msp.get("searched_with"):
        return f"map searched with {msp['searched_with']}"
    search = msp.get("search") or {}
    # search seconds span resumed runs (an extended search); allocation_seconds covers one invocation
    return f"{fmt(search.get('seconds', msp['allocation_seconds']), 0)} ({search.get('generations', '?')} gen.)"


def _sensitivities(out: str) -> dict[str, dict[str, float]]:
    """Sensitivity scores cached by the runs (one file per kind), for the per-layer plot."""
    sens = {}
    for f in sorted(Path(out + "_work", "scores").glob("*.json")):
        data = json.loads(f.read_text())
        if data.get("kind") in ("fisher", "hessian"):
            sens[data["kind"]] = {k: abs(float(v)) for k, v in data["scores"]}
    return sens


def render(res: Results, out: str) -> None:
    e, meta = res.data["entries"], res.data["meta"]
    dense = e["dense"]["ppl"]
    commands = meta.get("commands") or [meta["command"]]
    lines = ["# Per-layer sparsity allocation: test perplexity", "",
             "Commands (entries from all of them, in order):", "", *[f"- `{c}`" for c in commands], "",
             f"Model: {meta['model']}; calibration: {meta['calibration']}; evaluation: {meta['evaluation']}; "
             f"search fitness: {meta['search_fitness']}. Each MSP cell shows its own number of generations; every "
             "entry's command and settings are listed at the end.", "",
             f"Dense perplexity: **{fmt(dense)}**", ""]
    targets = sorted({v["target"] for k, v in e.items() if k != "dense"})
    pruners = sorted({v["pruner"] for k, v in e.items() if k != "dense"}, reverse=True)
    lines += ["| target | pruner | " + " | ".join(METHODS) + " | MSP / uniform | MSP / OWL | MSP search (s) |",
              "|---|---|" + "---|" * (len(METHODS) + 3)]
    for t in targets:
        for p in pruners:
            row = [e.get(f"{m}/{p}@{t}") for m in METHODS]
            if not any(row):
                continue
            ppl = {m: r["ppl"] for m, r in zip(METHODS, row) if r}
            msp = e.get(f"msp/{p}@{t}")
            ratio_u = fmt(ppl["msp"] / ppl["uniform"], 3) if "msp" in ppl and "uniform" in ppl else "—"
            ratio_o = fmt(ppl["msp"] / ppl["owl"], 3) if "msp" in ppl and "owl" in ppl else "—"
            lines.append(f"| {t} | {p} | " + " | ".join(fmt(ppl.get(m)) for m in METHODS)
                         + f" | {ratio_u} | {ratio_o} | {_search_cell(msp)} |")
    lines += ["", "MSP search time includes the Fisher trace (cached after the first run), the level cache and the "
              "evolutionary search. Measured overall sparsity (counted zeros), allocation time and the search curve of "
              "each run are in the JSON file.", ""]
    # time each method took to allocate, as measured in this run (sensitivity scores are computed by the
    # first run that needs them and read from the cache afterwards, so later cells show ~0 for them)
    lines += ["## Allocation time (seconds, measured when each cell ran)", "",
              "| target | pruner | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for t in targets:
        for p in pruners:
            row = [e.get(f"{m}/{p}@{t}") for m in METHODS]
            if any(row):
                cells = ["—" if r is None else ("reused map" if r.get("searched_with") else fmt(r["allocation_seconds"], 0))
                         for r in row]
                lines.append(f"| {t} | {p} | " + " | ".join(cells) + " |")
    lines += ["", "A cell of ~0-2 s for Fisher/Hessian means the scores came from the cache filled by an earlier cell "
              "(the first computation is the largest number in its column).", ""]
    variants = sorted(k for k in e if k.startswith("msp-") and not k.startswith(("msp-sameshape", "msp-seqfinal")))
    if variants:
        lines += ["## Other MSP search settings", "",
                  "A variant whose work directory was seeded with the default cell's `search_state.json` continues that "
                  "search along the same trajectory (msp-g100: the 50-generation search at 80% run on to 100), so its "
                  "generations and seconds include the default cell's.", "",
                  "| cell | test perplexity | generations | search (s) | command |",
                  "|---|---|---|---|---|"]
        for k in variants:
            r = e[k]
            lines.append(f"| {k} | {fmt(r['ppl'])} | {(r.get('search') or {}).get('generations', '—')} | "
                         f"{fmt((r.get('search') or {}).get('seconds'), 0)} | `{r.get('command', '—')}` |")
        lines.append("")
    older = sorted(k for k in e if k.startswith("msp-sameshape/"))
    if older:
        lines += ["## Search operators: same-shape moves vs moves between any layer sizes", "",
                  "`msp-sameshape` entries come from an earlier search whose mutation moved a level only between "
                  "two layers of the same shape (so the attention/MLP split stayed as the Fisher mapping set it); "
                  "the current mutation pays a level of one layer with layers whose sizes sum exactly to it "
                  "(an MLP layer with q, k, v, o).", "",
                  "| cell | same-shape moves | any-size moves |", "|---|---|---|"]
        for k in older:
            cell = k.split("/", 1)[1]
            old, new = e[k], e.get(f"msp/{cell}")

            def desc(r):
                if r is None:
                    return "—"
                if r.get("searched_with"):
                    return f"{fmt(r['ppl'])} (map searched with {r['searched_with']})"
                return f"{fmt(r['ppl'])} ({(r.get('search') or {}).get('generations', '?')} gen.)"

            lines.append(f"| {cell} | {desc(old)} | {desc(new)} |")
        lines.append("")
    lines += provenance_lines(e, meta)
    write_markdown(Path(out + ".md"), "\n".join(lines) + "\n")
    for t in targets:
        # the main table's cells only (variants and superseded entries share method/pruner names)
        allocs = {f"{v['method']}/{v['pruner']}": v["per_layer"] for k, v in e.items()
                  if k != "dense" and k.split("/")[0] in METHODS and v["target"] == t and ":" not in t}
        # one line per method when every pruner got the same map (allocation never depends on the pruner)
        for method in METHODS:
            same = [k for k in allocs if k.startswith(method + "/")]
            if len(same) > 1 and all(allocs[k] == allocs[same[0]] for k in same):
                allocs[method] = allocs[same[0]]
                for k in same:
                    del allocs[k]
        if allocs:
            allocs = {k: {n: float(s) for n, s in v.items()} for k, v in allocs.items()}
            plot_allocations(allocs, _sensitivities(out) or None, Path(f"{out}_{t}.png"),
                             f"per-layer sparsity at {t} (sensitivity: |trace| per layer)")


if __name__ == "__main__":
    main()

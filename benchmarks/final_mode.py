"""One-shot vs sequential pruning for every allocation method's per-layer map.

"sequential" (the engine's default, as in the Wanda/SparseGPT reference code) calibrates each block on
the outputs of the already-pruned blocks before it; "one-shot" calibrates every block on dense
activations. For MSP, one-shot is exactly the "stitched" candidate the search scored (its level cache
is pruned on dense activations), which is why ``search.final: stitched`` is the default. Maps come
from allocation.json; same calibration and test windows as allocation.py.

    python final_mode.py --targets 0.7,0.8 --calib-samples 8 --eval-tokens 8192
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, Results, command_line, fmt, load_setup, measure, write_markdown
from mixsparse.engine import prune_layerwise
from mixsparse.evaluation import perplexity
from mixsparse.modeling import param_counts
from mixsparse.sparsity import SparsityMap

METHODS = ["uniform", "owl", "hessian", "fisher", "msp"]
MODES = {"sequential": True, "one-shot": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="0.7,0.8")
    ap.add_argument("--pruner", default="wanda")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--allocation", default=str(RESULTS / "allocation.json"))
    ap.add_argument("--out", default=str(RESULTS / "final_mode"))
    ap.add_argument("--render-only", action="store_true", help="only rewrite the Markdown from the JSON")
    args = ap.parse_args()
    if args.render_only:
        render(Results(Path(args.out + ".json"), None), args.out)
        return

    alloc = json.loads(Path(args.allocation).read_text())["entries"]
    model, tok, pristine, calib, test = load_setup("embedded", args.calib_samples, args.seqlen, args.eval_tokens)
    counts = param_counts(model)
    res = Results(Path(args.out + ".json"), {"command": command_line(), "pruner": args.pruner,
                                             "calibration": f"wiki calibration split, {args.calib_samples}x{args.seqlen}",
                                             "evaluation": f"wiki test split, {test.numel()} tokens"})
    for t in args.targets.split(","):
        for method in METHODS:
            entry = alloc.get(f"{method}/{args.pruner}@{t}")
            if entry is None:
                print(f"skip {method}@{t}: not in {args.allocation}")
                continue
            smap = SparsityMap(entry["per_layer"], counts)
            for mode, sequential in MODES.items():
                key = f"{method}/{mode}@{t}"
                if res.has(key):
                    continue
                model.load_state_dict(pristine)
                with measure() as m:
                    prune_layerwise(model, calib, smap, args.pruner, sequential=sequential, progress=False)
                ppl = perplexity(model, test, progress=False)
                res.add(key, {"target": t, "method": method, "mode": mode, "ppl": ppl, "prune_seconds": m["seconds"]})
                print(f"{key}: {ppl:.1f}", flush=True)
    render(res, args.out)


def render(res: Results, out: str) -> None:
    e, meta = res.data["entries"], res.data["meta"]
    lines = ["# One-shot vs sequential pruning of each method's per-layer map", "",
             f"Command: `{meta['command']}`; pruner {meta['pruner']}; {meta['calibration']}; {meta['evaluation']}. "
             "Maps: `METHOD/PRUNER@TARGET` of allocation.json (MSP: the searched map; its one-shot model is the "
             "stitched candidate the search scored).", "",
             "| target | mode | " + " | ".join(METHODS) + " | MSP / uniform | MSP / OWL |", "|---|---|" + "---|" * (len(METHODS) + 2)]
    for t in sorted({v["target"] for v in e.values()}):
        for mode in MODES:
            row = {m: e.get(f"{m}/{mode}@{t}") for m in METHODS}
            ratios = [fmt(row["msp"]["ppl"] / row[b]["ppl"], 3) if row["msp"] and row[b] else "—" for b in ("uniform", "owl")]
            lines.append(f"| {t} | {mode} | " + " | ".join(fmt(r["ppl"]) if r else "—" for r in row.values())
                         + f" | {ratios[0]} | {ratios[1]} |")
    lines += ["", "Ratios compare MSP with a baseline pruned in the same mode. The main allocation table prunes the "
              "baselines sequentially (the engine's default, as the Wanda reference code does) and takes MSP's final "
              "model as the stitched candidate (`search.final: stitched`, default), i.e. MSP's one-shot row here.", ""]
    write_markdown(Path(out + ".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

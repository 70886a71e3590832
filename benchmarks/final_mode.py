"""How the searched allocation is turned into the final model: "stitched" (exactly the candidate the
search scored: every layer's pruned weights from the level cache, computed on dense activations) vs
"sequential" (prune again layer by layer, each layer calibrated on the already-pruned model's
activations; the default). Reads the MSP maps from allocation.json; test perplexity on the same
windows as allocation.py.

    python final_mode.py --targets 0.7,0.8 --calib-samples 8 --eval-tokens 8192
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path


from common import RESULTS, Results, command_line, fmt, measure, write_markdown
from mixsparse.data import calibration_ids, eval_windows, load_corpus
from mixsparse.engine import prune_layerwise
from mixsparse.evaluation import perplexity
from mixsparse.loading import load_model
from mixsparse.modeling import param_counts
from mixsparse.search import LevelCache, LevelSpace
from mixsparse.sparsity import SparsityMap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="0.7,0.8")
    ap.add_argument("--pruner", default="wanda")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--allocation", default=str(RESULTS / "allocation.json"))
    ap.add_argument("--out", default=str(RESULTS / "final_mode"))
    args = ap.parse_args()

    alloc = json.loads(Path(args.allocation).read_text())["entries"]
    model, tok = load_model("embedded")
    pristine = copy.deepcopy(model.state_dict())
    counts = param_counts(model)
    test = eval_windows(tok, load_corpus("wiki", "test"), args.seqlen, args.eval_tokens)
    calib = calibration_ids(tok, load_corpus("wiki", "calibration"), args.calib_samples, args.seqlen, 0)
    res = Results(Path(args.out + ".json"), {"command": command_line(), "pruner": args.pruner,
                                             "calibration": f"wiki calibration split, {args.calib_samples}x{args.seqlen}",
                                             "evaluation": f"wiki test split, {test.numel()} tokens"})
    for t in args.targets.split(","):
        entry = alloc.get(f"msp/{args.pruner}@{t}")
        if entry is None:
            print(f"skip {t}: no msp/{args.pruner}@{t} in {args.allocation}")
            continue
        smap = SparsityMap(entry["per_layer"], counts)
        if not res.has(f"sequential@{t}"):
            model.load_state_dict(pristine)
            with measure() as m:
                prune_layerwise(model, calib, smap, args.pruner, progress=False)
            res.add(f"sequential@{t}", {"target": t, "mode": "sequential", "ppl": perplexity(model, test, progress=False),
                                        "seconds": m["seconds"]})
        if not res.has(f"stitched@{t}"):
            model.load_state_dict(pristine)
            space = LevelSpace.unstructured(float(t), counts, step=0.05, max_shift=0.25)
            with measure() as m:
                cache = LevelCache.build(model, space, calib, args.pruner, progress=False)
                cache.apply(space.snap({n: float(v) for n, v in entry["per_layer"].items()}))
            res.add(f"stitched@{t}", {"target": t, "mode": "stitched", "ppl": perplexity(model, test, progress=False),
                                      "seconds": m["seconds"]})
        print(t, {k: round(v["ppl"], 1) for k, v in res.data["entries"].items() if k.endswith(t)}, flush=True)
    e = res.data["entries"]
    lines = ["# Final model from a searched allocation: sequential re-pruning vs the stitched candidate", "",
             f"Command: `{res.data['meta']['command']}`; pruner {args.pruner}; {res.data['meta']['calibration']}; "
             f"{res.data['meta']['evaluation']}. Maps: `msp/{args.pruner}@target` of allocation.json.", "",
             "| target | sequential (default) | stitched |", "|---|---|---|"]
    for t in sorted({v["target"] for v in e.values()}):
        lines.append(f"| {t} | {fmt(e.get(f'sequential@{t}', {}).get('ppl'))} | {fmt(e.get(f'stitched@{t}', {}).get('ppl'))} |")
    write_markdown(Path(args.out + ".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

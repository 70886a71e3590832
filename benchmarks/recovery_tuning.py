"""Tuning of the block-wise recovery defaults, chosen on the validation split and reported on the test split.

Uniform 70% Wanda on the embedded model (32x512 wiki calibration windows), then block-wise reconstruction for
each setting of the grid (epochs x learning rate; inputs recovered, params linears, batch 2, the default
autocast); per setting: seconds, validation perplexity (wiki validation split, the choice) and test perplexity
(wiki test split, 20,480 tokens, reported). Writes results/recovery_tuning.{json,md}; the Markdown marks the
setting with the lowest validation perplexity. Run it alone.

    python benchmarks/recovery_tuning.py                       # the grid: epochs 2,4 x lr 1e-3,3e-3,1e-2
    python benchmarks/recovery_tuning.py --epochs 4 --lrs 3e-3
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import RESULTS, Results, command_line, fmt, produced_by, provenance_lines, write_markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", default="2,4")
    ap.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    ap.add_argument("--val-tokens", type=int, default=8192)
    ap.add_argument("--test-tokens", type=int, default=20480)
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()

    from mixsparse.config import RunConfig
    from mixsparse.data import Calibration, eval_windows, load_corpus
    from mixsparse.engine import prune_layerwise
    from mixsparse.evaluation import perplexity
    from mixsparse.loading import load_model
    from mixsparse.modeling import param_counts
    from mixsparse.recovery.blockwise import reconstruct_blockwise
    from mixsparse.recovery.common import DenseStore
    from mixsparse.recovery.options import BlockwiseOptions
    from mixsparse.sparsity import SparsityMap

    meta = {"command": command_line(), "model": "embedded", "cell": "uniform Wanda 70%, sequential",
            "calibration": "wiki calibration split, 32x512", "validation": f"wiki validation split, {args.val_tokens} tokens",
            "test": f"wiki test split, {args.test_tokens} tokens", "fixed": "batch 2, inputs recovered, params linears, "
            "dtype auto", "torch": torch.__version__, "threads": torch.get_num_threads()}
    res = Results(RESULTS / "recovery_tuning.json", meta, fresh=args.fresh)
    torch.manual_seed(0)
    model, tok = load_model("embedded")
    ids = Calibration(tok, RunConfig()).ids(32, 512)
    val = eval_windows(tok, load_corpus("wiki", "validation"), 512, args.val_tokens)
    test = eval_windows(tok, load_corpus("wiki", "test"), 512, args.test_tokens)
    with tempfile.TemporaryDirectory() as d:
        store = DenseStore.snapshot(model, f"{d}/dense", "x")
        prune_layerwise(model, ids, SparsityMap.uniform(0.7, param_counts(model)), "wanda", progress=False)
        pruned = {k: v.clone() for k, v in model.state_dict().items()}
        if not res.has("pruned"):
            res.add("pruned", {"val_ppl": perplexity(model, val, progress=False),
                               "test_ppl": perplexity(model, test, progress=False)})
        for epochs in map(int, args.epochs.split(",")):
            for lr in map(float, args.lrs.split(",")):
                key = f"epochs={epochs},lr={lr:g}"
                if res.has(key):
                    continue
                model.load_state_dict(pruned)
                t0 = time.perf_counter()
                rec = reconstruct_blockwise(model, ids, store, BlockwiseOptions(epochs=epochs, lr=lr), progress=False)
                seconds = time.perf_counter() - t0
                res.add(key, {"epochs": epochs, "lr": lr, "seconds": round(seconds, 1),
                              "val_ppl": perplexity(model, val, progress=False),
                              "test_ppl": perplexity(model, test, progress=False), "autocast": rec["autocast"]})
                print(key, res.get(key)["val_ppl"], res.get(key)["test_ppl"], flush=True)
    render(res)


def render(res: Results) -> None:
    e, meta = res.data["entries"], res.data["meta"]
    grid = {k: v for k, v in e.items() if k != "pruned"}
    best = min(grid, key=lambda k: grid[k]["val_ppl"]) if grid else None
    rows = ["| epochs | lr | seconds | validation ppl (choice) | test ppl (reported) |", "|---:|---:|---:|---:|---:|"]
    for k, v in grid.items():
        mark = " **(chosen)**" if k == best else ""
        rows.append(f"| {v['epochs']} | {v['lr']:g} | {fmt(v['seconds'], 1)} | {fmt(v['val_ppl'])}{mark} | {fmt(v['test_ppl'])} |")
    p = e.get("pruned", {})
    text = ["# Block-wise recovery: tuning on the validation split", "", produced_by(meta), "",
            f"Cell: {meta['cell']} ({meta['calibration']}); fixed: {meta['fixed']}. Choice by {meta['validation']}; "
            f"reported on {meta['test']}. Before recovery: validation {fmt(p.get('val_ppl'))}, test {fmt(p.get('test_ppl'))}.",
            "", *rows, "", *provenance_lines(e, meta)]
    write_markdown(RESULTS / "recovery_tuning.md", "\n".join(text) + "\n")


if __name__ == "__main__":
    main()

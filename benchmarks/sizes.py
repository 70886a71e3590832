"""Checkpoint sizes: HF safetensors (dense with zeros) vs the compressed checkpoint (bitmask or N:M
packed), with an exact round-trip check, on the embedded model pruned by magnitude (no calibration
needed: sizes depend only on the sparsity pattern).

    python benchmarks/sizes.py      # writes benchmarks/results/sizes.json and sizes.md (~1 min)
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from common import RESULTS, Results, command_line, fmt, write_markdown
from mixsparse.engine import prune_layerwise
from mixsparse.export import load_compressed, save_compressed, save_hf
from mixsparse.loading import load_model
from mixsparse.modeling import param_counts
from mixsparse.sparsity import SparsityMap

SETTINGS = ["0.5", "0.7", "0.8", "2:4"]


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--out", default=str(RESULTS / "sizes"))
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    model, tok = load_model(args.model)
    pristine = copy.deepcopy(model.state_dict())
    counts = param_counts(model)
    res = Results(Path(args.out + ".json"), {"command": command_line(), "model": args.model, "dtype": args.dtype},
                  fresh=True)
    for setting in SETTINGS:
        model.load_state_dict(pristine)
        smap = SparsityMap.uniform(setting, counts)
        prune_layerwise(model, None, smap, "magnitude", progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            half = copy.deepcopy(model).to(dtype)
            hf = save_hf(half, tok, Path(tmp) / "hf", {"target": setting})
            sizes = save_compressed(model, Path(tmp) / "c", dtype=dtype, sparsity_map=smap)
            restored = load_compressed(Path(tmp) / "c")
            exact = all(torch.equal(a, b) for a, b in zip(half.state_dict().values(), restored.state_dict().values()))
            res.add(setting, {**sizes, "hf_checkpoint_bytes": _dir_bytes(hf), "bit_exact_round_trip": exact})
        print(setting, sizes["ratio"], sizes["prunable_ratio"], exact, flush=True)
    e = res.data["entries"]
    lines = ["# Checkpoint sizes", "", f"Command: `{res.data['meta']['command']}`", "",
             f"Model: {args.model}, stored as {args.dtype}; magnitude pruning, uniform. "
             "The whole-checkpoint ratio includes the dense token embedding (tied with lm_head, 28M of 134.5M "
             "parameters), which is not pruned.", "",
             "| sparsity | HF safetensors (MB) | compressed (MB) | whole ratio | prunable layers ratio | bit-exact reload |",
             "|---|---|---|---|---|---|"]
    for s in SETTINGS:
        r = e[s]
        lines.append(f"| {s} | {r['hf_checkpoint_bytes'] / 1e6:,.1f} | {r['compressed_bytes'] / 1e6:,.1f} | "
                     f"{fmt(r['ratio'], 3)} | {fmt(r['prunable_ratio'], 3)} | {r['bit_exact_round_trip']} |")
    write_markdown(Path(args.out + ".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

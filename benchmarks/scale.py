"""Memory of MSP's search at scale: level database bytes (RAM and disk) and peak RSS on a ~1.1B-parameter
LLaMA-shaped random model (TinyLlama's shape, bfloat16 as a user loads 7B+ checkpoints) on the CPU,
for Wanda and SparseGPT, with a 2-generation search; then a projection to 7B, 13B and 70B from the
measured bytes per parameter.

Each pruner runs in its own process (peak RSS is per process), blockwise placement (the path for models
larger than the device: one block's candidate weights exist at a time), fitness in the model's dtype
with the top-64 KL reference. Weight values do not change memory or time, only shapes do.

    python benchmarks/scale.py                      # both pruners (~15 min on 2 CPU cores)
    python benchmarks/scale.py --pruners wanda --shape tiny   # smoke test
    python benchmarks/scale.py --render-only
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS, _rss_mb, command_line, measure, write_markdown
from large_model import materialize, release_free_memory

SHAPES = {
    # TinyLlama-1.1B: 22 layers, hidden 2048, MLP 5632, 32 heads with 4 key/value heads (GQA), vocab 32000
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}
# parameter counts of the models the projection is for (Llama-2 7B/13B/70B; Llama-3-8B is 8.0e9)
PROJECT = {"7B": 6.74e9, "13B": 13.0e9, "70B": 69.0e9}


def build(shape: str, dtype: torch.dtype):
    from transformers import LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, tie_word_embeddings=False, dtype=dtype)
    return materialize(config, dtype)


def run_one(args) -> dict:
    from mixsparse.modeling import param_counts
    from mixsparse.placement import model_bytes
    from mixsparse.search import Fitness, LevelDatabase, LevelSpace, SearchConfig, evolutionary_search
    from mixsparse.search.space import block_index_map

    dtype = getattr(torch, args.dtype)
    model = build(args.shape, dtype)
    counts = param_counts(model)
    params = sum(p.numel() for p in model.parameters())
    vocab = SHAPES[args.shape]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, vocab, (args.calib_samples, args.seqlen), generator=g)
    windows = torch.randint(0, vocab, (args.windows, args.seqlen), generator=g)
    space = LevelSpace.unstructured(0.7, counts, step=args.step, max_shift=args.max_shift)
    levels = len(list(space.offsets))
    gc.collect()
    release_free_memory()
    rss_model = _rss_mb()
    store = Path(tempfile.mkdtemp(prefix="scale-levels-", dir=args.workdir))
    with measure() as m_build:
        t0 = time.perf_counter()
        db = LevelDatabase.build(model, space, calib, args.pruner, store_dir=store, progress=False)
        db_seconds = time.perf_counter() - t0
        db_ram, db_disk = db.ram_bytes_used(), db.disk_bytes()
    gc.collect()
    release_free_memory()
    with measure() as m:
        fit = Fitness(db, windows, "kl", placement="blockwise", dtype="model", kl_topk=64)
        cfg = SearchConfig(generations=2, population=2, offspring=4, stages=[[1, 2], [2, 1]], seed=0)
        t1 = time.perf_counter()
        res = evolutionary_search(fit, space, [{n: 0 for n in counts}], cfg,
                                  blocks_of=block_index_map(model, list(counts)), progress=False)
        search_seconds = time.perf_counter() - t1
        hist = res.history
        spg = (hist[-1]["seconds"] - hist[0]["seconds"]) / max(1, res.generations)
        del fit
        db.write(res.offsets)
        db.free()
    import shutil

    shutil.rmtree(store, ignore_errors=True)
    blocks = SHAPES[args.shape]["num_hidden_layers"]
    block_params = sum(counts.values()) / blocks
    itemsize = torch.tensor([], dtype=dtype).element_size()
    beyond = (max(m["peak_rss_mb"], m_build["peak_rss_mb"]) - rss_model) * 2**20
    search_beyond = (m["peak_rss_mb"] - rss_model) * 2**20
    return {
        "params": params, "prunable_params": sum(counts.values()), "dtype": args.dtype, "shape": args.shape,
        "model_mb": round(model_bytes(model) / 2**20, 1), "rss_model_mb": round(rss_model, 1),
        "peak_rss_mb": max(m["peak_rss_mb"], m_build["peak_rss_mb"]), "rss_beyond_model_mb": round(beyond / 2**20, 1),
        "build_peak_rss_mb": m_build["peak_rss_mb"], "search_peak_rss_mb": m["peak_rss_mb"],
        "search_rss_beyond_model_mb": round(search_beyond / 2**20, 1),
        "search_rss_beyond_model_bytes_per_param": round(search_beyond / params, 3),
        "rss_beyond_model_bytes_per_param": round(beyond / params, 3),
        "ram_bytes_per_param": round(db_ram / params, 3), "disk_bytes_per_param": round(db_disk / params, 3),
        "level_db_ram_mb": round(db_ram / 2**20, 1), "level_db_disk_mb": round(db_disk / 2**20, 1),
        "levels": levels, "one_block_levels_mb": round(block_params * levels * itemsize / 2**20, 1),
        "level_db_seconds": round(db_seconds, 1), "search_seconds": round(search_seconds, 1),
        "seconds_per_generation": round(spg, 2), "calibration": f"{args.calib_samples}x{args.seqlen}",
        "fitness": f"{args.windows} windows x {args.seqlen} tokens, blockwise, model dtype, top-64 KL",
        "search": "2 generations, population 2, offspring 4, stages [[1,2],[2,1]]",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "command": command_line(),
    }


def render(data: dict, path: Path) -> None:
    lines = ["# MSP search memory at scale (CPU, 2 cores)", "",
             "A random LLaMA-shaped model built from a config; level database built on random calibration tokens, "
             "then a 2-generation search with blockwise fitness. `RAM beyond model` = peak RSS during database build "
             "+ search minus RSS with the model loaded (it includes the pruner's statistics, e.g. SparseGPT's Hessians, "
             "activations and the database).", "",
             "| pruner | params | dtype | levels | model (MB) | peak RSS (MB) | RAM beyond model (MB): build / search "
             "| beyond / param (B): build+search / search | level DB RAM / param (B) | level DB disk / param (B) "
             "| one block's levels (MB) | DB build (s) | s / gen |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for pruner, e in data.items():
        build_beyond = e.get("build_peak_rss_mb", e["peak_rss_mb"]) - e["rss_model_mb"]
        lines.append(f"| {pruner} | {e['params'] / 1e9:.2f}B | {e['dtype']} | {e['levels']} | {e['model_mb']:,.0f} | "
                     f"{e['peak_rss_mb']:,.0f} | {build_beyond:,.0f} / {e.get('search_rss_beyond_model_mb', float('nan')):,.0f} | "
                     f"{e['rss_beyond_model_bytes_per_param']:.2f} / {e.get('search_rss_beyond_model_bytes_per_param', float('nan')):.2f} | "
                     f"{e['ram_bytes_per_param']:.2f} | {e['disk_bytes_per_param']:.2f} | {e['one_block_levels_mb']:,.0f} | "
                     f"{e['level_db_seconds']:.0f} | {e['seconds_per_generation']:.1f} |")
    lines += ["", "## Projection (from the measured bytes per parameter; linear in parameters)", "",
              "Level database per parameter does not depend on the model size (one byte per weight for Wanda; "
              "levels x bytes per weight on disk for SparseGPT). The RAM-beyond-model column projects the measured "
              "ratio, which for SparseGPT is dominated by one block's Hessians (they grow with hidden size squared, "
              "so this projection is rough). Seconds per generation on this 2-core CPU scale with parameters x "
              "fitness tokens; GPU numbers are to be measured (`python benchmarks/large_model.py --shape 7b "
              "--device cuda`).", "",
              "| pruner | model | level DB RAM (GB) | level DB disk (GB) | RAM beyond model (GB) | CPU s / generation |",
              "|---|---|---|---|---|---|"]
    for pruner, e in data.items():
        for name, n in PROJECT.items():
            lines.append(f"| {pruner} | {name} | {e['ram_bytes_per_param'] * n / 1e9:,.1f} | "
                         f"{e['disk_bytes_per_param'] * n / 1e9:,.1f} | {e['rss_beyond_model_bytes_per_param'] * n / 1e9:,.1f} | "
                         f"{e['seconds_per_generation'] * n / e['params']:,.0f} |")
    lines += ["", "Commands:", ""] + [f"- {p}: `{e['command']}`" for p, e in data.items()]
    write_markdown(path, "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pruners", default="wanda,sparsegpt")
    ap.add_argument("--pruner", help=argparse.SUPPRESS)  # one pruner in this process (internal)
    ap.add_argument("--shape", default="1.1b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--step", type=float, default=0.1)
    ap.add_argument("--max-shift", type=float, default=0.1)
    ap.add_argument("--workdir", default=None, help="where SparseGPT's level files go (default: the system temp dir)")
    ap.add_argument("--out", default=str(RESULTS / "scale"))
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    path = Path(args.out + ".json")
    if args.pruner:
        print(json.dumps(run_one(args)))
        return
    data = json.loads(path.read_text()) if path.exists() else {}
    if not args.render_only:
        from mixsparse.io import atomic_write_json

        for pruner in [p.strip() for p in args.pruners.split(",") if p.strip()]:
            cmd = [sys.executable, __file__, "--pruner", pruner, "--shape", args.shape, "--dtype", args.dtype,
                   "--calib-samples", str(args.calib_samples), "--seqlen", str(args.seqlen), "--windows",
                   str(args.windows), "--step", str(args.step), "--max-shift", str(args.max_shift), "--out", args.out]
            cmd += ["--workdir", args.workdir] if args.workdir else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            entry = json.loads(out)
            entry["command"] = command_line()
            data[pruner] = entry
            atomic_write_json(path, data)
            print(pruner, entry["peak_rss_mb"], entry["ram_bytes_per_param"], entry["disk_bytes_per_param"], flush=True)
    render(data, Path(args.out + ".md"))


if __name__ == "__main__":
    main()

"""A model larger than this machine's RAM, pruned by streaming its blocks from the checkpoint.

Writes a random Llama-shaped bf16 checkpoint (no weights needed: shapes set time and memory) one block per shard
without ever holding the model, then prunes it with ``mixsparse.streaming`` in a fresh process per method
(Wanda 70%, uniform and OWL) on a tiny calibration set, and stores peak RSS, the checkpoint's bytes, seconds and
seconds per block in results/streaming.{json,md} under ``"<shape>/<method>"``, with the bytes per parameter
projected to 70B and 405B. Run it alone (a second torch process on 2 cores slows both); it needs twice the
checkpoint's size on disk (the checkpoint and the pruned blocks).

    python benchmarks/streaming.py --shape 13b --dir /tmp/ms13b      # ~26 GB checkpoint, ~26 GB of pruned blocks
    python benchmarks/streaming.py --shape tiny --dir /tmp/mstiny
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import RESULTS, Results, fmt, produced_by, provenance_lines, write_markdown

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class StreamShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int


SHAPES = {"13b": StreamShape(5120, 13824, 40, 40, 32000),  # Llama-2-13B
          "tiny": StreamShape(64, 128, 4, 4, 512)}
PROJECT = {"70b": 70.6e9, "405b": 405.8e9}  # parameters of Llama-3-70B and -405B
# Llama-3-70B and -405B (hidden, MLP, query heads, key/value heads, vocabulary, blocks): what RAM is projected from
BIG = {"70b": (8192, 28672, 64, 8, 128256, 80), "405b": (16384, 53248, 128, 8, 128256, 126)}


def block_and_rest_bytes(hidden: int, inter: int, heads: int, kv: int, vocab: int, bytes_per: int = 2) -> tuple[int, int]:
    """bf16 bytes of one decoder block (attention with GQA + gated MLP) and of what is outside the blocks
    (untied embeddings and head)."""
    kv_dim = hidden // heads * kv
    block = (2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * inter) * bytes_per
    return block, 2 * vocab * hidden * bytes_per


def ram_projection(entry: dict) -> dict:
    """Peak RSS for a bigger model: the measured peak with this model's block and non-block bytes replaced by the
    bigger one's (the rest, interpreter, torch and activations, assumed unchanged; activations grow with hidden
    size, a few MB at this calibration size)."""
    sh = entry["shape"]
    block, rest = block_and_rest_bytes(sh["hidden"], sh["intermediate"], sh["heads"], sh["heads"], sh["vocab"])
    base = entry["peak_rss_mb"] * 2**20 - entry["peak_live_blocks"] * block - rest
    out = {}
    for k, (h, i, q, kv, v, _) in BIG.items():
        b, r = block_and_rest_bytes(h, i, q, kv, v)
        out[k] = round((base + entry["peak_live_blocks"] * b + r) / 2**30, 1)
    return out


def config(shape: StreamShape):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
                       tie_word_embeddings=False, dtype="bfloat16")


@torch.no_grad()
def make_checkpoint(shape: StreamShape, path: Path, seed: int = 0) -> int:
    """Random N(0, 0.02) weights (norms 1), written shard by shard: one block's tensors in memory at a time."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    cfg = config(shape)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    blocks_prefix = "model.layers."
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for n, p in model.named_parameters():
        key = n.split(".")[2] if n.startswith(blocks_prefix) else "rest"
        groups.setdefault(key, []).append((n, p.shape))
    path.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for k, (group, params) in enumerate(groups.items()):
        tensors = {}
        for n, s in params:
            t = torch.ones(s) if "norm" in n else torch.randn(s, generator=g).mul_(0.02)
            tensors[n] = t.to(torch.bfloat16)
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({n: name for n in tensors})
        total += (path / name).stat().st_size
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    cfg.save_pretrained(path)
    return total


def msp_worker(path: str, samples: int, seqlen: int) -> dict:
    """MSP on a streamed model: Fisher seed, Wanda level database (masks on disk), 2 generations of the search with
    block-outer fitness (every candidate of a stage in one read of the checkpoint), stitched final model."""
    from mixsparse.allocation.budget import score_allocation
    from mixsparse.modeling import measured_sparsity, param_counts
    from mixsparse.search import Fitness, LevelDatabase, LevelSpace, SearchConfig, evolutionary_search
    from mixsparse.sensitivity.fisher import fisher_trace
    from mixsparse.streaming import load_streamed, stream_of

    t0 = time.perf_counter()
    model = load_streamed(path, torch.bfloat16)
    stream = stream_of(model)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, vocab, (samples, seqlen), generator=g)
    windows = torch.randint(0, vocab, (2, seqlen), generator=g)
    counts = param_counts(model)
    marks = {}

    def mark(name: str, since: float) -> float:
        now = time.perf_counter()
        marks[f"{name}_seconds"] = round(now - since, 1)
        marks[f"{name}_block_reads"] = stream.reads - sum(v for k, v in marks.items() if k.endswith("_block_reads"))
        return now

    t = mark("load", t0)
    scores = fisher_trace(model, calib, device="cpu", progress=False)
    t = mark("fisher", t)
    seed = score_allocation(scores, 0.7, counts, mode="log", alpha=0.15)
    space = LevelSpace.unstructured(0.7, counts, step=0.05, max_shift=0.1)
    with LevelDatabase.build(model, space, calib, "wanda", device="cpu", progress=False) as db:
        t = mark("level_db", t)
        db_disk, db_ram = db.disk_bytes(), db.ram_bytes_used()
        fit = Fitness(db, windows, "kl", device="cpu", dtype="model", kl_topk=64, incremental=False)
        t = mark("fitness_reference", t)
        cfg = SearchConfig(generations=2, population=2, offspring=4, stages=[[1, 2], [2, 1]])
        res = evolutionary_search(fit, space, [space.snap(seed), {n: 0 for n in counts}], cfg, progress=False)
        t = mark("search", t)
        passes = marks["search_block_reads"] / len(stream.blocks)
        db.write(res.offsets)
        t = mark("stitch", t)
    _, sparsity = measured_sparsity(model)
    blocks = len(stream.blocks)
    disk = sum(p.stat().st_size for p in stream.work_dir.glob("*.safetensors"))
    return {"seconds": round(time.perf_counter() - t0, 1), **marks, "generations": res.generations,
            "evaluations": fit.evaluations, "checkpoint_passes_in_search": round(passes, 2),
            "seconds_per_generation": round(marks["search_seconds"] / max(1, res.generations), 1),
            "best_fitness": res.fitness, "history": res.history,
            # the whole job per block (what the projection scales): seed, database, search and stitch
            "seconds_per_block": round((time.perf_counter() - t0 - marks["load_seconds"]) / blocks, 2),
            "blocks": blocks, "peak_live_blocks": stream.peak_live, "block_reads": stream.reads,
            "level_db_disk_bytes": db_disk, "level_db_ram_bytes": db_ram, "measured_sparsity": round(sparsity, 6),
            "pruned_blocks_disk_bytes": disk,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def worker(path: str, method: str, samples: int, seqlen: int) -> dict:
    """One streamed prune in this process; its own peak RSS."""
    if method == "msp":
        return msp_worker(path, samples, seqlen)
    from mixsparse.engine import prune_layerwise
    from mixsparse.modeling import measured_sparsity, param_counts
    from mixsparse.sensitivity.owl import owl_outlier_ratios
    from mixsparse.sparsity import SparsityMap
    from mixsparse.streaming import load_streamed, stream_of

    t0 = time.perf_counter()
    model = load_streamed(path, torch.bfloat16)
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    calib = torch.randint(0, vocab, (samples, seqlen), generator=torch.Generator().manual_seed(1))
    counts = param_counts(model)
    t1 = time.perf_counter()
    owl_s = 0.0
    if method == "wanda-owl":
        from mixsparse.allocation.budget import owl_allocation

        ratios = owl_outlier_ratios(model, calib, progress=False)
        owl_s = time.perf_counter() - t1
        smap = owl_allocation(ratios, 0.7, counts, stream_of(model).blocks_name, lam=0.08)
    else:
        smap = SparsityMap.uniform(0.7, counts)
    t2 = time.perf_counter()
    prune_layerwise(model, calib, smap, "wanda", device="cpu", progress=False)
    prune_s = time.perf_counter() - t2
    stream = stream_of(model)
    _, sparsity = measured_sparsity(model)
    disk = sum(p.stat().st_size for p in stream.work_dir.glob("*.safetensors"))
    blocks = len(stream.blocks)
    return {"seconds": round(time.perf_counter() - t0, 1), "load_seconds": round(load_s, 1),
            "owl_seconds": round(owl_s, 1), "prune_seconds": round(prune_s, 1),
            "seconds_per_block": round((prune_s + owl_s) / blocks, 2), "blocks": blocks,
            "peak_live_blocks": stream.peak_live, "block_reads": stream.reads, "measured_sparsity": round(sparsity, 6),
            "pruned_blocks_disk_bytes": disk,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="13b", choices=sorted(SHAPES))
    ap.add_argument("--dir", help="where the random checkpoint is written (kept for reruns)")
    ap.add_argument("--methods", default="wanda-uniform,wanda-owl")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true", help="only rewrite streaming.md from streaming.json")
    args = ap.parse_args()
    if args.render:
        render(Results(RESULTS / "streaming.json", None))
        return
    if not args.dir:
        ap.error("--dir is required (where the random checkpoint is written)")
    if args.worker:
        print(json.dumps(worker(args.dir, args.worker, args.samples, args.seqlen)))
        return
    shape = SHAPES[args.shape]
    path = Path(args.dir)
    if not (path / "model.safetensors.index.json").exists():
        t0 = time.perf_counter()
        make_checkpoint(shape, path)
        print(f"checkpoint written in {time.perf_counter() - t0:.0f} s", flush=True)
    model_bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    params = model_bytes / 2  # bf16
    ram = None
    try:
        import psutil

        ram = psutil.virtual_memory().total
    except ImportError:
        pass
    res = Results(RESULTS / "streaming.json", {"command": "python benchmarks/streaming.py " + " ".join(sys.argv[1:])})
    for method in args.methods.split(","):
        out = subprocess.run([sys.executable, __file__, "--dir", str(path), "--worker", method, "--samples",
                              str(args.samples), "--seqlen", str(args.seqlen)], check=True, capture_output=True, text=True)
        entry = json.loads(out.stdout.strip().splitlines()[-1])
        entry.update({"model_bytes": model_bytes, "params": int(params), "machine_ram_bytes": ram,
                      "calibration": [args.samples, args.seqlen], "shape": shape.__dict__})
        per_param = entry["peak_rss_mb"] * 2**20 / params
        entry["projection"] = {k: {"checkpoint_gb": round(n * 2 / 1e9, 1),
                                   "disk_gb": round(2 * n * 2 / 1e9, 1),  # checkpoint + pruned blocks
                                   "hours": round(entry["seconds_per_block"] * entry["blocks"] * n / params / 3600, 2)}
                               for k, n in PROJECT.items()}
        entry["rss_bytes_per_param"] = round(per_param, 4)
        res.add(f"{args.shape}/{method}", entry)
        print(method, {k: entry[k] for k in ("seconds", "seconds_per_block", "peak_rss_mb", "measured_sparsity")},
              flush=True)
    render(res)


def msp_lines(e: dict) -> list[str]:
    """Where an MSP entry's time went, stage by stage, and how often the search read the checkpoint."""
    rows = []
    for key, v in e.items():
        if "generations" not in v:
            continue
        stages = ", ".join(f"{k[:-8]} {fmt(v[k], 0)} s" for k in v if k.endswith("_seconds") and k != "seconds")
        rows.append(f"- {key}: {stages}; {v['generations']} generations, {v['evaluations']} window evaluations, "
                    f"{fmt(v['seconds_per_generation'], 0)} s per generation, {v['checkpoint_passes_in_search']} reads "
                    f"of the checkpoint in the search (every candidate of a stage in one pass); level database "
                    f"{v['level_db_disk_bytes'] / 1e9:.1f} GB on disk, {v['level_db_ram_bytes']} bytes in RAM; "
                    f"best KL {v['best_fitness']:.4g}." + (f" Note: {v['note']}." if v.get("note") else ""))
    return ["## MSP on the streamed model", "", *rows, ""] if rows else []


def render(res: Results) -> None:
    e, meta = res.data["entries"], res.data["meta"]
    rows = ["| shape / method | checkpoint | machine RAM | peak RSS | seconds | s / block | pruned blocks on disk | "
            "sparsity | projected 70B: RAM, disk, hours | projected 405B: RAM, disk, hours |", "|---|" + "---|" * 9]
    for key, v in e.items():
        p, ram = v["projection"], ram_projection(v)
        rows.append(f"| {key} | {v['model_bytes'] / 1e9:.1f} GB | "
                    f"{(v['machine_ram_bytes'] or 0) / 2**30:.0f} GiB | {fmt(v['peak_rss_mb'], 0)} MB | "
                    f"{fmt(v['seconds'], 0)} | {v['seconds_per_block']} | {v['pruned_blocks_disk_bytes'] / 1e9:.1f} GB | "
                    f"{v['measured_sparsity']:.4f} | {ram['70b']} GiB, {p['70b']['disk_gb']} GB, {p['70b']['hours']} h | "
                    f"{ram['405b']} GiB, {p['405b']['disk_gb']} GB, {p['405b']['hours']} h |")
    text = ["# Streaming a model larger than RAM", "", produced_by(meta), "",
            "A random Llama-shaped bf16 checkpoint (one shard per block), pruned with Wanda to 70% by "
            "`mixsparse.streaming` (blocks read from the checkpoint one at a time, pruned blocks written to a work "
            "directory), in a fresh process per method; calibration: random token ids. Peak RSS is the process's. "
            "Projections (Llama-3-70B and -405B shapes) scale time and disk linearly in parameters; RAM replaces "
            "this model's block and embeddings/head bytes in the measured peak with theirs (RAM grows with one "
            "block and the vocabulary, not with depth).", "", *rows, "",
            *msp_lines(e), *provenance_lines(e, meta)]
    write_markdown(RESULTS / "streaming.md", "\n".join(text) + "\n")


if __name__ == "__main__":
    main()

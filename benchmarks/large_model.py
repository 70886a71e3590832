"""Pruning time and peak memory of the layer-wise engine on a big, randomly initialised LLaMA-shaped model.

No download: the model is built from a config (LLaMA-7B's shape, or a scaled-down one that runs on a
CPU in about a minute) with random weights, and calibrated on random token ids. Weight values and text
do not change how much memory or time pruning takes, only the shapes do.

For each pruner it runs ``prune_layerwise`` at uniform 50% and records wall time, peak process RSS,
on CUDA the peak allocated device memory (reset before each run) and its ratio to the dense model's
size (the engine keeps the model on the CPU and moves one decoder block at a time, so the target is
<= 30%), and on the CPU the engine's working memory: peak RSS during pruning minus RSS before it
(offloaded activations plus one block's statistics), also as a ratio to the model size.

Entries are keyed by shape/device/dtype/calibration/pruner and appended to
benchmarks/results/large_model.json (a GPU run adds its rows next to the CPU rows); large_model.md
is re-rendered from all entries.

    python benchmarks/large_model.py --shape small                 # CPU, about a minute per pruner
    python benchmarks/large_model.py --shape 7b --device cuda      # LLaMA-7B shape, float16, on a GPU
    python benchmarks/large_model.py --shape 7b --device cuda --layers 4 --pruners wanda   # quick look
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from common import RESULTS, Results, _rss_mb, command_line, fmt, measure, write_markdown
from mixsparse.engine import prune_layerwise
from mixsparse.errors import ConfigError
from mixsparse.modeling import measured_sparsity, param_counts
from mixsparse.sparsity import SparsityMap

DEVICE_TARGET = 0.30  # peak device memory / dense model size the engine should stay under on a GPU


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    samples: int  # default calibration samples x seqlen for this shape
    seqlen: int
    kv_heads: int | None = None  # grouped-query attention; None: as many as heads
    rope_theta: float | None = None  # None: the config class's default


SHAPES = {
    # LLaMA-7B; 128 x 2048 tokens is the calibration set of the SparseGPT and Wanda papers.
    "7b": Shape(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000, samples=128, seqlen=2048),
    # Same proportions (intermediate = 2.6875 x hidden, head dim 64) at 1/4 the width and 1/4 the depth.
    "small": Shape(hidden=1024, intermediate=2752, layers=8, heads=16, vocab=32000, samples=8, seqlen=512),
    # For the smoke test only.
    "tiny": Shape(hidden=64, intermediate=128, layers=2, heads=4, vocab=256, samples=2, seqlen=16),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def llama_config(shape: Shape, dtype: torch.dtype):
    from transformers import LlamaConfig

    extra = {} if shape.rope_theta is None else {"rope_theta": shape.rope_theta}
    return LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads or shape.heads,
        max_position_embeddings=max(2048, shape.seqlen), tie_word_embeddings=False, dtype=dtype, **extra,
    )


@torch.no_grad()
def init_random_(model: nn.Module, seed: int, std: float) -> None:
    """Give every weight a fresh value in place: N(0, std) for linears and embeddings, 1 for norms.

    In place so that re-randomising between pruners (each must start from a dense model) needs no
    second copy of a 13 GB model.
    """
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, (nn.Linear, nn.Embedding)) and name == "weight":
                p.normal_(0.0, std, generator=g)
            elif name == "weight":  # RMSNorm scales
                p.fill_(1.0)
            else:
                p.zero_()


def build_model(shape: Shape, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Random LLaMA of ``shape`` on the CPU in ``dtype``, without a float32 or second copy.

    Built on the meta device (no memory, no initialisation), then given uninitialised CPU storage and
    filled in place. The rotary embedding's buffers are computed in its constructor, so meta left them
    empty: those small modules are rebuilt on the CPU.
    """
    return materialize(llama_config(shape, dtype), dtype, seed)


def materialize(config, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The random model of a transformers ``config`` on the CPU in ``dtype`` (see :func:`build_model`)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                setattr(parent, name, type(child)(config=model.config))
    init_random_(model, seed, config.initializer_range)
    return model.eval()


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def release_free_memory() -> None:
    """Return freed heap pages to the OS, so "RSS before" does not count memory a previous run freed
    (glibc keeps it otherwise, and the next run would reuse it unseen)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="override the shape's number of decoder blocks")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; auto = cuda if available")
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto = float16 on GPU, float32 on CPU")
    ap.add_argument("--pruners", default="wanda,sparsegpt")
    ap.add_argument("--sparsity", default="0.5")
    ap.add_argument("--samples", type=int, default=None, help="calibration sequences (default: the shape's)")
    ap.add_argument("--seqlen", type=int, default=None, help="tokens per calibration sequence (default: the shape's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "large_model"))
    ap.add_argument("--fresh", action="store_true", help="forget every entry already in the JSON file")
    ap.add_argument("--note", default=None, help="free text stored with this run's entries (e.g. what else ran)")
    return ap.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[Shape, torch.device, torch.dtype]:
    shape = SHAPES[args.shape]
    if args.layers is not None:
        if args.layers < 1:
            raise ConfigError(f"--layers must be >= 1, got {args.layers}")
        shape = replace(shape, layers=args.layers)
    for flag in ("samples", "seqlen"):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                raise ConfigError(f"--{flag} must be >= 1, got {value}")
            shape = replace(shape, **{flag: value})
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r} is not a torch device") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: this torch ({torch.__version__}) sees no CUDA device")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.float16 if device.type == "cuda" else torch.float32)
    return shape, device, dtype


def shape_label(args: argparse.Namespace, shape: Shape) -> str:
    return args.shape if shape.layers == SHAPES[args.shape].layers else f"{args.shape}-{shape.layers}L"


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the results file's data (``{"meta": ..., "entries": ...}``)."""
    args = parse_args(argv)
    shape, device, dtype = resolve(args)
    label = shape_label(args, shape)
    dtype_name = str(dtype).removeprefix("torch.")
    meta = {"command": command_line() if argv is None else "main(" + repr(argv) + ")",
            "device": device_name(device), "torch": torch.__version__}
    res = Results(Path(args.out + ".json"), meta, fresh=args.fresh)

    model = None
    for pruner in args.pruners.split(","):
        key = f"{label}|{device.type}|{dtype_name}|{shape.samples}x{shape.seqlen}|{args.sparsity}|{pruner}"
        if res.has(key):
            print("already measured:", key)
            continue
        if model is None:
            model = build_model(shape, dtype, args.seed)
            counts = param_counts(model)
            size = model_bytes(model)
            calib = torch.randint(0, shape.vocab, (shape.samples, shape.seqlen),
                                  generator=torch.Generator().manual_seed(args.seed))
        else:  # each pruner starts from the same dense weights, rewritten in place
            init_random_(model, args.seed, model.config.initializer_range)
        targets = SparsityMap.uniform(args.sparsity, counts)
        release_free_memory()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rss_before = _rss_mb()
        load = os.getloadavg()[0]  # other processes competing for the CPU inflate the times
        with measure() as m:
            prune_layerwise(model, calib, targets, pruner, device=device, progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        peak_device = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        model.to("cpu")  # the engine leaves the embeddings and head on the device
        _, sparsity = measured_sparsity(model)
        working = m["peak_rss_mb"] - rss_before
        entry = {
            "shape": label, **asdict(shape), "dtype": dtype_name, "device_type": device.type,
            "device": device_name(device), "torch": torch.__version__, "command": meta["command"],
            "load_average_1min": round(load, 2), "note": args.note,
            "pruner": pruner, "target_sparsity": args.sparsity, "measured_sparsity": round(sparsity, 6),
            "params": sum(p.numel() for p in model.parameters()), "model_bytes": size,
            "prune_seconds": m["seconds"], "seconds_per_block": round(m["seconds"] / shape.layers, 3),
            "rss_before_mb": round(rss_before, 1), "peak_rss_mb": m["peak_rss_mb"],
            "cpu_working_mb": round(working, 1) if device.type == "cpu" else None,
            "cpu_working_ratio": round(working * 2**20 / size, 4) if device.type == "cpu" else None,
            "peak_device_mb": round(peak_device / 2**20, 1) if peak_device is not None else None,
            "peak_device_ratio": round(peak_device / size, 4) if peak_device is not None else None,
        }
        res.add(key, entry)
        print(key, {k: entry[k] for k in ("prune_seconds", "seconds_per_block", "peak_rss_mb", "cpu_working_ratio",
                                         "peak_device_mb", "peak_device_ratio", "measured_sparsity")}, flush=True)
    render(res, args.out + ".md")
    return res.data


def _mib(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def render(res: Results, path: str) -> None:
    entries = sorted(res.data["entries"].values(),
                     key=lambda e: (e["device_type"] != "cpu", e["params"], e["samples"] * e["seqlen"], e["pruner"]))
    lines = [
        "# Large model: pruning time and peak memory of the layer-wise engine", "",
        "Randomly initialised LLaMA-shaped models built from a config (no download), random calibration tokens, "
        "uniform sparsity. The engine keeps the model on the CPU and moves one decoder block at a time to the "
        "device; activations are offloaded to the CPU between blocks. Weight values do not change the cost, "
        "only the shapes do.", "",
        "- **model size**: bytes of all parameters and buffers of the dense model.",
        "- **CPU working memory** (CPU runs): peak RSS during pruning minus RSS just before it: the offloaded "
        "activations plus one block's statistics, i.e. what pruning needs on top of the model. It is resident "
        "memory, so it also counts what the C allocator keeps after frees (an upper bound on live tensors).",
        f"- **peak device memory** (GPU runs): `torch.cuda.max_memory_allocated()`, reset before each run; "
        f"the target is <= {DEVICE_TARGET:.0%} of the model size.",
        "- **s / block**: prune time divided by the number of decoder blocks (includes catching the first "
        "block's inputs).", "",
        "| shape | params | dtype | device | calib (samples x seqlen) | pruner | sparsity | model size (MiB) | "
        "prune time (s) | s / block | peak RSS (MiB) | CPU working memory (MiB) | ... / model | "
        "peak device memory (MiB) | ... / model |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        ok = ""
        if e["peak_device_ratio"] is not None:
            ok = " ✓" if e["peak_device_ratio"] <= DEVICE_TARGET else " ✗"
        lines.append(
            f"| {e['shape']} ({e['layers']}x{e['hidden']}) | {e['params'] / 1e6:,.1f}M | {e['dtype']} | {e['device_type']} | "
            f"{e['samples']} x {e['seqlen']} | {e['pruner']} | {e['measured_sparsity']:.4f} | "
            f"{_mib(e['model_bytes'] / 2**20)} | {fmt(e['prune_seconds'], 1)} | {fmt(e['seconds_per_block'], 2)} | "
            f"{_mib(e['peak_rss_mb'])} | {_mib(e['cpu_working_mb'])} | {_pct(e['cpu_working_ratio'])} | "
            f"{_mib(e['peak_device_mb'])} | {_pct(e['peak_device_ratio'])}{ok} |"
        )
    lines += ["", "## Where each row comes from", ""]
    seen = set()
    for e in entries:
        src = (e["command"], e["device"], e["torch"])
        if src not in seen:
            seen.add(src)
            lines.append(f"- `{e['command']}` on {e['device']}, torch {e['torch']}")
    notes = [f"- {e['shape']} / {e['device_type']} / {e['pruner']}: {e['note']}"
             + (f" (1-min load average before the run: {e['load_average_1min']})" if e.get("load_average_1min") is not None else "")
             for e in entries if e.get("note")]
    if notes:
        lines += ["", "Notes:", ""] + notes
    if not any(e["device_type"] == "cuda" for e in entries):
        lines += ["", "**Not measured yet: LLaMA-7B shape on a GPU.** No GPU was available where these rows were "
                  "measured. The 7B/GPU rows come from "
                  "`python benchmarks/large_model.py --shape 7b --device cuda` on a machine with a GPU "
                  "(float16, 128 x 2048 calibration tokens; it needs about 13 GB of CPU memory for the model plus "
                  "up to three copies of the offloaded activations, 2 GiB each) and are appended to this table."]
    write_markdown(Path(path), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

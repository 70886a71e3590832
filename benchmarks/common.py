"""Shared helpers of the benchmark scripts: timing, peak memory, resumable JSON results, Markdown."""

from __future__ import annotations

import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from mixsparse.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def load_setup(model_name: str, calib_samples: int, seqlen: int, eval_tokens: int, seed: int = 0):
    """What every perplexity benchmark starts from: the model, its tokenizer, a copy of the dense weights
    to restore between cells, wiki calibration windows and wiki test windows."""
    import copy

    from mixsparse.data import calibration_ids, eval_windows, load_corpus, window_prefix
    from mixsparse.loading import load_model

    model, tok = load_model(model_name)
    pristine = copy.deepcopy(model.state_dict())
    prefix = window_prefix(tok)  # the tokenizer's own convention (none for the embedded SmolLM2)
    calib = calibration_ids(tok, load_corpus("wiki", "calibration"), calib_samples, seqlen, seed, prefix=prefix)
    test = eval_windows(tok, load_corpus("wiki", "test"), seqlen, eval_tokens, prefix=prefix)
    return model, tok, pristine, calib, test


def prune_cell(model, calib, cell: str, place, msp_mode: str) -> tuple[object, float]:
    """Prune ``model`` in place for a cell ``ALLOCATION/PRUNER@TARGET`` of the recovery and quantization
    benchmarks: ``uniform`` at the target, sequentially; ``msp`` with the searched map of
    results/allocation.json, by ``msp_mode``: "one-shot" (quantization.py), or "as-searched" (recovery.py, as
    allocation.py prunes: one-shot on dense activations when the map was searched with this pruner, i.e. the
    model the search scored; sequentially when it was searched with another); ``dense`` leaves it. Returns
    (map, seconds)."""
    from mixsparse.engine import prune_layerwise
    from mixsparse.modeling import param_counts
    from mixsparse.sparsity import SparsityMap

    alloc, rest = cell.split("/")
    pruner, target = rest.split("@")
    if alloc == "dense":
        return None, 0.0
    counts = param_counts(model)
    if alloc == "uniform":
        smap, sequential = SparsityMap.uniform(float(target), counts), True
    else:
        entry = json.loads((RESULTS / "allocation.json").read_text())["entries"][f"msp/{pruner}@{target}"]
        if msp_mode not in ("one-shot", "as-searched"):
            raise ValueError(f"msp_mode must be 'one-shot' or 'as-searched', got {msp_mode!r}")
        sequential = msp_mode == "as-searched" and entry.get("searched_with") not in (None, pruner)
        smap = SparsityMap(entry["per_layer"], counts)
    t0 = time.perf_counter()
    prune_layerwise(model, calib, smap, pruner, device=place, sequential=sequential, progress=False)
    return smap, time.perf_counter() - t0


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "fma", "f16c")
# torch's kernels capped at AVX2 (a CPU without AVX-512 or native bf16); set before torch loads its kernels
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def machine() -> dict:
    """The machine a number was measured on: CPU model, the ISA flags that change torch's kernels (native
    bf16 needs avx512_bf16 or amx_bf16), cores, torch version, forced-ISA variables, GPU if any."""
    info = {"cpu": platform.processor() or platform.machine(), "isa": [], "cores": os.cpu_count(),
            "torch": torch.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")))
        info["isa"] = [f for f in ISA_FLAGS if f in flags]
    except (OSError, StopIteration):
        pass
    forced = {k: os.environ[k] for k in AVX2_ENV if k in os.environ}
    if forced:
        info["forced"] = forced
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


@functools.lru_cache(maxsize=1)
def commit() -> str:
    """The checkout's commit (``MIXSPARSE_COMMIT`` where the working tree travels without its .git),
    with ``+dirty`` when tracked files other than result files differ from it (so benchmarks run one after another
    record the code they ran, not the results the one before wrote); read once per process (its first result
    entry), since the code a benchmark runs is the code it imported."""
    if os.environ.get("MIXSPARSE_COMMIT"):
        return os.environ["MIXSPARSE_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(argv: list[str] | None = None) -> dict:
    """What every result entry carries: its command, commit, date and machine."""
    return {"command": command_line() if argv is None else "main(" + repr(argv) + ")", "commit": commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine()}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextmanager
def measure():
    """Wall time and peak resident memory (sampled every 20 ms) of the enclosed block."""
    out = {"seconds": 0.0, "peak_rss_mb": 0.0}
    peak = [_rss_mb()]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            stop.wait(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = round(time.perf_counter() - t0, 2)
        stop.set()
        t.join()
        out["peak_rss_mb"] = round(max(peak[0], _rss_mb()), 1)
        if torch.cuda.is_available():
            out["peak_device_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)


class Results:
    """A JSON file of named entries, rewritten atomically after each entry (a killed benchmark keeps
    what it measured, and a rerun skips entries already there unless --fresh)."""

    def __init__(self, path: Path, meta: dict | None, fresh: bool = False):
        """``meta=None`` keeps the file's own metadata (for re-rendering)."""
        self.path = path
        self.data = {"meta": meta, "entries": {}}
        if path.exists() and not fresh:
            old = json.loads(path.read_text())
            self.data["entries"] = old.get("entries", {})
            if meta is None:
                self.data["meta"] = old.get("meta")
            else:  # entries measured by earlier invocations keep the commands that made them
                earlier = (old.get("meta") or {}).get("commands") or [(old.get("meta") or {}).get("command")]
                meta["commands"] = [c for c in earlier if c and c != meta.get("command")] + [meta.get("command")]

    def has(self, key: str) -> bool:
        return key in self.data["entries"]

    def add(self, key: str, entry: dict, settings: dict | None = None) -> None:
        """Store an entry with its own provenance: the command and settings of this invocation, commit, date and
        machine (a later run with other settings rewrites the file's meta, never an entry's). ``settings``: this
        entry's own, over the meta's."""
        meta = self.data.get("meta") or {}
        settings = {**{k: v for k, v in meta.items() if k not in ("command", "commands")}, **(settings or {})}
        entry = {**entry, "provenance": entry.get("provenance") or {**provenance(), "command": meta.get("command")
                                                                    or command_line(), "settings": settings}}
        self.data["entries"][key] = entry
        atomic_write_json(self.path, self.data)

    def get(self, key: str) -> dict | None:
        return self.data["entries"].get(key)

    def annotate(self, key: str, note: str) -> None:
        """Attach a note to a measured entry (what the numbers cannot say: e.g. that a run shared the machine)."""
        if key not in self.data["entries"]:
            raise SystemExit(f"no entry {key!r} in {self.path}; entries: {', '.join(self.data['entries'])}")
        self.data["entries"][key]["note"] = note
        atomic_write_json(self.path, self.data)


def produced_by(meta: dict) -> str:
    """The Markdown line naming every command whose entries a results file holds."""
    return "Produced by: " + "; ".join(f"`{c}`" for c in (meta.get("commands") or [meta["command"]]))


def write_markdown(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def fmt(x, digits=2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def provenance_lines(entries: dict, meta: dict) -> list[str]:
    """Markdown: which entries each command (with its settings, commit, date and machine) produced. Entries
    stored before entries carried their own provenance are listed with the file's commands of that time."""
    groups: dict[str, list[str]] = {}
    legacy = []
    for key, e in entries.items():
        p = e.get("provenance") if isinstance(e, dict) else None
        if not p:
            legacy.append(key)
            continue
        m = p.get("machine") or {}
        where = (f"`{p.get('command')}` at commit {p.get('commit')}, {p.get('date')}, on {m.get('cpu')} "
                 f"({', '.join(m.get('isa') or [])}; torch {m.get('torch')}"
                 + (f"; forced {m['forced']}" if m.get("forced") else "") + f"); settings: {p.get('settings')}")
        groups.setdefault(where, []).append(key)
    lines = ["## Where each entry comes from", ""]
    for where, keys in groups.items():
        lines.append(f"- {', '.join(keys)}: {where}")
    if legacy:
        cmds = meta.get("commands") or [meta.get("command")]
        lines.append(f"- {', '.join(legacy)}: recorded before entries carried their own provenance; made by one of "
                     + "; ".join(f"`{c}`" for c in cmds if c) + " (settings per entry unknown beyond the entry's own fields)")
    return lines + [""]

"""MSP's search against an independent evolutionary search, EvoPress (IST-DASLab/EvoPress), run with its own
code, on the embedded model, SparseGPT, one unstructured target.

Steps, each kept in the work directory so that a rerun resumes where the last one stopped (listed in the
order of the table; run EvoPress's first):

1. ``msp``: ``mixsparse``'s search as ``configs/msp70.yaml`` runs it, with SparseGPT's own level database and
   ``search.time_budget = --msp-seconds`` (the Fisher seed and the level database are timed apart).
2. ``evopress-db``: EvoPress's ``prune.py`` (its SparseGPT level database: ``--num-levels`` levels each way of a
   fixed number of weights, its own default step).
3. ``evopress-search``: EvoPress's ``evo_prune_search.py`` ((1+lambda) search, full-vocabulary KL, its fresh
   minibatch per selection stage, elitist last stage) for ``--evo-seconds``.
4. ``score``: uniform, the MSP map and the EvoPress map, each pruned sequentially by mixsparse's SparseGPT on the
   same calibration windows and scored on the same wiki test tokens.

EvoPress's code is taken as it is at the commit named by ``--evopress`` (``git archive`` of a local clone: no
network is used). Only what cannot run on a CPU-only machine is changed, each edit checked to apply exactly once:
its hard-coded CUDA devices become the CPU, its NCCL process group (one process) becomes gloo. One line is added
to its generation loop: stop when the next generation would pass the time budget (the rule mixsparse's own
``search.time_budget`` uses; its in-search perplexity reports are not counted). Its data loader is replaced by mixsparse's windows (``load_corpus`` /
``calibration_ids``: the wiki calibration split the MSP search sees; its in-search evaluation gets validation
windows, never test). Both searches run in float32 with torch's AVX2 kernels with ``--avx2`` (a CPU without
native bf16).

    python benchmarks/peer_search.py --evopress /path/to/EvoPress --avx2                 # 70%, MSP 10 min, EvoPress 60 min
    python benchmarks/peer_search.py --evopress /path/to/EvoPress --avx2 --target 0.8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import AVX2_ENV, RESULTS, Results, command_line, fmt, load_setup, measure, produced_by, \
    provenance_lines, write_markdown

HERE = Path(__file__).resolve().parent
# (file, text in EvoPress's code, replacement): the only edits made to it
PATCHES = [
    ("prune.py", 'dist.init_process_group(backend="nccl", init_method="env://")',
     'dist.init_process_group(backend="gloo", init_method="env://")'),
    ("prune.py", 'device = f"cuda:{rank}"', 'device = "cpu"'),
    ("evo_prune_search.py", 'device = f"cuda"', 'device = "cpu"'),
    ("evo_prune_search.py", "    for generation in range(args.generations):\n",
     "    for generation in range(args.generations):\n        if _ms_stop(generation): break\n"),
]


def prepare_evopress(src: Path, rev: str, dest: Path) -> str:
    """A patched copy of EvoPress at ``rev`` in ``dest``; returns the full commit."""
    full = subprocess.run(["git", "--git-dir", str(src), "rev-parse", rev], capture_output=True, text=True,
                          check=True).stdout.strip()
    if (dest / ".commit").exists() and (dest / ".commit").read_text() == full:
        return full
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "--git-dir", str(src), "archive", full], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for name, old, new in PATCHES:
        path = dest / name
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"EvoPress {full[:10]}: {name} has {text.count(old)} copies of {old!r}, expected 1; "
                             "the patch list fits commit 50888a0")
        path.write_text(text.replace(old, new))
    (dest / ".commit").write_text(full)
    return full


# ---- inside EvoPress's process ------------------------------------------------------------------------------

def _mixsparse_get_data(name, num_tokens, sequence_length, tokenizer, train=True):
    """EvoPress's ``get_data`` with mixsparse's windows: calibration (train) or validation text, (1, L) rows."""
    from mixsparse.data import calibration_ids, eval_windows, load_corpus, window_prefix

    prefix = window_prefix(tokenizer)
    if train:
        ids = calibration_ids(tokenizer, load_corpus("wiki", "calibration"), num_tokens // sequence_length,
                              sequence_length, int(os.environ["MS_SEED"]), prefix=prefix)
    else:
        ids = eval_windows(tokenizer, load_corpus("wiki", "validation"), sequence_length, num_tokens, prefix=prefix)
    return [row[None] for row in ids]


def run_evopress(entry: str, argv: list[str]) -> None:
    sys.path.insert(0, os.getcwd())
    import src.data_utils as du  # EvoPress's package, from its patched copy (the working directory)

    du.get_data = _mixsparse_get_data
    t_entry = time.perf_counter()
    module = __import__(entry)
    budget = float(os.environ.get("MS_BUDGET", "inf"))
    t0 = []
    reported = [0.0]  # seconds in its in-search perplexity reports (at generation 0: ~40 s here): not search

    def stop(generation: int) -> bool:
        now = time.perf_counter()
        if not t0:
            t0.append(now)
            # model, data and the KL targets (the dense model's logits on every calibration window)
            print(f"[mixsparse] setup {now - t_entry:.1f} s", flush=True)
        spent = now - t0[0] - reported[0]
        per_gen = spent / generation if generation else 0.0  # the mean generation so far
        print(f"[mixsparse] generation {generation} at {spent:.1f} s", flush=True)
        if spent + per_gen > budget:
            print(f"[mixsparse] time budget: stopped after {generation} generations, {spent:.1f} s", flush=True)
            return True
        return False

    report = getattr(module, "compute_perplexity", None)  # the search's reports (its fitness here is KL: untouched)
    if report is not None:
        def timed_report(*a, **k):
            t = time.perf_counter()
            try:
                return report(*a, **k)
            finally:
                reported[0] += time.perf_counter() - t

        module.compute_perplexity = timed_report
    module._ms_stop = stop
    sys.argv = [entry + ".py", *argv]
    module.main()


# ---- the benchmark ------------------------------------------------------------------------------------------

def evopress_env(args, budget: float | None = None) -> dict:
    env = {**os.environ, "MS_SEED": str(args.seed), "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    if budget is not None:
        env["MS_BUDGET"] = str(budget)
    return env


def call_evopress(args, code: Path, entry: str, argv: list[str], log: Path, budget: float | None = None) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--evopress-entry", entry, "--", *argv],
                            cwd=code, env=evopress_env(args, budget), stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"EvoPress {entry} failed (exit {rc}); see {log}")
    return time.perf_counter() - t0


def evopress_map(db: Path, config_file: Path, counts: dict[str, int]) -> tuple[dict[str, float], int]:
    """EvoPress's final levels as sparsities (level l: the target plus l times its step in weights)."""
    import torch

    meta = torch.load(db / "metadata.pth")
    levels = {}
    for line in config_file.read_text().splitlines():
        name, level = line.rsplit(":", 1)
        levels[name.strip()] = int(level)
    if set(levels) != set(counts):
        raise SystemExit(f"EvoPress's configuration names {len(levels)} layers, the model {len(counts)}")
    return ({n: meta["sparsity"] + lv * meta["weights_diff"] / counts[n] for n, lv in levels.items()},
            sum(lv != 0 for lv in levels.values()))


def cached(path: Path, settings: dict, compute) -> dict:
    """A step's result, kept in ``path`` with the settings that made it (other settings compute it again)."""
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("settings") == settings:
            return old
    out = {**compute(), "settings": settings}
    path.write_text(json.dumps(out))
    return out


def history_of(log: str) -> list[dict]:
    """EvoPress's log text: the fitness after each generation and when it started."""
    starts = [float(m.group(1)) for m in re.finditer(r"\[mixsparse\] generation \d+ at ([0-9.]+) s", log)]
    fits = [float(m.group(1)) for m in re.finditer(r"Train fitnesses: ([0-9.e+-]+)", log)]
    return [{"generation": i + 1, "fitness": f, "ended_at_s": starts[i + 1] if i + 1 < len(starts) else None}
            for i, f in enumerate(fits)]


def main() -> None:
    if "--evopress-entry" in sys.argv:  # the child process: EvoPress's own main() with mixsparse's data
        i = sys.argv.index("--evopress-entry")
        return run_evopress(sys.argv[i + 1], sys.argv[sys.argv.index("--") + 1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evopress", required=True, help="a local git clone (or bare repository) of IST-DASLab/EvoPress")
    ap.add_argument("--evopress-rev", default="50888a0")
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--msp-seconds", type=float, default=540,
                    help="MSP's search.time_budget (its Fisher seed, ~1 min, comes on top: ~10 min in all)")
    ap.add_argument("--evo-seconds", type=float, default=3600)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=20480)
    ap.add_argument("--num-levels", type=int, default=8, help="EvoPress's levels each way")
    ap.add_argument("--offspring", type=int, default=16)
    ap.add_argument("--survivors", default="4,1")
    ap.add_argument("--tokens", default="512,2048", help="EvoPress's tokens per selection stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(RESULTS / "peer_search_work"))
    ap.add_argument("--out", default=str(RESULTS / "peer_search"))
    ap.add_argument("--avx2", action="store_true", help="force torch's AVX2 kernels (both searches and scoring)")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--note", action="append", default=[], metavar="KEY=TEXT",
                    help="with --render-only: attach a note to a measured entry (shown under the table)")
    args = ap.parse_args()
    if args.render_only:
        res = Results(Path(args.out + ".json"), None)
        for item in args.note:
            key, _, text = item.partition("=")
            res.annotate(key, text)
        return render(res, Path(args.out + ".md"))
    if args.avx2 and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})

    import torch

    from mixsparse.assets import embedded_model_dir
    from mixsparse.config import load_config
    from mixsparse.engine import prune_layerwise
    from mixsparse.evaluation import perplexity
    from mixsparse.modeling import param_counts
    from mixsparse.pipeline import allocate
    from mixsparse.sparsity import SparsityMap

    t = args.target
    work = Path(args.work) / f"{t}"
    work.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("work", "out", "render_only", "evopress")}
    res = Results(Path(args.out + ".json"), {"command": command_line(), **settings})
    model, tok, pristine, calib, test = load_setup("embedded", args.calib_samples, args.seqlen, args.eval_tokens,
                                                   seed=args.seed)
    counts = param_counts(model)
    maps: dict[str, dict] = {}

    # 1-2. EvoPress (first: its database is the step most likely to fail)
    code = work / "evopress"
    evo_commit = prepare_evopress(Path(args.evopress) / ".git" if (Path(args.evopress) / ".git").exists()
                                  else Path(args.evopress), args.evopress_rev, code)
    db = work / "evopress_db"
    model_dir = str(embedded_model_dir())
    common = ["--model_name_or_path", model_dir, "--calibration_data", "wiki", "--dtype", "float32",
              "--attn_implementation", "sdpa", "--calibration_tokens", str(args.calib_samples * args.seqlen),
              "--calibration_sequence_length", str(args.seqlen), "--seed", str(args.seed)]
    base = {"target": t, "calib_samples": args.calib_samples, "seqlen": args.seqlen, "seed": args.seed}
    db_settings = {**base, "num_levels": args.num_levels, "evopress_commit": evo_commit}

    def build_db() -> dict:
        shutil.rmtree(db, ignore_errors=True)
        secs = call_evopress(args, code, "prune", common + [
            "--prunable_modules", r".*layers.*((q|k|v|o|gate|up|down)_proj)$",
            "--pre_block_modules", "model.embed_tokens", "model.rotary_emb", "--block_modules", "model.layers",
            "--sparsity", str(t), "--num_levels", str(args.num_levels), "--save_dir", str(db)], work / "evopress_db.log")
        return {"seconds": round(secs, 1)}  # the process: its model load (~2 s) and the database

    db_seconds = cached(work / "evopress_db.json", db_settings, build_db)["seconds"]

    def evopress_search() -> dict:
        log_file = work / "evopress_search.log"
        secs = call_evopress(args, code, "evo_prune_search", common + [
            "--sparse_weights_path", str(db), "--generations", "100000", "--offspring", str(args.offspring),
            "--survivors_per_selection", *args.survivors.split(","), "--tokens_per_selection", *args.tokens.split(","),
            "--fitness_fn", "kl", "--eval_datasets", "wiki", "--eval_every", "100000", "--eval_tokens",
            str(2 * args.seqlen), "--eval_sequence_length", str(args.seqlen), "--memory_efficient",
            "--use_fast_tokenizer"], log_file, budget=args.evo_seconds)
        log = log_file.read_text()
        stopped = re.search(r"stopped after (\d+) generations, ([0-9.]+) s", log)
        setup = re.search(r"\[mixsparse\] setup ([0-9.]+) s", log)
        per_layer, moved = evopress_map(db, db / "final_configuration.txt", counts)
        return {"per_layer": per_layer, "layers_moved": moved, "wall_seconds": round(secs, 1),
                "setup_seconds": float(setup.group(1)) if setup else None,
                "search_seconds": float(stopped.group(2)) if stopped else None,
                "generations": int(stopped.group(1)) if stopped else len(history_of(log)),
                "history": history_of(log), "db_seconds": db_seconds, "evopress_commit": evo_commit}

    maps["evopress"] = cached(work / "evopress.json", {**db_settings, "evo_seconds": args.evo_seconds,
                                                        "offspring": args.offspring, "survivors": args.survivors,
                                                        "tokens": args.tokens}, evopress_search)

    # 3. MSP
    def msp_search() -> dict:
        cfg = load_config(HERE.parent / "configs" / "msp70.yaml", {
            "prune.sparsity": t, "prune.pruner": "sparsegpt", "model.device": "cpu", "data.seed": args.seed,
            "data.calibration_samples": args.calib_samples, "data.seqlen": args.seqlen,
            "search.time_budget": args.msp_seconds, "search.generations": 100000})
        with measure() as m:
            alloc = allocate(model, tok, cfg, device=torch.device("cpu"), run_dir=work / "msp",
                             cache_dir=work / "msp" / "cache", progress=False)
        model.load_state_dict(pristine)
        s = alloc.search
        loop = round(s["seconds"] - s["cache_seconds"], 1)  # the evolution, from scoring its first population
        return {"per_layer": alloc.sparsity_map.sparsities(), "wall_seconds": m["seconds"],
                # the Fisher seed, the KL targets and the level cache's loading: all but the database and the loop
                "setup_seconds": round(m["seconds"] - s["cache_seconds"] - loop, 1), "search_seconds": loop,
                "db_seconds": s["cache_seconds"], "generations": s["generations"], "stopped_by": s.get("stopped_by"),
                "evaluations": s["evaluations"], "fitness_dtype": s.get("fitness_dtype"),
                "peak_rss_mb": m["peak_rss_mb"]}

    maps["msp"] = cached(work / "msp.json", {**base, "msp_seconds": args.msp_seconds}, msp_search)

    # 4. score every map the same way
    tag = f"@{t}"
    rows = {"uniform" + tag: (SparsityMap.uniform(t, counts), {}),
            f"evopress-{args.evo_seconds:.0f}s" + tag: (SparsityMap(maps["evopress"]["per_layer"], counts),
                                                         {k: v for k, v in maps["evopress"].items() if k != "per_layer"}),
            f"msp-{args.msp_seconds:.0f}s" + tag: (SparsityMap(maps["msp"]["per_layer"], counts),
                                                    {k: v for k, v in maps["msp"].items() if k != "per_layer"})}
    for key, (smap, extra) in rows.items():
        old = res.get(key)
        if old and old.get("provenance", {}).get("settings") == settings:
            continue  # scored by an earlier invocation with these settings
        model.load_state_dict(pristine)
        with measure() as m:
            prune_layerwise(model, calib, smap, "sparsegpt", device=torch.device("cpu"), sequential=True,
                            progress=False)
        ppl = perplexity(model, test, progress=False)
        res.add(key, {"test_ppl": round(ppl, 3), "prune_seconds": m["seconds"],
                      "mean_sparsity": round(smap.average(counts), 6),
                      "per_layer": {n: round(v, 5) for n, v in smap.sparsities().items()}, **extra})
        print(key, round(ppl, 2), flush=True)
    render(res, Path(args.out + ".md"))


def moved(entry: dict, target: float) -> int:
    """Layers whose sparsity differs from the target."""
    return sum(abs(v - target) > 1e-6 for v in entry.get("per_layer", {}).values())


def render(res: Results, path: Path) -> None:
    entries, meta = res.data["entries"], res.data["meta"] or {}
    lines = ["# MSP against EvoPress's own search (embedded model, SparseGPT)", "",
             produced_by(meta) if meta.get("command") else "", "",
             "Each map pruned sequentially by mixsparse's SparseGPT on the same calibration windows, test perplexity on "
             "the same wiki test tokens. Setup: model, data and the KL targets (MSP: also its Fisher seed); search "
             "loop: the budgeted evolution (EvoPress's in-search perplexity reports left out); level database: "
             "EvoPress's whole `prune.py` process, MSP's database build.", "",
             "| map | test ppl | vs uniform | setup s | search loop s | generations | level database s | layers moved |",
             "|---|---|---|---|---|---|---|---|"]
    for key, e in entries.items():
        uni = (entries.get("uniform@" + key.split("@")[1]) or {}).get("test_ppl")
        lines.append(f"| {key} | {fmt(e['test_ppl'])} | {fmt(e['test_ppl'] / uni) + 'x' if uni else '—'} | "
                     f"{fmt(e.get('setup_seconds'), 0)} | {fmt(e.get('search_seconds'), 0)} | {fmt(e.get('generations'))} | "
                     f"{fmt(e.get('db_seconds'), 0)} | {moved(e, float(key.split('@')[1]))} |")
    notes = [f"- {key}: {e['note']}" for key, e in entries.items() if e.get("note")]
    lines += ([""] + notes if notes else []) + [""] + provenance_lines(entries, meta)
    write_markdown(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

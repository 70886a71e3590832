"""Peak RSS of whole MSP runs (``mixsparse prune``, 70% Wanda), each in its own process:

* ``main_job``: the README's main job (``configs/msp70.yaml``) on the embedded 135M model (0.54 GB in fp32);
* ``vocab256k``: a tiny LLaMA with a 262,144-token vocabulary (Gemma-sized; tied embeddings), where the
  dense reference of the KL fitness (tokens x vocabulary) used to dominate memory.

"before" runs with an older mixsparse on PYTHONPATH (a git worktree of the commit before the change),
"after" with the current one; peak RSS is the run's own ``run.json`` record (``ru_maxrss``):

    PYTHONPATH=/tmp/ms_before/src python benchmarks/memory.py --label before --cases vocab256k
    python benchmarks/memory.py --label after
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, command_line, write_markdown

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--set", "data.calibration_samples=8", "--set", "allocation.msp.samples=4",
         "--set", "search.generations=3", "--set", "search.offspring=4", "--set", "data.eval_tokens=4096",
         "--set", "eval.zeroshot=[]"]


def make_vocab_model(path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mixsparse.loading import load_model

    _, tok = load_model("embedded")  # its ids (< 49,152) are valid ids of the larger vocabulary
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=262144, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def run_case(case: str, work: Path, keep: Path | None = None) -> dict:
    out = work / case
    cmd = [sys.executable, "-m", "mixsparse", "prune", "--out", str(out), "--quiet"]
    if case == "main_job":
        cmd += ["--config", str(ROOT / "configs" / "msp70.yaml")]
    else:
        model_dir = work / "vocab256k-model"
        if not model_dir.exists():
            make_vocab_model(model_dir)
        cmd += ["--model", str(model_dir), "--sparsity", "0.7", "--pruner", "wanda", "--allocation", "msp"] + QUICK
    subprocess.run(cmd, check=True, env=os.environ.copy())
    # plain JSON, not mixsparse.record: the "before" side of a comparison may be an older checkout
    rec = json.loads((out / "run.json").read_text())
    if case == "main_job" and keep is not None:  # the main job's evidence: record, report, plots, map
        import shutil

        shutil.rmtree(keep, ignore_errors=True)
        keep.mkdir(parents=True)
        for name in ("run.json", "report.md", "allocation.yaml", "config.yaml"):
            shutil.copy(out / name, keep / name)
        shutil.copytree(out / "plots", keep / "plots")
    return {"peak_rss_mb": rec["peak_memory"]["cpu_rss_mb"], "params": rec["model"]["num_params"],
            "peak_rss_after_stage_mb": rec["peak_memory"].get("after_stage_mb"),
            "fp32_model_mb": round(rec["model"]["num_params"] * 4 / 2**20, 1),
            "ppl": rec.get("perplexity", {}).get("pruned"), "timings": rec.get("timings"),
            "search": {k: (rec.get("search") or {}).get(k) for k in ("fitness_dtype", "kl_topk",
                                                                      "reference_bytes_per_token", "level_db")},
            "run_command": " ".join(cmd[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True)
    ap.add_argument("--cases", default="main_job,vocab256k")
    ap.add_argument("--out", default=str(RESULTS / "memory"))
    ap.add_argument("--keep-main-job", action="store_true", help="copy the main job's run.json, report and plots to "
                                                                   "benchmarks/results/main_job/")
    ap.add_argument("--render-only", action="store_true", help="only rewrite the Markdown from the JSON")
    args = ap.parse_args()
    path = Path(args.out + ".json")
    data = json.loads(path.read_text()) if path.exists() else {}
    if args.render_only:
        render(data, args.out)
        return
    with tempfile.TemporaryDirectory() as work:
        for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
            entry = run_case(case, Path(work), RESULTS / "main_job" if args.keep_main_job else None)
            entry["command"] = command_line()
            data.setdefault(case, {})[args.label] = entry
            from mixsparse.io import atomic_write_json

            atomic_write_json(path, data)
            print(case, args.label, entry["peak_rss_mb"], flush=True)
    render(data, args.out)


def render(data: dict, out: str) -> None:
    lines = ["# Peak RSS of whole MSP runs (70% Wanda, `mixsparse prune`)", "",
             "| case | path | params | fp32 model (MB) | peak RSS (MB) | peak / fp32 model | dense reference (B/token) |",
             "|---|---|---|---|---|---|---|"]
    for case, rows in data.items():
        for label, e in rows.items():
            ref = (e.get("search") or {}).get("reference_bytes_per_token")
            lines.append(f"| {case} | {label} | {e['params'] / 1e6:.1f}M | {e['fp32_model_mb']:,.0f} | {e['peak_rss_mb']:,.0f} | "
                         f"{e['peak_rss_mb'] / e['fp32_model_mb']:.2f}x | {ref if ref is not None else 'full vocab, fp16'} |")
    lines += ["", "Peak RSS (MB) of the process when each stage ended (the stage whose value jumps set the peak):", ""]
    for case, rows in data.items():
        for label, e in rows.items():
            if e.get("peak_rss_after_stage_mb"):
                lines.append(f"- {case} {label}: " + ", ".join(f"{k} {v:,.0f}" for k, v in e["peak_rss_after_stage_mb"].items()))
    lines += ["", "Commands:", ""] + [f"- {c} {l}: `{e['command']}` (runs `{e['run_command']}`)"
                                      for c, rows in data.items() for l, e in rows.items()]
    if any("allocation.sensitivity_samples" in e["run_command"] for rows in data.values() for e in rows.values()):
        lines += ["", "The recorded commands are as they ran: `allocation.sensitivity_samples` was renamed "
                  "`allocation.msp.samples` on 2026-11-24 (the old key is now refused with a message naming the new one)."]
    write_markdown(Path(out + ".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

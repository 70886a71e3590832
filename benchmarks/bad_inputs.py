"""Bad-input sweep: run the CLI as a new user would, with bad inputs and faults, and record for each the
exit code and the first line it printed. Expected: exit 2 and one line ``mixsparse: error: ...`` naming
the problem and the fix, before any expensive work (the ``seconds`` column).

Fixtures are made in a temporary directory: a tiny random LLaMA with the embedded model's tokenizer,
a finished run, a checkpoint with tensors removed, allocation files, a malformed run.json.

    python benchmarks/bad_inputs.py      # writes benchmarks/results/bad_inputs.{json,md} (~3 min on 2 cores)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import RESULTS, command_line, write_markdown
from mixsparse.io import atomic_write_json


def fixtures(d: Path) -> dict:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mixsparse.assets import embedded_model_dir

    emb = embedded_model_dir()
    model_dir = d / "tiny"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2)).save_pretrained(model_dir)
    for f in emb.iterdir():
        if "token" in f.name or f.name.endswith(".txt") or f.name == "vocab.json":
            shutil.copy(f, model_dir / f.name)
    broken = d / "missing-tensors"
    shutil.copytree(model_dir, broken)
    t = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in t.items() if "layers.1.mlp" not in k}, broken / "model.safetensors", metadata={"format": "pt"})
    no_config = d / "no-config"
    shutil.copytree(model_dir, no_config)
    (no_config / "config.json").unlink()
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    (d / "partial.yaml").write_text(yaml.safe_dump({"per_layer": {n: 0.7 for n in names[:-3]}}))
    (d / "avg03.yaml").write_text(yaml.safe_dump({"per_layer": {n: 0.3 for n in names}}))
    (d / "bad.yaml").write_text("prune: [unclosed\n")
    (d / "afile").write_text("x")
    rd = d / "badrecord"
    rd.mkdir()
    (rd / "run.json").write_text(json.dumps({"config": {}, "perplexity": {"dense": "abc"}}))
    return {"model": str(model_dir), "broken": str(broken), "noconfig": str(no_config)}


def main() -> None:
    d = Path(tempfile.mkdtemp(prefix="mixsparse-bad-"))
    fx = fixtures(d)
    quick = ["--model", fx["model"], "--calib-samples", "2", "--seqlen", "64", "--eval-tokens", "256",
             "--set", "eval.zeroshot=[]", "--set", "export.report=false", "--device", "cpu", "--quiet"]
    finished = d / "finished"
    subprocess.run([sys.executable, "-m", "mixsparse", "prune", *quick, "--out", str(finished)], check=True,
                   capture_output=True)
    P = ["prune", *quick]
    out = ["--out", str(d / "new")]
    cases = [
        # the cases
        ("1 failed re-run into a finished run", P + ["--pruner", "wandaa", "--out", str(finished)]),
        ("1 re-run into a finished run", P + ["--out", str(finished)]),
        ("2 checkpoint with missing tensors", ["prune", *quick, "--model", fx["broken"]] + out),
        ("3 allocation file omits layers", P + ["--allocation-file", str(d / "partial.yaml")] + out),
        ("3 allocation file average != --sparsity", P + ["--allocation-file", str(d / "avg03.yaml"), "--sparsity", "0.7"] + out),
        ("5 device cuda on a CPU torch", P + ["--set", "model.device=cuda"] + out),
        ("5 device cuda:1", P + ["--device", "cuda:1"] + out),
        ("5 device mps", P + ["--device", "mps"] + out),
        ("6 --out is a file", P + ["--out", str(d / "afile")]),
        ("6 --out under a file", P + ["--out", str(d / "afile" / "sub")]),
        ("6 eval --json is a directory", ["eval", *quick, "--json", str(d)]),
        ("7 report on a malformed run.json", ["report", str(d / "badrecord")]),
        ("8 pruner typo", P + ["--pruner", "wandaa"] + out),
        ("8 calibration corpus typo", P + ["--calibration", "wikki"] + out),
        ("8 validation corpus without that split", P + ["--allocation", "msp", "--set", "data.validation=lee"] + out),
        ("8 missing corpus file", P + ["--calibration", str(d / "nope.txt")] + out),
        ("8 missing allocation file", P + ["--allocation-file", str(d / "nope.yaml")] + out),
        ("8 N:M target with OWL", [a for a in P] + ["--sparsity", "2:4", "--allocation", "owl"] + out),
        ("8 zero-shot task typo", P + ["--set", "eval.zeroshot=[sentimnt]"] + out),
        ("8 search step out of range", P + ["--allocation", "msp", "--set", "search.step=1.5"] + out),
        ("8 mixed N:M patterns not consecutive", P + ["--sparsity", "2:4", "--allocation", "msp", "--set",
                                                      "search.patterns=[1:4,3:4]"] + out),
        ("9 --sparsity with --pattern", P + ["--sparsity", "0.5", "--pattern", "2:4"] + out),
        ("11 eval on a compressed dir without --compressed", ["eval", "--model", str(finished / "compressed"), "--device", "cpu"]),
        ("11 --eval-tokens below --seqlen", P + ["--eval-tokens", "16"] + out),
        ("15 allocation file with --allocation owl", P + ["--allocation", "owl", "--allocation-file", str(d / "avg03.yaml")] + out),
        # our own
        ("sparsity above 1", P + ["--sparsity", "1.5"] + out),
        ("negative sparsity", P + ["--sparsity", "-0.1"] + out),
        ("N > M pattern", P + ["--sparsity", "3:2"] + out),
        ("zero calibration samples", P + ["--calib-samples", "0"] + out),
        ("seqlen 1", P + ["--seqlen", "1"] + out),
        ("config key typo", P + ["--set", "search.generatons=2"] + out),
        ("missing config file", P + ["--config", str(d / "nope.yaml")] + out),
        ("config that is not YAML", P + ["--config", str(d / "bad.yaml")] + out),
        ("model path that does not exist", ["prune", *quick, "--model", str(d / "nope")] + out),
        ("model dir without config.json", ["prune", *quick, "--model", fx["noconfig"]] + out),
        ("unknown dtype", P + ["--dtype", "float8"] + out),
        ("data.bos unknown mode", P + ["--set", "data.bos=sometimes"] + out),
        ("model.placement unknown", P + ["--set", "model.placement=half"] + out),
        ("negative kl_topk", P + ["--allocation", "msp", "--set", "search.kl_topk=-1"] + out),
        ("fitness dtype int8", P + ["--allocation", "msp", "--set", "search.fitness_dtype=int8"] + out),
        ("stages with decreasing windows", P + ["--allocation", "msp", "--set", "search.stages=[[4,1],[2,1]]"] + out),
        ("eval of a missing model", ["eval", "--model", str(d / "nope"), "--device", "cpu"]),
    ]
    rows = []
    for name, args in cases:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "mixsparse", *args], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
        text = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
        first = next((ln for ln in text if ln.startswith("mixsparse:")), text[0] if text else "")
        rows.append({"case": name, "command": "mixsparse " + " ".join(a.replace(str(d), "$TMP") for a in args),
                     "exit_code": p.returncode, "first_line": first.replace(str(d), "$TMP"),
                     "traceback": "Traceback" in p.stderr, "seconds": round(time.perf_counter() - t0, 1)})
        print(p.returncode, name, "|", rows[-1]["first_line"][:120], flush=True)
    shutil.rmtree(d, ignore_errors=True)
    atomic_write_json(RESULTS / "bad_inputs.json", {"command": command_line(), "cases": rows})
    ok = sum(r["exit_code"] == 2 and r["first_line"].startswith("mixsparse: error:") and not r["traceback"] for r in rows)
    lines = ["# Bad-input sweep", "", f"`{command_line()}`: {ok} of {len(rows)} cases exit 2 with a one-line error "
             "and no traceback. `seconds` includes Python start-up and imports (~3-5 s); `$TMP` is the fixture directory.",
             "", "| case | command | exit | first line | s |", "|---|---|---|---|---|"]
    for r in rows:
        cmd = r["command"].replace("|", "\\|")
        lines.append(f"| {r['case']} | `{cmd}` | {r['exit_code']} | {r['first_line'].replace('|', '/')} | {r['seconds']} |")
    write_markdown(RESULTS / "bad_inputs.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

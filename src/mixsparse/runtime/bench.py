"""Decode speed and memory of one model variant, measured in a fresh process (``python -m
mixsparse.runtime.bench VARIANT PATH``) so that its peak RSS is its own.

Variants: ``sparse`` (the compressed checkpoint through :func:`load_sparse`), ``dense-fp32`` / ``dense-bf16``
(the same checkpoint densified, in the same decode loop), ``hf-dense-fp32`` (the densified model through
``model.generate()``, what users run today). Prints one JSON line: tokens/s (median over repeats, batch 1,
``new`` tokens after a ``prompt``-token prompt), peak RSS, weight bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

VARIANTS = ("sparse", "dense-fp32", "dense-bf16", "hf-dense-fp32")


def prompt_ids(path, tokens: int, seed: int = 0) -> torch.Tensor:
    """``tokens`` ids of real text (the test split's start), the same for every variant."""
    from transformers import AutoTokenizer

    from ..data import load_corpus
    from .load import compressed_dir

    tok = AutoTokenizer.from_pretrained(compressed_dir(path))
    ids = tok(load_corpus("wiki", "test")[:20000], return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise ValueError(f"the test text gives only {ids.shape[1]} tokens")
    return ids


def load(variant: str, path, *, head_dtype: str = "float32", isa: int = -1, device: str | torch.device = "cpu"):
    from ..export import load_compressed
    from .load import _weight_bytes, compressed_dir, load_sparse

    if variant == "sparse":
        model, info = load_sparse(path, head_dtype=head_dtype, isa=isa, device=device)
        return model, {"kernels": info.kernels, "sparse_layers": len(info.sparse), "dense_layers": len(info.dense),
                       "weight_bytes": info.weight_bytes}
    dtype = torch.bfloat16 if variant == "dense-bf16" else torch.float32
    model = load_compressed(compressed_dir(path), dtype=dtype).to(device).eval()
    model.config.use_cache = True
    model.generation_config.use_cache = True  # pruning saved the config with the cache off
    return model, {"weight_bytes": _weight_bytes(model)}  # counted as the sparse variant's are


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(key + ":"))
    return round(int(line.split()[1]) / 1024, 1)


def peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM: ru_maxrss would report the parent's peak at fork)."""
    return _status_mb("VmHWM")


def measure(variant: str, path, prompt: int = 128, new: int = 128, repeats: int = 5, head_dtype: str = "float32",
            isa: int = -1, device: str = "cpu") -> dict:
    from .decode import greedy

    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import kernels
    from .load import compressed_dir

    # the code both variants import (transformers' model classes, the kernels) before the baseline: what loading
    # adds after it is the model's own memory
    kernels.get()
    with init_empty_weights():
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(compressed_dir(path)))
    before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    model, out = load(variant, path, head_dtype=head_dtype, isa=isa, device=device)
    out["load_seconds"] = round(time.perf_counter() - t0, 2)
    out["model_rss_mb"] = round(_status_mb("VmRSS") - before, 1)  # resident memory the loaded model added
    ids = prompt_ids(path, prompt).to(device)
    speeds, tokens = [], None
    for _ in range(repeats):
        if variant == "hf-dense-fp32":
            with torch.inference_mode():
                t = time.perf_counter()
                model.generate(ids, max_new_tokens=1, do_sample=False)  # the prompt forward, as greedy times it
                t1 = time.perf_counter()
                gen = model.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new, use_cache=True)
                t2 = time.perf_counter()
            toks = gen[0, ids.shape[1]:].tolist()
            speeds.append((new - 1) / max(1e-9, (t2 - t1) - (t1 - t)))
        else:
            d = greedy(model, ids, new)
            toks = d.tokens
            speeds.append(d.tokens_per_s)
        tokens = tokens or toks
    out.update({"tokens_per_s": round(statistics.median(speeds), 3), "tokens_per_s_all": [round(s, 3) for s in speeds],
                "peak_rss_mb": peak_rss_mb(), "device": str(device),
                "threads": torch.get_num_threads(), "first_tokens": tokens[:32]})
    if torch.device(device).type == "cuda":  # the loaded model and its decoding's peak, on the GPU
        out["peak_device_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("variant", choices=VARIANTS)
    ap.add_argument("path")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--head-dtype", default="float32")
    ap.add_argument("--isa", type=int, default=-1)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    print(json.dumps(measure(a.variant, a.path, a.prompt, a.new, a.repeats, a.head_dtype, a.isa, a.device)))


if __name__ == "__main__":
    main()

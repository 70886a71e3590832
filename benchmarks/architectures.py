"""The architecture matrix as measured numbers: per family of tiny random models (tests/tiny.py FAMILIES, built
from transformers' own config classes), the share of parameters in prunable layers, the measured sparsity of
the whole model after Wanda at 50%, the block runner's largest |layer-wise - whole-model| logit difference,
and the seconds the family took (build, forward both ways, prune).

    python benchmarks/architectures.py        # writes results/architectures.{json,md}
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from common import RESULTS, Results, produced_by, provenance, write_markdown

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/tiny.py builds the families


def measure(family: str) -> dict:
    from mixsparse.engine import prune_layerwise
    from mixsparse.modeling import coverage, coverage_warning, measured_sparsity, param_counts
    from mixsparse.runner import LayerwiseRunner
    from mixsparse.sparsity import SparsityMap
    from tests.tiny import family_model, tiny_ids

    t0 = time.perf_counter()
    model = family_model(family)
    ids = tiny_ids(2, 16)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    ((_, lw),) = list(LayerwiseRunner(model, device="cpu").forward_all([ids]))
    prune_layerwise(model, tiny_ids(4, 16, seed=1), SparsityMap.uniform(0.5, param_counts(model)), "wanda",
                    progress=False)
    cov = coverage(model)
    zeros = sum(k["zeros"] for k in cov["by_kind"].values())
    return {"model_class": type(model).__name__, "prunable_fraction": round(cov["prunable_fraction"], 4),
            "measured_sparsity": round(zeros / cov["total_params"], 4),
            "prunable_sparsity": round(measured_sparsity(model)[1], 4),
            "layerwise_max_abs_diff": float((lw - ref).abs().max()), "seconds": round(time.perf_counter() - t0, 2),
            "unprunable": coverage_warning(cov), **provenance()}


def main() -> None:
    from tests.tiny import FAMILIES

    meta = provenance()
    res = Results(RESULTS / "architectures.json", meta, fresh=True)
    for fam in FAMILIES:
        res.add(fam, measure(fam))
        print(fam, {k: res.get(fam)[k] for k in ("prunable_fraction", "measured_sparsity", "layerwise_max_abs_diff")})
    rows = ["| family | model class | prunable share of parameters | measured sparsity (whole model) | "
            "sparsity of prunable layers | max abs logit diff, layer-wise vs whole | seconds |",
            "|---|---|---|---|---|---|---|"]
    for fam, e in res.data["entries"].items():
        rows.append(f"| {fam} | {e['model_class']} | {e['prunable_fraction']:.4f} | {e['measured_sparsity']:.4f} | "
                    f"{e['prunable_sparsity']:.4f} | {e['layerwise_max_abs_diff']:.3g} | {e['seconds']} |")
    notes = [f"- **{fam}**: {e['unprunable']}" for fam, e in res.data["entries"].items() if e["unprunable"]]
    m = meta["machine"]
    text = ["# Architectures", "",
            "Tiny random models (hidden 32, 2-4 blocks, 16-token windows longer than the 4-token sliding windows) from "
            "transformers' own config classes; Wanda at 50% uniform over the prunable layers. The whole-model "
            "sparsity counts every parameter (embeddings, norms, MoE experts), so it shows what pruning reached.", "",
            produced_by(meta) + f" at commit {meta['commit']}, {meta['date']}, on {m['cpu']} "
            f"({', '.join(m['isa'])}), torch {m['torch']}.", "", *rows, ""]
    if notes:
        text += ["Not prunable yet (reported by every run's warning):", "", *notes, ""]
    write_markdown(RESULTS / "architectures.md", "\n".join(text))


if __name__ == "__main__":
    main()

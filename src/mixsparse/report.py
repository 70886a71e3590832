"""Turn a run directory's ``run.json`` into ``report.md`` plus PNG plots in ``plots/``.

The record's shape is :class:`mixsparse.record.RunRecord` (every section except ``config`` optional).

Layer names are qualified linear names (``model.layers.3.mlp.up_proj``), split by
:func:`mixsparse.names.split_layer` into block index and layer kind. Plots are drawn on matplotlib
``Figure`` objects with an explicit Agg canvas, so rendering touches no pyplot/global backend state and
needs no display.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, MixsparseError
from .io import atomic_write, atomic_write_text
from .names import kind_group, split_layer
from .record import AllocationInfo, ModelInfo, Perplexity, PruningInfo, RunRecord
from .recovery import stage_records
from .sparsity import parse_layer_sparsity, sparsity_of

PLOTS_DIR = "plots"
REPORT_FILE = "report.md"


def _layer_sparsity(value: Any, layer: str) -> float:
    try:
        return sparsity_of(parse_layer_sparsity(value, where=f"layer {layer!r}"))
    except MixsparseError as e:
        raise ConfigError(f"run.json: {e}") from None


def _layer_order(*maps: Mapping[str, Any] | None) -> list[str]:
    """Union of the layer names, first map's order first (run.json keeps forward order)."""
    order: dict[str, None] = {}
    for mp in maps:
        for k in mp or {}:
            order.setdefault(k, None)
    return list(order)


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100.0 * float(x):.2f}%"


def _num(x: Any, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{float(x):,.{digits}f}"


def _secs(x: Any) -> str:
    if x is None:
        return "n/a"
    x = float(x)
    return f"{x:.1f} s" if x < 120 else f"{x:.1f} s ({x / 60:.1f} min)"


def _bytes(n: Any) -> str:
    if n is None:
        return "n/a"
    return f"{int(n) / 2**20:,.2f} MiB ({int(n):,} B)"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _requested_str(value: Any, layer: str) -> str:
    s = _layer_sparsity(value, layer)
    return f"{value} ({_pct(s)})" if isinstance(value, str) and ":" in value else _pct(s)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _figure(nrows: int = 1, height: float = 3.6, width: float = 9.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, 1, i + 1) for i in range(nrows)]
    return fig, axes


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _save_png(fig: Any, path: Path) -> Path:
    # 0644: what a plain write would give under the usual umask (the temp file starts private)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), mode=0o644)


def _kinds(layers: Sequence[str]) -> dict[str, list[int]]:
    """Layer kind -> x positions (forward order)."""
    out: dict[str, list[int]] = {}
    for i, name in enumerate(layers):
        out.setdefault(kind_group(split_layer(name)[1]), []).append(i)
    return out


def _block_means(layers: Sequence[str], values: Mapping[str, float]) -> dict[int, float]:
    sums: dict[int, list[float]] = {}
    for name in layers:
        block = split_layer(name)[0]
        if block is not None and name in values:
            sums.setdefault(block, []).append(values[name])
    return {b: sum(v) / len(v) for b, v in sorted(sums.items())}


def _plot_sparsity(layers: list[str], requested: dict[str, float], achieved: dict[str, float], path: Path) -> Path:
    blocks_req, blocks_ach = _block_means(layers, requested), _block_means(layers, achieved)
    fig, axes = _figure(2 if blocks_req or blocks_ach else 1)
    ax = axes[0]
    xs = list(range(len(layers)))
    if requested:
        ax.plot([i for i in xs if layers[i] in requested], [requested[l] for l in layers if l in requested],
                color="0.55", lw=1.2, label="requested", zorder=1)
    for kind, pos in _kinds(layers).items():
        pts = [i for i in pos if layers[i] in achieved]
        if pts:
            ax.scatter(pts, [achieved[layers[i]] for i in pts], s=14, label=f"achieved: {kind}", zorder=2)
    ax.set_xlabel("layer index (forward order)")
    ax.set_ylabel("sparsity")
    ax.set_title("Per-layer sparsity: requested vs achieved")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=4, loc="best")
    if len(axes) > 1:
        ax = axes[1]
        if blocks_req:
            ax.plot(list(blocks_req), list(blocks_req.values()), "o-", ms=3, label="requested (block mean)")
        if blocks_ach:
            ax.plot(list(blocks_ach), list(blocks_ach.values()), "s--", ms=3, label="achieved (block mean)")
        ax.set_xlabel("block")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_ylabel("mean sparsity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save_png(fig, path)


def _plot_sensitivity(layers: list[str], sens: dict[str, float], kind: str | None, path: Path) -> Path:
    fig, (ax,) = _figure()
    dropped = 0
    for k, pos in _kinds(layers).items():
        pts = [i for i in pos if layers[i] in sens and sens[layers[i]] is not None and float(sens[layers[i]]) > 0]
        dropped += sum(1 for i in pos if layers[i] in sens and i not in pts)
        if pts:
            ax.plot(pts, [float(sens[layers[i]]) for i in pts], "o", ms=4, label=k)
    ax.set_yscale("log")
    ax.set_xlabel("layer index (forward order)")
    ax.set_ylabel(f"{kind or 'sensitivity'} (log scale)")
    title = f"Per-layer sensitivity ({kind})" if kind else "Per-layer sensitivity"
    if dropped:
        title += f" — {dropped} non-positive value(s) not shown"
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=4)
    return _save_png(fig, path)


def _plot_search(history: list[dict], fitness: str | None, path: Path) -> Path:
    fig, (ax,) = _figure()
    gens = [int(h.get("generation", i)) for i, h in enumerate(history)]
    best = [float(h["best_fitness"]) for h in history]
    ax.plot(gens, best, "o-", ms=3)
    ax.set_xlabel("generation")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_ylabel(f"best fitness ({fitness})" if fitness else "best fitness")
    ax.set_title("Evolutionary search: best fitness so far (lower is better)")
    ax.grid(alpha=0.3)
    evals = [h.get("evaluations") for h in history]
    if all(e is not None for e in evals) and len(gens) > 1 and all(b > a for a, b in zip(gens, gens[1:])):
        import numpy as np

        g, e = np.asarray(gens, float), np.asarray(evals, float)
        sec = ax.secondary_xaxis("top", functions=(lambda x: np.interp(x, g, e), lambda x: np.interp(x, e, g)))
        sec.set_xlabel("fitness evaluations")
    return _save_png(fig, path)


def _plot_sizes(sizes: dict, path: Path) -> Path:
    fig, (ax,) = _figure(width=7.0)
    groups = [("whole checkpoint", sizes.get("dense_bytes"), sizes.get("compressed_bytes"))]
    if sizes.get("prunable_dense_bytes") and sizes.get("prunable_compressed_bytes") is not None:
        groups.append(("prunable layers", sizes["prunable_dense_bytes"], sizes["prunable_compressed_bytes"]))
    width = 0.38
    for i, (label, dense, comp) in enumerate(groups):
        for j, (name, val, color) in enumerate((("dense", dense, "tab:gray"), ("compressed", comp, "tab:blue"))):
            if val is None:
                continue
            mb = int(val) / 2**20
            ax.bar(i + (j - 0.5) * width, mb, width, color=color, label=name if i == 0 else None)
            ax.annotate(f"{mb:,.2f}", (i + (j - 0.5) * width, mb), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)), [g[0] for g in groups])
    ax.set_ylabel("MiB")
    ratio, pratio = sizes.get("ratio"), sizes.get("prunable_ratio")
    bits = [f"whole {ratio:.3f}x" if ratio is not None else None, f"prunable {pratio:.3f}x" if pratio is not None else None]
    ax.set_title("Checkpoint size (compressed / dense: " + ", ".join(b for b in bits if b) + ")")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save_png(fig, path)


def plot_allocations(
    allocations: Mapping[str, Mapping[str, Any]],
    sensitivities: Mapping[str, Mapping[str, float]] | None,
    path: str | os.PathLike,
    title: str,
) -> Path:
    """One line per allocation method: sparsity per layer (x = forward order); sensitivity below (log).

    Values may be floats or 'N:M' strings. Layers missing from a method are left as gaps.
    """
    if not allocations:
        raise ConfigError("plot_allocations: no allocations given")
    layers = _layer_order(*allocations.values(), *(sensitivities or {}).values())
    sens = {k: v for k, v in (sensitivities or {}).items() if v}
    fig, axes = _figure(2 if sens else 1)
    xs = range(len(layers))
    for method, alloc in allocations.items():
        ys = [_layer_sparsity(alloc[l], l) if l in alloc else math.nan for l in layers]
        axes[0].plot(xs, ys, "-", marker="o", ms=2.5, lw=1.1, label=str(method))
    axes[0].set_ylabel("sparsity")
    axes[0].set_title(title)
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8, ncol=3)
    if sens:
        ax = axes[1]
        for method, s in sens.items():
            ys = [float(s[l]) if l in s and s[l] is not None and float(s[l]) > 0 else math.nan for l in layers]
            ax.plot(xs, ys, "-", marker="o", ms=2.5, lw=1.1, label=str(method))
        ax.set_yscale("log")
        ax.set_ylabel("sensitivity (log)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, ncol=3)
    axes[-1].set_xlabel("layer index (forward order)")
    return _save_png(fig, Path(path))


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _total_time(timings: dict | None) -> float | None:
    if not timings:
        return None
    if timings.get("total") is not None:
        return float(timings["total"])
    return sum(float(v) for v in timings.values() if v is not None)


def _ratio(value: float | None, dense: float | None) -> str:
    text = _num(value)
    if value is not None and dense:
        text += f" ({float(value) / float(dense):.2f}x dense)"
    return text


def _summary(run: RunRecord) -> list[str]:
    model = run.model or ModelInfo()
    alloc, prun = run.allocation or AllocationInfo(), run.pruning or PruningInfo()
    ppl, search, mem, sizes = run.perplexity, run.search or {}, run.peak_memory, run.sizes or {}
    rows: list[tuple[str, str]] = [("Model", model.name or "n/a")]
    if model.num_params is not None:
        extra = f" ({_num(model.prunable_params)} prunable)" if model.prunable_params is not None else ""
        rows.append(("Parameters", _num(int(model.num_params)) + extra))
    if model.blocks is not None:
        rows.append(("Decoder blocks", str(model.blocks)))
    rows += [
        ("Pruner", prun.pruner or "n/a"),
        ("Allocation", alloc.method or "n/a"),
        ("Budget", str(alloc.target)) if alloc.method == "joint" else  # allocation joint: bytes, not zeros
        ("Target sparsity", _requested_str(alloc.target, "target") if alloc.target is not None else "n/a"),
        ("Achieved overall sparsity", _pct(prun.overall_sparsity)),
    ]
    if ppl is not None:
        where = f" ({ppl.split or '?'} split, {_num(ppl.tokens)} tokens, seqlen {ppl.seqlen or '?'})"
        rows.append(("Perplexity, dense" + where, _num(ppl.dense)))
        rows.append(("Perplexity, pruned" + where, _ratio(ppl.pruned, ppl.dense)))
        # the later stages, in pipeline order, named with what produced them
        for label, value in ((f"after recovery ({(run.recovery or {}).get('mode', '?')})", ppl.recovered),
                             (f"quantized ({(run.quantization or {}).get('scheme', '?')})", ppl.quantized)):
            if value is not None:
                rows.append((f"Perplexity, {label}" + where, _ratio(value, ppl.dense)))
    pl = run.placement
    if pl is not None and pl.device:
        compute = pl.compute_dtype or "?"
        if pl.dtype and pl.compute_dtype and pl.compute_dtype != pl.dtype:
            compute += f" (upcast from {pl.dtype} while placed; stored in {pl.dtype}" + (
                "; whole-model stages in the model's own dtype: the float32 copy did not fit)" if pl.whole_upcast is False
                else ")")
        rows.append(("Placement (device, mode, compute dtype)", f"{pl.device}, {pl.mode}, {compute}"))
    if run.windows is not None:
        prefix = run.windows.prefix_ids
        rows.append(("Window start (data.bos)", f"{run.windows.bos}: " + (f"token ids {prefix}" if prefix else "no BOS")))
    if search:
        rows.append(("Search time", _secs(search.get("seconds"))))
    if prun.seconds is not None:
        rows.append(("Pruning time", _secs(prun.seconds)))
    rows.append(("Total time", _secs(_total_time(run.timings))))
    if mem is not None:
        rows.append(("Peak CPU memory (RSS)", f"{_num(mem.cpu_rss_mb, 1)} MB"))
        rows.append(("Peak device memory", f"{_num(mem.device_mb, 1)} MB" if mem.device_mb is not None else "n/a"))
    if sizes:
        rows.append(("Dense checkpoint size", _bytes(sizes.get("dense_bytes"))))
        rows.append(("Compressed checkpoint size", _bytes(sizes.get("compressed_bytes"))))
        rows.append(("Compression ratio (whole / prunable layers)",
                     f"{_num(sizes.get('ratio'), 3)}x / {_num(sizes.get('prunable_ratio'), 3)}x"))
        if sizes.get("bits_per_weight") is not None:
            rows.append(("Stored bits per prunable weight (mask + values + scales)", _num(sizes["bits_per_weight"], 3)))
    md = ["## Summary", "", *_table(["", "value"], rows)]
    if run.coverage:
        md += _coverage(run.coverage)
    if run.pruning is not None and run.pruning.fallback_warning():
        md += [f"**Warning:** {run.pruning.fallback_warning()}.", ""]
    return md


def _coverage(cov: dict) -> list[str]:
    """Sparsity by module kind, and what pruning could not reach (named, never silent)."""
    from .modeling import coverage_warning

    rows = [[kind, _num(int(k["params"])), _pct(k["prunable_params"] / k["params"] if k["params"] else 0),
             _pct(k["sparsity"])] for kind, k in cov.get("by_kind", {}).items()]
    md = ["## Sparsity by module kind", "",
          f"Prunable layers hold {_pct(cov.get('prunable_fraction'))} of the model's parameters; the target applies "
          "to them.", "", *_table(["kind", "parameters", "prunable", "zeros (measured)"], rows)]
    warning = coverage_warning(cov)
    if warning:
        md += [f"**Warning:** {warning}.", ""]
    return md


def _recovery(rec: dict, ppl: Perplexity | None) -> list[str]:
    md = ["## Recovery", "", f"Mode **{rec.get('mode')}**, {_secs(rec.get('seconds'))}; the zeros of every pruned layer "
          f"are {'exactly the same' if rec.get('zeros_unchanged') else 'NOT checked'} after recovery.", ""]
    if ppl is not None and ppl.pruned is not None and ppl.recovered is not None:
        md += [f"Test perplexity {_num(ppl.pruned)} after pruning, {_num(ppl.recovered)} after recovery.", ""]
    stages = stage_records(rec)
    for stage in stages:
        if len(stages) > 1:
            md += [f"### {stage.get('mode')}, {_secs(stage.get('seconds'))}", ""]
        blocks = stage.get("blocks") or []
        if blocks:
            rows = [[b.get("block"), _num(b.get("mse_before"), 4), _num(b.get("mse_after"), 4),
                     _pct(1 - float(b["mse_after"]) / float(b["mse_before"])) if b.get("mse_before") else "n/a",
                     "yes" if b.get("kept") else "no (worse; restored)"] for b in blocks]
            md += _table(["block", "output MSE before", "after", "reduction", "kept"], rows)
        if stage.get("val_ppl"):
            md += ["Validation perplexity by step: " + ", ".join(f"{int(s)}: {_num(v)}" for s, v in stage["val_ppl"]), ""]
    return md


def _plot_recovery(rec: dict, path: Path) -> Path:
    blocks, loss = rec.get("blocks") or [], rec.get("loss") or []
    fig, (ax,) = _figure()
    if blocks:
        idx = [b["block"] for b in blocks]
        ax.semilogy(idx, [b["mse_before"] for b in blocks], "o-", ms=3, label="before")
        ax.semilogy(idx, [b["mse_after"] for b in blocks], "o-", ms=3, label="after")
        ax.set_xlabel("decoder block")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_ylabel("block output MSE vs dense")
        ax.set_title("Block-wise reconstruction: error of each block against the dense block")
    else:
        ax.plot([s for s, _ in loss], [v for _, v in loss], lw=1, label="training loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"Masked fine-tuning ({rec.get('mode')}): loss and validation perplexity")
        if rec.get("val_ppl"):
            ax2 = ax.twinx()
            ax2.plot([s for s, _ in rec["val_ppl"]], [v for _, v in rec["val_ppl"]], "o-", color="C1", ms=3,
                     label="validation ppl")
            ax2.set_ylabel("validation perplexity")
            ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    return _save_png(fig, path)


def _zeroshot(zs: dict) -> list[str]:
    rows, accs = [], []
    for task, r in zs.items():
        r = r or {}
        acc = r.get("accuracy")
        if acc is not None:
            accs.append(float(acc))
        rows.append([task, _pct(acc), _pct(r.get("stderr")), _num(r.get("n"))])
    if len(accs) > 1:
        rows.append(["**mean**", _pct(sum(accs) / len(accs)), "", ""])
    return ["## Zero-shot accuracy", "", *_table(["task", "accuracy", "± stderr", "n"], rows)]


def _lm_eval(results: dict) -> list[str]:
    rows = [[task, metric, _num(v, 4)] for task, metrics in results.items() for metric, v in (metrics or {}).items()]
    return ["## lm-evaluation-harness", "", *_table(["task", "metric", "value"], rows)]


def _per_block(layers: list[str], per_layer: dict, achieved: dict) -> list[str]:
    req = {l: _layer_sparsity(v, l) for l, v in per_layer.items()}
    blocks: dict[int | None, list[str]] = {}
    for l in layers:
        blocks.setdefault(split_layer(l)[0], []).append(l)
    rows = []
    for b, names in sorted(blocks.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        r = [req[l] for l in names if l in req]
        a = [float(achieved[l]) for l in names if l in achieved]
        patterns = sorted({str(per_layer[l]) for l in names if isinstance(per_layer.get(l), str) and ":" in str(per_layer[l])})
        requested = _pct(sum(r) / len(r)) if r else "n/a"
        if patterns:
            requested = f"{requested} (incl. {', '.join(patterns)})"
        rows.append([
            "other" if b is None else b,
            len(names),
            requested,
            _pct(min(a)) + " – " + _pct(max(a)) if a else "n/a",
            _pct(sum(a) / len(a)) if a else "n/a",
        ])
    return ["## Sparsity per block", "",
            "Means are plain (not parameter-weighted) over the block's linear layers.", "",
            *_table(["block", "layers", "requested (mean)", "achieved (min – max)", "achieved (mean)"], rows)]


def _joint(layers: list[str], joint: dict) -> list[str]:
    """Each block's layers as the joint search stored them: bit width, and sparsity where pruned."""
    per = joint.get("per_layer") or {}
    blocks: dict[int | None, list[str]] = {}
    for l in layers:
        if l in per:
            blocks.setdefault(split_layer(l)[0], []).append(l)
    rows = []
    for b, names in sorted(blocks.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        kinds = [f"{split_layer(l)[1]} int{per[l]['bits']}" + (f" at {_pct(per[l]['sparsity'])}" if per[l]["sparsity"] else "")
                 for l in names]
        budget = sum(per[l]["level_bits_per_weight"] for l in names) / len(names)
        rows.append(["other" if b is None else b, _num(budget), ", ".join(kinds)])
    return ["## Bits per layer (joint search)", "",
            f"Budget {_num(joint.get('bits_per_weight_budget'))} bits per prunable weight, stored "
            f"{_num(joint.get('bits_per_weight'), 4)} (codes, masks where pruned, scales).", "",
            *_table(["block", "level, bits/weight (mean)", "layers"], rows)]


def _timings(timings: dict) -> list[str]:
    rows = [[stage, _secs(s)] for stage, s in timings.items()]
    if "total" not in timings:
        rows.append(["**total**", _secs(_total_time(timings))])
    return ["## Timings", "", *_table(["stage", "time"], rows)]


def render_report(run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/report.md`` and ``run_dir/plots/*.png`` from ``run_dir/run.json``."""
    run_dir = Path(run_dir)
    run = RunRecord.load(run_dir)
    plots = run_dir / PLOTS_DIR
    alloc, prun, search = run.allocation or AllocationInfo(), run.pruning or PruningInfo(), run.search or {}
    per_layer, achieved, sens = alloc.per_layer or {}, prun.achieved or {}, alloc.sensitivity or {}
    layers = _layer_order(per_layer, achieved, sens)
    images: list[tuple[str, Path]] = []

    if per_layer or achieved:
        requested = {l: _layer_sparsity(v, l) for l, v in per_layer.items()}
        images.append(("Per-layer sparsity", _plot_sparsity(layers, requested, {k: float(v) for k, v in achieved.items()}, plots / "sparsity.png")))
    if sens:
        images.append(("Per-layer sensitivity", _plot_sensitivity(layers, sens, alloc.sensitivity_kind, plots / "sensitivity.png")))
    if search.get("history"):
        images.append(("Search curve", _plot_search(search["history"], search.get("fitness"), plots / "search.png")))
    rec = run.recovery or {}
    stages = stage_records(rec)  # a chained mode ("blockwise+lora") records each method
    for stage in stages:
        if stage.get("blocks") or stage.get("loss"):
            name = "recovery.png" if len(stages) == 1 else f"recovery-{stage.get('mode')}.png"
            images.append((f"Recovery ({stage.get('mode')})", _plot_recovery(stage, plots / name)))
    if run.sizes and run.sizes.get("dense_bytes") is not None:
        images.append(("Checkpoint sizes", _plot_sizes(run.sizes, plots / "sizes.png")))

    md = [f"# mixsparse report: {(run.model.name if run.model else None) or 'model'}", ""]
    meta = [f"mixsparse {run.version}" if run.version else None, f"created {run.created}" if run.created else None]
    if any(meta):
        md += [", ".join(m for m in meta if m), ""]
    if run.status not in (None, "finished"):
        md += [f"**This run did not finish: {run.status}.** {run.error or ''}".rstrip(), ""]
    md += _summary(run)
    if rec.get("mode") not in (None, "none"):
        md += _recovery(rec, run.perplexity)
    if run.zeroshot:
        md += _zeroshot(run.zeroshot)
    if run.lm_eval:
        md += _lm_eval(run.lm_eval)
    if layers:
        md += _per_block(layers, per_layer, achieved)
    if layers and search.get("joint"):
        md += _joint(layers, search["joint"])
    if run.timings:
        md += _timings(run.timings)
    if run.artifacts:
        md += ["## Artifacts", "", *[f"- {k}: `{v}`" for k, v in run.artifacts.items()], ""]
    if run.command:
        md += ["## Command", "", "```", run.command, "```", ""]
    if images:
        md += ["## Plots", ""]
        md += [f"![{title}]({p.relative_to(run_dir).as_posix()})" + "\n" for title, p in images]
    md += ["## Configuration", "", "```json", json.dumps(run.config, indent=2, default=str), "```", ""]

    return atomic_write_text(run_dir / REPORT_FILE, "\n".join(md), mode=0o644)

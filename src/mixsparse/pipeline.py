"""The whole job in one place: calibration data -> sensitivity -> allocation/search -> layer-wise
pruning -> evaluation -> export -> report. Each stage is a plain function; :func:`run` strings them
together and writes ``run.json`` in the run directory after every stage (a crash keeps what was done).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import resource
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .allocation import Allocation, AllocationContext, get_allocation
from .config import RunConfig
from .data import Calibration, eval_windows, load_corpus, window_prefix
from .engine import prune_layerwise
from .errors import ConfigError
from .evaluation import perplexity
from .io import atomic_write_yaml
from .modeling import coverage, coverage_warning, find_decoder_blocks, measured_sparsity, param_counts, prunable_params
from .placement import Placement, check_device
from .recovery import MODES as RECOVER_MODES
from .record import (RUN_FILE, AllocationInfo, ModelInfo, PeakMemory, Perplexity, PlacementInfo, PruningInfo,
                     RunRecord, WindowsInfo)
from .sparsity import SparsityMap

log = logging.getLogger(__name__)


def placement_for(cfg: RunConfig, model: nn.Module) -> Placement:
    """The run's one placement policy (device, whole/blockwise), from ``model.device``/``model.placement``."""
    return Placement.resolve(check_device(cfg.model.device), cfg.model.placement, model, offload=cfg.prune.offload,
                             compute=cfg.model.compute_dtype)


def placement_info(placement: Placement, model: nn.Module) -> PlacementInfo:
    dtype = next(model.parameters()).dtype
    compute = placement.compute or dtype
    whole = placement.whole_upcast(model) if placement.compute is not None else None
    from .streaming import stream_of

    return PlacementInfo(device=str(placement.device), mode=placement.mode, dtype=str(dtype).replace("torch.", ""),
                         compute_dtype=str(compute).replace("torch.", ""), whole_upcast=whole,
                         streamed=stream_of(model) is not None)


def peak_memory() -> dict:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    dev = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"cpu_rss_mb": round(rss_kb / 1024, 1), "device_mb": None if dev is None else round(dev, 1)}


@dataclass
class Timer:
    """Seconds per stage, and the process's peak RSS (MB) when each stage ended: the stage whose value
    jumps is the one that set the peak."""

    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_after: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - t0, 3)
            self.peak_rss_after[stage] = peak_memory()["cpu_rss_mb"]


def allocate(model: nn.Module, tokenizer, cfg: RunConfig, *, device, run_dir: Path | None = None,
             cache_dir: Path | None = None, progress: bool = True, timer: Timer | None = None,
             calib: Calibration | None = None, workers=None) -> Allocation:
    """Per-layer sparsity from the registered method ``cfg.prune.allocation``; never looks at the test split.
    Sensitivity scores are cached in ``cache_dir`` (default ``run_dir/cache``), the search state in ``run_dir``.
    ``workers`` (:func:`mixsparse.distributed.from_env`) shares the search's evaluations over ranks."""
    method = get_allocation(cfg.prune.allocation)(cfg.allocation_options())
    if cache_dir is None and run_dir is not None:
        cache_dir = run_dir / "cache"
    ctx = AllocationContext(model=model, tokenizer=tokenizer, cfg=cfg, target=cfg.prune.sparsity,
                            counts=param_counts(model), blocks_name=find_decoder_blocks(model)[0], device=device,
                            calib=calib or Calibration(tokenizer, cfg), cache_dir=cache_dir, run_dir=run_dir,
                            progress=progress, workers=workers, timer=timer or Timer())
    return method.allocate(ctx)


_OUTPUTS = ("run.json", "config.yaml", "allocation.yaml", "search_state.json", "search.json", "report.md", "model",
            "compressed", "plots", "recovery", "model-quantized")


def _set_aside(out: Path) -> Path:
    """Move a previous run's outputs into ``out/.previous-run`` (the sensitivity/level caches stay)."""
    keep = out / ".previous-run"
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir()
    for name in _OUTPUTS:
        if (out / name).exists():
            os.replace(out / name, keep / name)
    return keep


def _restore(keep: Path, out: Path) -> None:
    for name in _OUTPUTS:
        if (keep / name).exists():
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            os.replace(keep / name, out / name)
        elif (out / name).is_dir():
            shutil.rmtree(out / name)
        else:
            (out / name).unlink(missing_ok=True)
    shutil.rmtree(keep, ignore_errors=True)


def _best_effort(step: Callable[[], Any], what: str) -> None:
    try:
        step()
    except Exception as e:  # noqa: BLE001 - a secondary failure must not replace the error being reported
        log.warning("could not %s: %s", what, e)


def target_of(cfg: RunConfig, alloc: Allocation, counts: dict[str, int]) -> str:
    """The run's target sparsity: the given one, or an allocation file's average when the file decided."""
    if alloc.method == "file" and not cfg.prune.sparsity_given:
        return f"{alloc.sparsity_map.average(counts):.6g}"
    if alloc.method == "joint":  # a budget of bytes; prune.sparsity only centred the seed
        return f"{cfg.search.bits_per_weight:g} bits per weight"
    return str(cfg.prune.sparsity)


def save_allocation(path: Path, alloc: Allocation, cfg: RunConfig, counts: dict[str, int]) -> Path:
    return atomic_write_yaml(path, {
        "method": alloc.method, "pruner": cfg.prune.pruner, "target": target_of(cfg, alloc, counts),
        "average": alloc.sparsity_map.average(counts), "per_layer": alloc.sparsity_map.to_dict(),
    })


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------
@dataclass
class PruneOutcome:
    """What :func:`prune` did: its sections of the run record, the method's decision (with its
    :class:`SparsityMap`), and the codes of a joint SparseGPT quantization (for the packed checkpoint)."""

    record: RunRecord  # config, allocation, search, pruning, timings
    allocation: Allocation
    quantized: dict = field(default_factory=dict)


def prune(model: nn.Module, tokenizer, config: RunConfig | None = None, *, run_dir: str | Path | None = None,
          progress: bool = True, timer: Timer | None = None) -> PruneOutcome:
    """Python API: allocate per-layer sparsity and prune ``model`` in place. Evaluation and export are
    separate steps (see :func:`run`)."""
    cfg = config or RunConfig()
    device = placement_for(cfg, model)  # one placement policy for every stage of the run
    timer = timer or Timer()
    rd = Path(run_dir) if run_dir is not None else None
    counts = param_counts(model)
    calib = Calibration(tokenizer, cfg)
    alloc = allocate(model, tokenizer, cfg, device=device, run_dir=rd, progress=progress, timer=timer, calib=calib)
    quantized = {}
    with timer("prune"):
        if alloc.stitched:  # the searched candidate is already in the model
            seconds, fallbacks = 0.0, ((alloc.search or {}).get("level_db") or {}).get("fallbacks", {})
            quantized = alloc.quantized or {}
        else:
            ids = calib.ids(cfg.data.calibration_samples, cfg.data.seqlen)
            rep = prune_layerwise(model, ids, alloc.sparsity_map, cfg.prune.pruner, cfg.pruner_options(), device=device,
                                  batch_size=cfg.data.batch_size, offload=cfg.prune.offload,
                                  sequential=cfg.prune.sequential, progress=progress,
                                  min_token_share=cfg.prune.min_token_share)
            seconds, quantized, fallbacks = rep.total_seconds, rep.quantized, rep.fallbacks
    achieved, overall = measured_sparsity(model)
    cov = coverage(model)
    warning = coverage_warning(cov)
    if warning:
        log.warning(warning)
    record = RunRecord(
        config=cfg.to_dict(),
        allocation=AllocationInfo(method=alloc.method, target=target_of(cfg, alloc, counts),
                                  average_requested=alloc.sparsity_map.average(counts),
                                  per_layer=alloc.sparsity_map.to_dict(), sensitivity=alloc.sensitivity,
                                  sensitivity_kind=alloc.sensitivity_kind),
        search=alloc.search,
        pruning=PruningInfo(pruner=cfg.prune.pruner, achieved=achieved, overall_sparsity=overall, seconds=seconds,
                            fallbacks=fallbacks),
        coverage=cov, timings=timer.timings)
    if record.pruning.fallback_warning():
        log.warning(record.pruning.fallback_warning())
    return PruneOutcome(record, alloc, quantized)


class _Writer:
    """The run record of one run directory and its stages: every stage updates the record and saves it
    (``run.json``), so a crash keeps what was done; evaluations shared by ``prune`` and ``recover`` live here."""

    def __init__(self, out: Path, record: RunRecord, cfg: RunConfig, progress: bool):
        self.out, self.record, self.cfg, self.progress = out, record, cfg, progress
        self.timer = Timer()
        self.test_windows: torch.Tensor | None = None

    def save(self) -> None:
        self.record.timings = self.timer.timings
        self.record.peak_memory = PeakMemory(**peak_memory(), after_stage_mb=self.timer.peak_rss_after)
        self.record.save(self.out / RUN_FILE)

    def failed(self, e: BaseException) -> None:
        self.record.status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        self.record.error = f"{type(e).__name__}: {e}"

    def windows(self, tokenizer) -> None:
        """The test windows (read once, before any expensive stage, so a bad split fails early) and the
        record's perplexity section for them."""
        cfg = self.cfg
        if self.test_windows is None:
            self.test_windows = eval_windows(tokenizer, load_corpus(cfg.data.evaluation, "test"), cfg.data.seqlen,
                                             cfg.data.eval_tokens or None, prefix=window_prefix(tokenizer, cfg.data.bos))
        ppl = self.record.perplexity
        tokens = int(self.test_windows.numel())
        if ppl is None or (ppl.tokens, ppl.seqlen) != (tokens, cfg.data.seqlen):  # values on other windows don't compare
            self.record.perplexity = Perplexity(split="test", tokens=tokens, seqlen=cfg.data.seqlen)

    def perplexity(self, which: str, model: nn.Module, tokenizer, placement: Placement) -> None:
        """Test perplexity of ``model`` as ``perplexity.<which>`` (dense, pruned, recovered, quantized)."""
        cfg = self.cfg
        if not cfg.eval.perplexity:
            return
        self.windows(tokenizer)
        with self.timer(f"eval_{which}"):
            value = perplexity(model, self.test_windows, batch_size=cfg.data.batch_size, device=placement,
                               progress=self.progress)
        setattr(self.record.perplexity, which, value)
        self.save()

    def downstream(self, model: nn.Module, tokenizer, placement: Placement) -> None:
        """Zero-shot tasks and lm-eval tasks, as ``eval`` asks."""
        cfg = self.cfg
        if cfg.eval.zeroshot:
            from .zeroshot import evaluate_zeroshot

            with self.timer("zeroshot"):
                self.record.zeroshot = evaluate_zeroshot(model, tokenizer, tasks=tuple(cfg.eval.zeroshot),
                                                         n=cfg.eval.zeroshot_n, device=placement, seed=cfg.data.seed,
                                                         progress=self.progress)
            self.save()
        if cfg.eval.lm_eval_tasks:
            from .lmeval import run_lm_eval

            with self.timer("lm_eval"):
                self.record.lm_eval = run_lm_eval(model, tokenizer, list(cfg.eval.lm_eval_tasks), device=placement,
                                                  progress=self.progress)
            self.save()

    def export(self, model: nn.Module, tokenizer, metadata: dict, sparsity_map: SparsityMap | None,
               quantized: dict) -> None:
        """The run's checkpoints, as ``export.*`` asks: ``model/``, ``compressed/`` (sizes into the record) and,
        for a quantized run, ``model-quantized/``."""
        from .export import save_compressed, save_hf

        cfg, out, timer, record = self.cfg, self.out, self.timer, self.record
        artifacts = {}
        if cfg.export.checkpoint:
            with timer("export"):
                save_hf(model, tokenizer, out / "model", metadata, overwrite=True)
            artifacts["checkpoint"] = "model/"
        from .streaming import stream_of

        if cfg.export.compressed:
            with timer("export_compressed"):
                record.sizes = save_compressed(model, out / "compressed",
                                               dtype=cfg.export.compressed_dtype(next(model.parameters()).dtype),
                                               sparsity_map=sparsity_map, tokenizer=tokenizer, metadata=metadata,
                                               overwrite=True, quantized=quantized)
            artifacts["compressed"] = "compressed/"
        if cfg.export.quantized_hf and cfg.quantize.method != "none" and stream_of(model) is not None:
            reason = "the compressed-tensors export does not stream yet (model/ holds the quantized values)"
            log.warning("model-quantized/ not written: %s", reason)
            record.quantization["export"] = {"skipped": reason}
        elif cfg.export.quantized_hf and cfg.quantize.method != "none" and quantized:
            from .quant.ct_export import save_compressed_tensors, unsupported

            reason = unsupported(model)
            if reason:  # the other checkpoints are written; this one would not load
                log.warning("model-quantized/ not written: %s", reason)
                record.quantization["export"] = {"skipped": reason}
            else:
                with timer("export_quantized"):
                    record.quantization["export"] = save_compressed_tensors(model, quantized, out / "model-quantized",
                                                                            tokenizer, overwrite=True)
                artifacts["quantized"] = "model-quantized/"
        record.artifacts = artifacts


def _joint_scheme(cfg: RunConfig, alloc: Allocation) -> str:
    """One grid for SparseGPT's joint mode; the bit widths and their parameter shares for allocation joint."""
    from .quant.stage import spec_of

    joint = (alloc.search or {}).get("joint")
    if not joint:
        return spec_of(cfg.quantize).label()
    counts = alloc.sparsity_map.param_counts or {}
    total = sum(counts.get(n, 0) for n in joint["per_layer"]) or 1
    share: dict[int, int] = {}
    for n, v in joint["per_layer"].items():
        share[v["bits"]] = share.get(v["bits"], 0) + counts.get(n, 0)
    mix = ", ".join(f"int{b} {100 * c / total:.0f}%" for b, c in sorted(share.items()))
    grid = f"g{cfg.quantize.group_size}" if cfg.quantize.group_size else "channel"
    return f"mixed ({mix}; {'sym' if cfg.quantize.symmetric else 'asym'}-{grid}), {joint['bits_per_weight']:.3f} bits/weight"


def _new_record(cfg: RunConfig, command: str | None) -> RunRecord:
    return RunRecord(config=cfg.to_dict(), command=command or " ".join(shlex.quote(a) for a in sys.argv),
                     version=__version__, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     status="running")


def run(cfg: RunConfig, out_dir: str | Path, *, command: str | None = None, progress: bool = True,
        model: nn.Module | None = None, tokenizer=None, overwrite: bool = False) -> RunRecord:
    """Load, prune, evaluate, export and report; everything lands in ``out_dir``.

    The configuration, the files it names, the device and ``out_dir`` are checked before the model is
    loaded. A directory holding a finished run is refused unless ``overwrite``; an unfinished one is
    resumed (search state and sensitivity cache reused). ``run.json`` says ``status``: running, finished,
    failed or interrupted (with the error)."""
    from .loading import load_model
    from .preflight import check_config, check_run_dir, run_status
    from .report import render_report

    check_config(cfg, tokenizer)
    out = check_run_dir(out_dir, overwrite=overwrite)
    # an overwritten run is set aside, not deleted, until the new one has finished (restored if it fails)
    previous = _set_aside(out) if overwrite and run_status(out) is not None else None
    w = _Writer(out, _new_record(cfg, command), cfg, progress)
    record, timer = w.record, w.timer
    atomic_write_yaml(out / "config.yaml", cfg.to_dict())

    try:
        w.save()  # status "running" from the start (a resumed directory no longer says "failed")
        with timer("load"):
            if model is None:
                model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype, allow_pickle=cfg.model.allow_pickle,
                                              stream=cfg.model.stream)
        from .streaming import check_streamed

        check_streamed(cfg, model)  # a streamed model: stages that need it whole are refused before any work
        counts = param_counts(model)
        get_allocation(cfg.prune.allocation)(cfg.allocation_options()).check(cfg, counts)  # before the dense eval
        _, blocks = find_decoder_blocks(model)
        record.model = ModelInfo(name=cfg.model.name, num_params=sum(p.numel() for p in model.parameters()),
                                 prunable_params=sum(counts.values()), blocks=len(blocks))
        placement = placement_for(cfg, model)
        record.placement = placement_info(placement, model)
        record.windows = WindowsInfo(bos=cfg.data.bos, prefix_ids=window_prefix(tokenizer, cfg.data.bos))

        from .recovery.stage import check_placement, dense_snapshot, needs_dense, recover

        check_placement(cfg.recover, placement)  # before any work: fine-tuning needs the model whole on the device
        if cfg.quantize.method != "none":
            from .quant.stage import check_groups, check_not_quantized, spec_of

            check_not_quantized(model)
            check_groups(model, spec_of(cfg.quantize))
        if cfg.eval.perplexity:
            w.windows(tokenizer)
            if cfg.eval.dense_baseline:
                w.perplexity("dense", model, tokenizer, placement)

        dense = None
        if needs_dense(cfg.recover):  # the recovery's teacher; on disk, not a second model in memory
            with timer("dense_snapshot"):
                dense = dense_snapshot(model, out / "cache")
        pruned = prune(model, tokenizer, cfg, run_dir=out, progress=progress, timer=timer)
        alloc, quantized = pruned.allocation, pruned.quantized
        record.allocation, record.search, record.pruning, record.coverage = (
            pruned.record.allocation, pruned.record.search, pruned.record.pruning, pruned.record.coverage)
        save_allocation(out / "allocation.yaml", alloc, cfg, counts)
        w.save()

        w.perplexity("pruned", model, tokenizer, placement)
        if cfg.recover.mode != "none":
            with timer("recover"):
                record.recovery = recover(model, tokenizer, cfg, dense=dense, device=placement, run_dir=out,
                                          progress=progress)
            w.save()
            w.perplexity("recovered", model, tokenizer, placement)
        if cfg.quantize.method in ("rtn", "gptq"):
            from .quant.stage import quantize_model, spec_of

            q = cfg.quantize
            with timer("quantize"):
                ids = Calibration(tokenizer, cfg).ids(q.calibration_samples or cfg.data.calibration_samples,
                                                      cfg.data.seqlen) if q.method == "gptq" else None
                quantized, record.quantization = quantize_model(model, q.method, spec_of(q), ids, device=placement,
                                                                blocksize=q.blocksize, percdamp=q.percdamp,
                                                                progress=progress,
                                                                min_token_share=cfg.prune.min_token_share)
            if record.quantization.get("fallbacks"):
                fb = record.quantization["fallbacks"]
                log.warning("gptq: %d layer(s) saw fewer than %d calibration tokens (rarely routed experts, e.g. %s) and "
                            "were rounded to nearest; run.json lists them (quantization.fallbacks)", len(fb),
                            next(iter(fb.values()))["min_tokens"], next(iter(fb)))
            w.save()
            w.perplexity("quantized", model, tokenizer, placement)
        elif cfg.quantize.method == "joint":
            from .quant.stage import spec_of

            record.quantization = {"method": "joint", "scheme": _joint_scheme(cfg, alloc),
                                   "seconds": record.pruning.seconds,
                                   "note": "pruned and quantized in one sweep: the pruned perplexity is the quantized one"}
            if record.perplexity is not None and record.perplexity.pruned is not None:
                record.perplexity.quantized = record.perplexity.pruned
        w.downstream(model, tokenizer, placement)

        metadata = {"pruner": cfg.prune.pruner, "allocation": alloc.method, "target": record.allocation.target,
                    "recovery": cfg.recover.mode, "quantization": (record.quantization or {}).get("scheme"),
                    "per_layer": alloc.sparsity_map.to_dict(), "mixsparse_version": __version__}
        w.export(model, tokenizer, metadata, alloc.sparsity_map, quantized)
    except BaseException as e:
        w.failed(e)
        if previous is not None:
            _restore(previous, out)  # the finished run that --overwrite was to replace comes back whole
        else:
            _best_effort(w.save, "record the failure in run.json")  # never hides the original error
            if cfg.export.report and (out / RUN_FILE).exists():
                _best_effort(lambda: render_report(out), "render the report of the failed run")
        raise
    record.status = "finished"
    w.save()
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    if cfg.export.report:
        render_report(out)
    return record


def recover_run(run_dir: str | Path, out_dir: str | Path | None = None, overrides: dict | None = None, *,
                command: str | None = None, progress: bool = True, overwrite: bool = False) -> tuple[RunRecord, Path]:
    """Recover the pruned model of a finished run into a new run directory (``RUN_DIR-MODE`` by default).

    The dense teacher is the run's own ``model.name``; the pruned model is the run's ``model/`` (or its
    ``compressed/`` checkpoint), whose zeros must match what the run recorded. The source run is never
    modified."""
    from .config import apply_overrides, from_dict
    from .export import load_compressed
    from .loading import load_model, parse_dtype
    from .preflight import check_config, check_run_dir
    from .recovery.common import check_zeros_match
    from .recovery.stage import check_placement, dense_snapshot, needs_dense, recover
    from .report import render_report

    src = Path(run_dir)
    source = RunRecord.load(src)
    if source.status not in (None, "finished"):
        raise ConfigError(f"run {src} did not finish (status {source.status}); finish it first (same command)")
    data = apply_overrides(source.run_config(), overrides)
    if (data.get("quantize") or {}).get("method", "none") != "none":
        raise ConfigError(f"run {src} was quantized ({data['quantize']['method']}); recovery would train its weights off "
                          "the grid. Prune again with --recover MODE --quantize METHOD (recovery runs before quantizing)")
    cfg = from_dict(RunConfig, data)
    if cfg.recover.mode == "none":
        raise ConfigError(f"mixsparse recover needs --mode, one of {', '.join(m for m in RECOVER_MODES if m != 'none')}")
    achieved = source.pruning.achieved if source.pruning is not None else None
    if not achieved:
        raise ConfigError(f"{src}/run.json records no pruned layers (pruning.achieved); is it a `mixsparse prune` run?")
    dtype = parse_dtype(cfg.model.dtype)
    if (src / "model" / "config.json").is_file():
        load_pruned = lambda: load_model(str(src / "model"), dtype=cfg.model.dtype)  # noqa: E731
    elif (src / "compressed").is_dir():
        def load_pruned():
            from transformers import AutoTokenizer

            return load_compressed(src / "compressed", dtype=dtype if isinstance(dtype, torch.dtype) else None), \
                AutoTokenizer.from_pretrained(src / "compressed")
    else:
        raise ConfigError(f"{src} has neither model/ nor compressed/ to recover; re-run the prune with export on")
    out_path = Path(out_dir if out_dir is not None else f"{src}-{cfg.recover.mode}").expanduser().resolve()
    src_path = src.expanduser().resolve()
    if out_path == src_path or src_path in out_path.parents or out_path in src_path.parents:
        raise ConfigError(f"--out {out_path} is (or contains, or lies inside) the source run {src_path}; recover into a "
                          "separate directory (the source run is never modified)")
    check_config(cfg)
    out = check_run_dir(out_path, overwrite=overwrite)
    record = _new_record(cfg, command)
    record.recovered_from = str(src_path)
    record.model, record.allocation, record.search, record.pruning, record.windows, record.coverage = (
        source.model, source.allocation, source.search, source.pruning, source.windows, source.coverage)
    if cfg.eval.perplexity and source.perplexity is not None:  # its dense baseline stays (on the same windows)
        p = source.perplexity
        record.perplexity = Perplexity(split=p.split, tokens=p.tokens, seqlen=p.seqlen, dense=p.dense)
    w = _Writer(out, record, cfg, progress)
    timer = w.timer

    atomic_write_yaml(out / "config.yaml", cfg.to_dict())
    try:
        w.save()
        dense = None
        if needs_dense(cfg.recover):  # the dense teacher first, to disk, then freed: one model in memory at a time
            with timer("dense_snapshot"):
                dense_model, _ = load_model(cfg.model.name, dtype=cfg.model.dtype, allow_pickle=cfg.model.allow_pickle)
                dense = dense_snapshot(dense_model, out / "cache")
                pruned_params = prunable_params(dense_model, biases=True)  # recovery tunes biases too
                untouched = {n: p.detach().clone() for n, p in dense_model.named_parameters() if n not in pruned_params}
                del dense_model
        with timer("load"):
            model, tokenizer = load_pruned()
            check_zeros_match(model, achieved, f"{src}/run.json")
        if dense is not None:  # the teacher must be the model this run pruned (a local dir may have changed)
            own = dict(model.named_parameters())
            for n, t in untouched.items():
                if n in own and not torch.allclose(own[n].detach().float(), t.float(), rtol=1e-2, atol=1e-3):
                    raise ConfigError(f"the dense model {cfg.model.name!r} differs from the run's pruned model in "
                                      f"{n}, which pruning does not touch; it is not the model this run pruned")
            del untouched
        placement = placement_for(cfg, model)
        record.placement = placement_info(placement, model)
        check_placement(cfg.recover, placement)
        w.perplexity("pruned", model, tokenizer, placement)
        with timer("recover"):
            record.recovery = recover(model, tokenizer, cfg, dense=dense, device=placement, run_dir=out,
                                      progress=progress)
        w.save()
        w.perplexity("recovered", model, tokenizer, placement)
        w.downstream(model, tokenizer, placement)
        counts = param_counts(model)
        per_layer = source.allocation.per_layer if source.allocation is not None else {}
        metadata = {"pruner": cfg.prune.pruner, "allocation": source.allocation.method if source.allocation else None,
                    "recovery": cfg.recover.mode, "per_layer": per_layer, "mixsparse_version": __version__}
        w.export(model, tokenizer, metadata, SparsityMap(per_layer, counts) if per_layer else None, {})
    except BaseException as e:
        w.failed(e)
        _best_effort(w.save, "record the failure in run.json")
        raise
    record.status = "finished"
    w.save()
    if cfg.export.report:
        render_report(out)
    return record, out

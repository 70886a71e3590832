"""MSP's search as one step of a run: level space from the config, level database, fitness on held-out
validation windows, the evolutionary loop, and the final model (stitched from the levels or left to the
engine). Called by the ``msp`` allocation method with the run's :class:`AllocationContext`."""

from __future__ import annotations

from ..allocation.registry import Allocation, AllocationContext, Bounds
from ..data import eval_windows, load_corpus
from ..errors import ConfigError, MixsparseError
from ..io import fingerprint
from ..placement import Placement
from ..sensitivity import model_fingerprint
from ..sparsity import NM
from .database import LevelDatabase
from .evolution import evolutionary_search
from .fitness import Fitness, resolve_dtype
from .joint import JointDatabase, JointSpace
from .space import LevelSpace, block_index_map


def level_space(cfg, bounds: Bounds, counts: dict[str, int]) -> LevelSpace:
    """The search's levels: mixed N:M patterns around an N:M target, else ``target + k * step``."""
    target, s = cfg.prune.sparsity, cfg.search
    if isinstance(target, NM):
        patterns = s.patterns or [NM(n, target.m) for n in range(max(1, target.n - 1), min(target.m - 1, target.n + 1) + 1)]
        return LevelSpace.mixed_nm(target, patterns, counts)
    if s.patterns:
        raise ConfigError("search.patterns (mixed N:M) needs an N:M target such as prune.sparsity: '2:4'")
    return LevelSpace.unstructured(target, counts, step=s.step, max_shift=s.max_shift,
                                   min_sparsity=bounds.min_sparsity, max_sparsity=bounds.max_sparsity)


def msp_search(ctx: AllocationContext, bounds: Bounds, continuous: dict[str, float],
               scores: dict[str, float]) -> Allocation:
    cfg, model, workers = ctx.cfg, ctx.model, ctx.workers
    s = cfg.search
    counts = ctx.counts
    space = level_space(cfg, bounds, counts)
    init = space.snap(continuous)
    n_cal = s.calibration_samples or cfg.data.calibration_samples
    ids = ctx.calib.ids(n_cal, cfg.data.seqlen)
    calib_fp = [cfg.data.calibration, n_cal, cfg.data.seqlen, cfg.data.seed, ctx.calib.prefix]
    placement = Placement.resolve(ctx.device, cfg.model.placement, model)
    model_dtype = next(model.parameters()).dtype
    # a reconstructing pruner's levels are stored in the fitness dtype (what the fitness scores), unless the
    # final model is stitched from them: then in the model's own, so the saved model loses no precision
    store_dtype = model_dtype if s.final == "stitched" else resolve_dtype(s.fitness_dtype, model_dtype, placement.device)
    db_fp = fingerprint({"model": model_fingerprint(model), "pruner": cfg.prune.pruner, "options": cfg.prune.options,
                         "calibration": calib_fp, "space": [str(space.target), space.step, space.min_offset,
                                                            space.max_offset], "dtype": str(store_dtype),
                         "min_token_share": cfg.prune.min_token_share})
    store = None
    if ctx.run_dir is not None:
        store = ctx.run_dir / "cache" / f"levels-{db_fp}"
    from ..distributed import share_flag
    from ..pruners import get_pruner

    from ..streaming import stream_of

    # a store on disk (a reconstructing pruner's levels, a streamed model's masks) is built once, by rank 0
    on_disk = get_pruner(cfg.prune.pruner).reconstructs or stream_of(model) is not None
    shared_store = workers is not None and store is not None and on_disk
    if shared_store and not workers.is_main:
        # rank 0 writes the on-disk store; the others wait for its word, then open it (same fingerprint)
        if not share_flag(workers, None):
            raise MixsparseError("rank 0 failed to build the level database (see its error); nothing to search")
    ok = False
    try:
        cache = LevelDatabase.build(model, space, ids, cfg.prune.pruner, cfg.prune.options, device=placement,
                                    store_dir=store, fingerprint=db_fp, ram_bytes=int(s.db_ram_mb * 2**20),
                                    store_dtype=store_dtype, progress=ctx.progress,
                                    min_token_share=cfg.prune.min_token_share)
        ok = True
    finally:
        if shared_store and workers.is_main:
            share_flag(workers, ok)
    with cache:  # freed when the search is done (evaluation and export need none of it), also after an error
        result, search = _run_search(ctx, cache, space, init, {"pruner": cfg.prune.pruner, "options": cfg.prune.options,
                                                               "calibration": calib_fp}, placement)
        if s.final == "stitched":
            cache.write(result.offsets)
        return Allocation("msp", result.sparsity_map, scores, "fisher", search, stitched=s.final == "stitched")


def _run_search(ctx: AllocationContext, cache: LevelDatabase, space: LevelSpace, init: dict, extra: dict,
                placement: Placement):
    """Fitness on the validation windows and the evolutionary loop from ``init`` (and uniform): ``(result,
    the search's summary for the run record)``. ``extra``: what else the checkpoint's fingerprint covers."""
    cfg, model, workers, s = ctx.cfg, ctx.model, ctx.workers, ctx.cfg.search
    windows = eval_windows(ctx.tokenizer, load_corpus(cfg.data.validation, "validation"), s.fitness_seqlen,
                           s.fitness_windows * s.fitness_seqlen, prefix=ctx.calib.prefix)
    fitness = Fitness(cache, windows, s.fitness, device=placement, group=workers.group if workers else None,
                      dtype=s.fitness_dtype, kl_topk=s.kl_topk,
                      incremental=s.incremental, state_cache_mb=s.state_cache_mb)
    uniform_offsets = {n: 0 for n in space.param_counts}
    result = evolutionary_search(
        fitness, space, [init, uniform_offsets], s.core(),
        blocks_of=block_index_map(model, list(space.param_counts)),
        checkpoint=(ctx.run_dir / "search_state.json") if ctx.run_dir is not None else None,
        write_checkpoint=workers is None or workers.is_main,
        fingerprint_extra={"model": model_fingerprint(model), **extra,
                           "validation": [cfg.data.validation, s.fitness_windows, s.fitness_seqlen],
                           "fitness": [s.fitness, str(fitness.dtype), s.kl_topk]},
        progress=ctx.progress,
    )
    init_fit, uni_fit = fitness(init, s.final_windows), fitness(uniform_offsets, s.final_windows)
    search = {"history": result.history, "fitness": s.fitness, "seconds": round(result.seconds + cache.seconds, 3),
              "cache_seconds": round(cache.seconds, 3), "evaluations": result.evaluations,
              "generations": result.generations, "stopped_by": result.stopped_by,
              "time_budget": s.time_budget, "best_fitness": result.fitness,
              "init_fitness": init_fit, "uniform_fitness": uni_fit,
              "fitness_dtype": str(fitness.dtype).replace("torch.", ""), "kl_topk": s.kl_topk,
              "incremental": s.incremental, "blocks_run": fitness.blocks_run,
              "placement": fitness.forward.placement.mode,
              "level_db": {"ram_bytes": cache.ram_bytes_used(), "disk_bytes": cache.disk_bytes(),
                           "reused": cache.reused, "fallbacks": cache.fallbacks},
              "reference_bytes_per_token": fitness.reference_bytes_per_token()}
    del fitness  # device replica, block states and dense reference go before the model is touched
    return result, search


def joint_space(cfg, model) -> JointSpace:
    """The joint search's cost levels (checked before any work: every layer needs a variant at every level)."""
    from ..modeling import prunable_linears

    s, q = cfg.search, cfg.quantize
    if s.bits_per_weight is None:
        raise ConfigError("allocation joint needs search.bits_per_weight, the budget of the prunable layers "
                          "(e.g. 3.25: as many bytes as 50% sparse + 4-bit, or dense 3-bit, with group-64 scales)")
    from ..experts import ExpertMatrix

    layers = prunable_linears(model)
    fused = [n for n, lin in layers.items() if isinstance(lin, ExpertMatrix)]
    if fused:  # their codes cannot be packed (export stores fused experts as values): the budget would not hold
        raise ConfigError(f"allocation joint does not cover fused MoE experts yet ({len(fused)}, e.g. {fused[0]}): the "
                          "checkpoint could not store them at their bit width; use allocation msp with quantize gptq")
    shapes = {n: (lin.out_features, lin.in_features) for n, lin in layers.items()}
    return JointSpace.build(s.bits_per_weight, shapes, step=s.bits_step, max_shift=s.bits_shift, bits=s.bits,
                            group_size=q.group_size, symmetric=q.symmetric, max_sparsity=s.max_joint_sparsity)


def joint_search(ctx: AllocationContext, continuous: dict[str, float], scores: dict[str, float]) -> Allocation:
    """Per-layer (sparsity, bits) under ``search.bits_per_weight``: the joint level database, then MSP's search
    from the Fisher seed; the final model is the searched candidate (stitched) and its codes are returned."""
    cfg, model = ctx.cfg, ctx.model
    s, q = cfg.search, cfg.quantize
    if ctx.workers is not None:
        raise ConfigError("allocation joint runs in one process for now; run it without --nproc")
    space = joint_space(cfg, model)
    init = space.seed(continuous)
    n_cal = s.calibration_samples or cfg.data.calibration_samples
    ids = ctx.calib.ids(n_cal, cfg.data.seqlen)
    calib_fp = [cfg.data.calibration, n_cal, cfg.data.seqlen, cfg.data.seed, ctx.calib.prefix]
    placement = Placement.resolve(ctx.device, cfg.model.placement, model)
    grid = [space.target, space.step, space.min_offset, space.max_offset, list(space.bits), space.group_size,
            space.symmetric, space.max_sparsity]
    db_fp = fingerprint({"model": model_fingerprint(model), "joint": grid, "variants": 2, "options": cfg.prune.options,
                         "calibration": calib_fp, "min_token_share": cfg.prune.min_token_share})
    store = ctx.run_dir / "cache" / f"joint-{db_fp}" if ctx.run_dir is not None else None
    cache = JointDatabase.build_joint(model, space, ids, cfg.prune.options, device=placement, store_dir=store,
                                      fingerprint=db_fp, ram_bytes=int(s.db_ram_mb * 2**20), progress=ctx.progress,
                                      min_token_share=cfg.prune.min_token_share)
    with cache:
        # the database's fingerprint: scores memoised on one database must not resume on another
        result, search = _run_search(ctx, cache, space, init, {"joint": grid, "database": db_fp}, placement)
        plan = space.plan(result.offsets)
        search["joint"] = {
            "bits_per_weight_budget": space.target, "bits_per_weight": space.bits_per_weight(result.offsets),
            "per_layer": {n: {"sparsity": v.sparsity, "bits": v.bits, "level_bits_per_weight": space.level(result.offsets[n])}
                          for n, v in plan.items()},
            "group_size": q.group_size, "symmetric": q.symmetric,
            "variant_errors": getattr(cache, "errors", {})}
        if s.final == "stitched":
            quantized = cache.quantized(result.offsets)
            cache.write(result.offsets)
    if s.final == "stitched":
        return Allocation("joint", result.sparsity_map, scores, "fisher", search, stitched=True, quantized=quantized)
    # sequential: each layer pruned and quantized again at its (sparsity, bits), block after block, on the outputs
    # of the blocks already compressed (as GPTQ and SparseGPT run); same variants, so the same bytes
    from ..engine import prune_layerwise

    grid = {"group_size": q.group_size, "symmetric": q.symmetric}
    with ctx.stage("joint_final"):
        rep = prune_layerwise(model, ctx.calib.ids(cfg.data.calibration_samples, cfg.data.seqlen), result.sparsity_map,
                              "sparsegpt", cfg.prune.options, device=placement, batch_size=cfg.data.batch_size,
                              offload=cfg.prune.offload, sequential=True, progress=ctx.progress,
                              min_token_share=cfg.prune.min_token_share,
                              layer_options={n: {"bits": v.bits, **grid} for n, v in plan.items()})
    search["level_db"]["fallbacks"] = rep.fallbacks
    return Allocation("joint", result.sparsity_map, scores, "fisher", search, stitched=True, quantized=rep.quantized)

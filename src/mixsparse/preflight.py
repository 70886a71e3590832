"""Checks that run before anything expensive: the whole configuration, the files it names, the device and
the run directory, so that a typo costs a second, not the minutes of a dense evaluation or a Fisher trace.

:func:`check_config` needs no model; :func:`check_run_dir` decides what may happen to an output
directory (a finished run is never overwritten by accident). Both raise a :class:`MixsparseError` whose
one-line message names the problem and the fix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .config import RunConfig
from .errors import ConfigError, MixsparseError
from .recovery import trains_whole

STATUS_FINISHED = "finished"


def check_config(cfg: RunConfig, tokenizer=None) -> None:
    """Everything about ``cfg`` that can be checked without loading the model (``tokenizer``: the one a
    caller already holds, else the model's is loaded alone when a local corpus must be measured)."""
    from .allocation import get_allocation
    from .data import check_corpus
    from .placement import check_device
    from .pruners import get_pruner

    check_device(cfg.model.device)
    check_model_spec(cfg.model.name)
    get_pruner(cfg.prune.pruner).make_options(cfg.prune.options)
    check_corpus(cfg.data.calibration, "calibration")
    method = get_allocation(cfg.prune.allocation)(cfg.allocation_options())
    if method.needs_validation:
        check_corpus(cfg.data.validation, "validation")
    if cfg.eval.perplexity:
        check_corpus(cfg.data.evaluation, "test")
        if cfg.data.eval_tokens and cfg.data.eval_tokens < cfg.data.seqlen:
            raise ConfigError(f"data.eval_tokens ({cfg.data.eval_tokens}) is below data.seqlen ({cfg.data.seqlen}): "
                              "not one evaluation window fits; raise --eval-tokens or lower --seqlen (0 = whole test split)")
    method.check(cfg)
    if cfg.quantize.method != "none" and cfg.export.quantized_hf:
        from .quant.ct_export import available

        if not available():
            raise ConfigError("a quantized run also writes the compressed-tensors checkpoint, which needs "
                              "compressed-tensors: pip install 'mixsparse[quant]' (or --set export.quantized_hf=false)")
    if trains_whole(cfg.recover.mode):
        from .data import check_corpus

        check_corpus(cfg.recover.finetune.corpus, "calibration")
    if cfg.eval.lm_eval_tasks or cfg.eval.zeroshot:  # both are scored by lm-evaluation-harness
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("eval.zeroshot and eval.lm_eval_tasks are scored by lm-evaluation-harness, which is not "
                              "installed: pip install 'lm-eval>=0.4.13' (or --no-zeroshot)")
    if cfg.eval.zeroshot:
        from .zeroshot import TASKS

        unknown = [t for t in cfg.eval.zeroshot if t not in TASKS]
        if unknown:
            raise ConfigError(f"eval.zeroshot: unknown task {unknown[0]!r}; known: {', '.join(TASKS)}")
    check_corpus_sizes(cfg, tokenizer)


def _local_files(spec: str) -> list[Path]:
    parts = str(spec).split("+") if "+" in str(spec) else [str(spec)]
    return [Path(p).expanduser() for p in parts if p not in ("wiki", "lee", "botchan") and not p.startswith("hf:")
            and Path(p).expanduser().is_file()]


def check_corpus_sizes(cfg: RunConfig, tokenizer=None) -> None:
    """A local text corpus must hold the tokens its splits are asked for, checked with the model's tokenizer
    (a second) before the model loads: an empty or short file otherwise fails after minutes of dense
    evaluation. Built-in corpora have a known size; hub datasets are checked when they are read."""
    import logging

    from .allocation import get_allocation
    from .data import load_corpus, tokenize

    options = cfg.allocation_options()
    method = get_allocation(cfg.prune.allocation)(options)
    seqlen = max(cfg.data.seqlen, getattr(options, "seqlen", None) or 0)  # e.g. the Fisher seed's own windows
    needs = [(cfg.data.calibration, "calibration", seqlen + 1, "calibration windows of data.seqlen tokens")]
    if method.needs_validation:
        s = cfg.search
        needs.append((cfg.data.validation, "validation", s.fitness_windows * s.fitness_seqlen,
                      f"search.fitness_windows x search.fitness_seqlen = {s.fitness_windows} x {s.fitness_seqlen}"))
    if cfg.eval.perplexity:
        needs.append((cfg.data.evaluation, "test", cfg.data.seqlen, "one evaluation window of data.seqlen tokens"))
    needs = [n for n in needs if _local_files(n[0])]
    if not needs:
        return
    for path in {f for spec, *_ in needs for f in _local_files(spec)}:
        if path.stat().st_size == 0:
            raise ConfigError(f"corpus file {path} is empty; give a UTF-8 text file with real text")
    if tokenizer is None:
        from .loading import load_tokenizer, looks_like_hub_id

        if cfg.model.name != "embedded" and not Path(cfg.model.name).expanduser().exists() and looks_like_hub_id(cfg.model.name):
            return  # a hub model's tokenizer needs the network: the loader reports that first
        try:
            tokenizer = load_tokenizer(cfg.model.name)
        except MixsparseError:
            return  # no tokenizer here (e.g. `recover` of a run whose original model moved): later stages report

    for spec, split, need, what in needs:
        text = load_corpus(spec, split)
        # tokenize a prefix first: a long file need not be encoded whole to know it is long enough
        head = text[: need * 16]
        have = tokenize(tokenizer, head).numel()
        if have < need and len(head) < len(text):
            have = tokenize(tokenizer, text).numel()
        if have < need:
            raise ConfigError(f"corpus {spec!r} has {have} tokens in its {split} split, but {need} are needed "
                              f"({what}); give a longer text file or lower those settings")
        if split == "test" and cfg.data.eval_tokens and have < cfg.data.eval_tokens and len(head) == len(text):
            logging.getLogger(__name__).warning("corpus %r: its test split has %d tokens, fewer than data.eval_tokens "
                                                "(%d); perplexity uses what there is", spec, have, cfg.data.eval_tokens)


def check_model_spec(name: str) -> None:
    """A local model path must exist (a hub id ``org/name`` is left to the loader)."""
    from .loading import looks_like_hub_id

    if name == "embedded":
        return
    p = Path(name).expanduser()
    if not p.exists() and not looks_like_hub_id(name):
        raise ConfigError(f"model {name!r}: no such directory (and not a hub id org/name); use --model embedded or "
                          "the path of a Hugging Face model directory")


def run_status(out: Path) -> str | None:
    """``status`` of the run recorded in ``out/run.json`` (None when there is none)."""
    from .io import read_json
    from .record import RUN_FILE

    try:
        rec = read_json(out / RUN_FILE)
    except ConfigError:  # unreadable: not a run this directory holds
        return None
    if not isinstance(rec, dict):
        return None
    if "status" in rec:
        return str(rec["status"])
    return STATUS_FINISHED if rec.get("artifacts") is not None else "unfinished"  # records older than status


def _check_nearest_dir(path: Path, flag: str, fix: str) -> None:
    """The nearest existing one of ``path`` and its parents must be a writable directory."""
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "is a file" if parent == path else f"lies under a file ({parent})"
                raise ConfigError(f"{flag} {path} {what}; {fix}")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{flag} {path}: {parent} is not writable; {fix}")
            return


def check_run_dir(out: str | os.PathLike, *, overwrite: bool = False, command: str | None = None) -> Path:
    """A writable directory for a run. A directory that holds a finished run is refused unless
    ``overwrite``; an unfinished one is resumed (the search state and sensitivity cache are reused)."""
    out = Path(out).expanduser()
    _check_nearest_dir(out, "--out", "choose a directory path")
    status = run_status(out)
    if status == STATUS_FINISHED and not overwrite:
        raise ConfigError(f"--out {out} holds a finished run (run.json); choose a new directory, or pass --overwrite "
                          "to replace it")
    out.mkdir(parents=True, exist_ok=True)
    try:  # the access bits can say yes on a read-only file system
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ConfigError(f"--out {out} is not writable ({e.strerror}); choose another directory") from None
    return out


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """A file path that can be written (not a directory, not under a file)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{flag} {p} is a directory; give a file path such as {p / 'result.json'}")
    _check_nearest_dir(p.parent, flag, "choose another path")
    return p

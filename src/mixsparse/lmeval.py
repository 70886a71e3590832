"""Run lm-evaluation-harness tasks on an in-memory (pruned) model.

The model object itself is handed to lm-eval's ``HFLM`` wrapper, so a freshly pruned model is
evaluated as it is: nothing is saved and re-loaded, and no fork of lm-eval is needed. lm-eval is a
dependency of mixsparse, imported only when used (its import takes a few seconds). The offline
zero-shot tasks of :mod:`mixsparse.zeroshot` are local tasks scored through :func:`run_lm_eval` too.

Real lm-eval tasks (PIQA, HellaSwag, ARC, ...) download their data from the Hugging Face hub, so they
need a machine with internet access; local tasks given through ``include_path`` work offline.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import numbers
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, MixsparseError, UnknownNameError
from .placement import Placement

log = logging.getLogger(__name__)


class LmEvalUnavailableError(MixsparseError):
    """lm-evaluation-harness is not installed."""


def _import_lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise LmEvalUnavailableError(
            f"lm-evaluation-harness is not installed ({exc}); mixsparse needs it: pip install 'lm-eval>=0.4.13'"
        ) from exc
    return lm_eval, HFLM, TaskManager


def _check_args(tasks: Sequence[str], num_fewshot: int | None, limit: int | float | None, batch_size: int,
                include_path: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise ConfigError(f"num_fewshot must be an integer >= 0 (or None for each task's default), got {num_fewshot!r}")
    if limit is not None:
        # lm-eval reads an int as a count of documents and a float in (0, 1) as a fraction of them.
        ok = (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1) or (
            isinstance(limit, float) and 0 < limit <= 1
        )
        if not ok:
            raise ConfigError(f"limit must be an integer >= 1 or a fraction in (0, 1], got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if include_path is not None:
        paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
        for p in paths:
            if not Path(p).exists():
                raise ConfigError(f"lm-eval include_path does not exist: {p}")
    return tasks


@contextlib.contextmanager
def _caller_rng_kept() -> Iterator[None]:
    """lm-eval reseeds Python's, NumPy's and torch's global generators; an evaluation in the middle of a
    run must not change the random streams of whatever comes after it."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _flatten_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` -> ``{"acc": 0.5, "acc_stderr": 0.1}``.

    lm-eval keys metrics as ``"<metric>,<filter>"``; the ``none`` filter is dropped from the name, other
    filters are kept (``"exact_match,strict-match"``). Non-numeric entries (alias, "N/A") are left out.
    """
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        name, _, filt = key.partition(",")
        out[name if filt in ("", "none") else key] = float(value)
    return out


@contextlib.contextmanager
def model_on_device(model: nn.Module, device: "str | torch.device | Placement | None") -> Iterator[torch.device | None]:
    """Run a block with the model on ``device`` (default: where it already is), in eval mode.

    Follows the run's :class:`~mixsparse.placement.Placement`: ``whole`` moves the model there and back
    home afterwards; ``blockwise`` (a model larger than the device) yields ``None`` and leaves the model
    where it is, for callers that then run it block by block. The train/eval mode is restored too.
    """
    placement = Placement.resolve(device, "whole" if not isinstance(device, Placement) else device.mode, model)
    was_training = model.training
    model.eval()
    try:
        if placement.mode == "blockwise":
            with Placement.stage(model):
                yield None
        else:
            with placement.whole(model) as dev:
                yield dev
    finally:
        model.train(was_training)


def _layerwise_hflm(HFLM: type) -> type:
    """``HFLM`` whose forward runs the model block by block on a :class:`Placement`'s device: lm-eval's
    batching, tokenization and metrics stay its own, and a model larger than the device is still scored
    there (the model stays at home; each call moves one block at a time). Generation tasks fall back to
    lm-eval's whole-model ``generate`` where the model is."""

    class LayerwiseHFLM(HFLM):
        def __init__(self, *args, placement: Placement, **kwargs):
            super().__init__(*args, **kwargs)
            self._placement = placement

        def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
            from .runner import LayerwiseRunner

            if attn_mask is not None or labels is not None:  # encoder-decoder models: not layer-wise here
                return super()._model_call(inps, attn_mask, labels)
            runner = LayerwiseRunner(self.model, device=self._placement)
            ((_, logits),) = list(runner.forward_all([inps]))
            return logits.to(inps.device)  # lm-eval compares with tokens where the model lives

    return LayerwiseHFLM


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """lm-eval and datasets draw their own progress bars and log warnings on every call (an in-memory model,
    num_fewshot overridden); with ``progress`` off they are kept off the terminal, like ours."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _without_run_metadata(lm_eval: Any) -> Iterator[None]:
    """``simple_evaluate`` also stores the git hash of the working directory (its ``git describe`` prints
    "fatal: not a git repository" on the terminal outside a repository) and the environment (torch's
    ``collect_env``: ``pip list``, ``nvidia-smi``); the results kept here use neither, so both are skipped
    for the call and restored after it."""
    from unittest import mock

    evaluator = getattr(lm_eval, "evaluator", None)
    skip = {"get_git_commit_hash": lambda: None, "add_env_info": lambda storage: None}
    with contextlib.ExitStack() as stack:
        for name, stub in skip.items():
            if hasattr(evaluator, name):  # other lm-eval versions may not have them: nothing to skip then
                stack.enter_context(mock.patch.object(evaluator, name, stub))
        yield


def run_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = 0,
    limit: int | float | None = None,
    batch_size: int = 1,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    device: "str | torch.device | Placement | None" = None,
    include_defaults: bool = True,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Evaluate the in-memory ``model`` on lm-eval ``tasks``; returns ``{task: {metric: value}}``.

    ``limit`` caps the documents per task (an int, or a fraction in (0, 1]); each task's dict also holds
    ``n_samples``, the number of documents actually scored. ``include_path`` adds a folder (or folders)
    of task YAMLs; ``include_defaults=False`` skips indexing lm-eval's ~15k built-in tasks (~5 s) when
    only such local tasks are wanted. ``device`` moves the model there for the run (and back after); a
``blockwise`` :class:`Placement` leaves it at home and runs its forwards block by block on the device.
    The global random generators lm-eval reseeds are restored afterwards.
    """
    tasks = _check_args(tasks, num_fewshot, limit, batch_size, include_path)
    lm_eval, HFLM, TaskManager = _import_lm_eval()

    if include_path is not None and not isinstance(include_path, (str, os.PathLike)):
        include_path = [str(p) for p in include_path]
    elif include_path is not None:
        include_path = str(include_path)
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" (include_path={include_path})" if include_path is not None else ""
        raise UnknownNameError(f"unknown lm-eval task {unknown[0]!r}{where}")

    with (model_on_device(model, device) as dev, _caller_rng_kept(), _quiet(not progress),
          _without_run_metadata(lm_eval)):
        # HFLM sets a pad token on the tokenizer it gets; a copy keeps the caller's tokenizer unchanged.
        tok = copy.deepcopy(tokenizer)
        if dev is None:  # blockwise placement: the model stays home, forwards run block by block on the device
            lm = _layerwise_hflm(HFLM)(pretrained=model, tokenizer=tok, batch_size=batch_size, placement=device)
        else:
            lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=str(dev))
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            task_manager=manager,
            log_samples=False,
        )
    if not out or "results" not in out:
        raise MixsparseError("lm-eval returned no results")
    counts = out.get("n-samples", {})
    results = {}
    for task, metrics in out["results"].items():
        results[task] = _flatten_metrics(metrics)
        if task in counts and "effective" in counts[task]:
            results[task]["n_samples"] = int(counts[task]["effective"])
    return results

"""The run record (``run.json``): one typed shape shared by its writer (the pipeline) and every reader
(the report, the CLI summary, ``mixsparse recover``, the benchmarks).

Sections whose fields every reader relies on are dataclasses (model, placement, windows, allocation,
pruning, perplexity, peak memory); a stage's own payload (search, recovery, quantization, sizes,
zero-shot, lm-eval, timings, artifacts) is a dict whose numeric fields are still type-checked on
reading. :meth:`RunRecord.to_dict` / :meth:`RunRecord.from_dict` round-trip exactly, and ``schema``
versions the layout: a record written by a newer mixsparse is refused with a clear message instead of
being misread. Every section but ``config`` is optional (``null`` = absent). Imports no torch.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# 2: ``config.allocation`` holds one section per method (1: one flat section; read back through
# mixsparse.config.migrate_legacy_config)
SCHEMA = 2
RUN_FILE = "run.json"
_NUM = (int, float)


@dataclass
class ModelInfo:
    name: str | None = None
    num_params: int | None = None
    prunable_params: int | None = None
    blocks: int | None = None


@dataclass
class PlacementInfo:
    device: str | None = None
    mode: str | None = None  # "whole" or "blockwise"
    dtype: str | None = None  # the model's (storage) dtype
    compute_dtype: str | None = None  # what placed blocks compute in (float32 for a bf16 model on an AVX2 CPU)
    whole_upcast: bool | None = None  # whole-model stages upcast too (None: no upcast at all; False: did not fit)
    streamed: bool | None = None  # decoder blocks read from the checkpoint one at a time (model.stream)


@dataclass
class WindowsInfo:
    bos: str | None = None
    prefix_ids: list = field(default_factory=list)


@dataclass
class AllocationInfo:
    method: str | None = None
    target: float | str | None = None  # a float, an "N:M" pattern, or an allocation file's average
    average_requested: float | None = None
    per_layer: dict = field(default_factory=dict)  # layer -> float | "N:M", requested, in forward order
    sensitivity: dict | None = None  # layer -> score
    sensitivity_kind: str | None = None


@dataclass
class PruningInfo:
    pruner: str | None = None
    achieved: dict = field(default_factory=dict)  # layer -> measured share of zeros
    overall_sparsity: float | None = None
    seconds: float | None = None
    # layers pruned without their statistics: {layer: {tokens, min_tokens, fallback}} (rarely routed experts)
    fallbacks: dict = field(default_factory=dict)

    def fallback_warning(self) -> str | None:
        """One line naming the layers pruned by magnitude for lack of calibration tokens, or None."""
        if not self.fallbacks:
            return None
        names = list(self.fallbacks)
        least = next(iter(self.fallbacks.values())).get("min_tokens")
        return (f"{len(names)} layer(s) saw fewer than {least} calibration tokens (rarely routed experts) and were "
                f"pruned by magnitude instead of {self.pruner}: {', '.join(names[:3])}"
                f"{f' and {len(names) - 3} more' if len(names) > 3 else ''}; more calibration data routes more tokens "
                "to them (prune.min_token_share sets the threshold)")


@dataclass
class Perplexity:
    split: str | None = None
    tokens: int | None = None
    seqlen: int | None = None
    dense: float | None = None
    pruned: float | None = None
    recovered: float | None = None
    quantized: float | None = None


@dataclass
class PeakMemory:
    cpu_rss_mb: float | None = None
    device_mb: float | None = None
    after_stage_mb: dict = field(default_factory=dict)  # stage -> process peak RSS when it ended


@dataclass
class RunRecord:
    config: dict  # the full config of the run (RunConfig.to_dict())
    command: str | None = None
    version: str | None = None
    created: str | None = None
    status: str | None = None  # running, finished, failed, interrupted
    error: str | None = None
    recovered_from: str | None = None  # `mixsparse recover`: the source run directory
    model: ModelInfo | None = None
    placement: PlacementInfo | None = None
    windows: WindowsInfo | None = None
    allocation: AllocationInfo | None = None
    search: dict | None = None
    pruning: PruningInfo | None = None
    perplexity: Perplexity | None = None
    recovery: dict | None = None
    quantization: dict | None = None
    zeroshot: dict | None = None  # task -> {"accuracy", "stderr", "n"}
    lm_eval: dict | None = None  # task -> {metric: value}
    timings: dict | None = None  # stage -> seconds (a "total" entry wins over the sum)
    peak_memory: PeakMemory | None = None
    sizes: dict | None = None
    coverage: dict | None = None  # modeling.coverage: prunable share, zeros by module kind, unprunable tensors
    artifacts: dict | None = None
    schema: int = SCHEMA

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = RUN_FILE) -> "RunRecord":
        """Build and shape-check a record; the error names the file and the field (``perplexity.dense``)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must hold a JSON object, got {type(data).__name__}")
        if data.get("config") is None:
            raise ConfigError(f"{where} has no 'config' section; it is required (the full config of the run)")
        schema = data.get("schema", 1)  # records before the schema key are version 1
        if not isinstance(schema, int) or isinstance(schema, bool) or schema > SCHEMA:
            raise ConfigError(f"{where} has record schema {schema!r}; this mixsparse reads schema {SCHEMA} and older "
                              "(upgrade mixsparse to read it)")
        return _build(cls, {**data, "schema": schema}, where, "")

    def run_config(self) -> dict:
        """The run's config in today's layout (older records are migrated), ready for ``from_dict``."""
        from .config import migrate_legacy_config

        return migrate_legacy_config(self.config) if self.schema < 2 else dict(self.config)

    def save(self, path: str | os.PathLike) -> Path:
        from .io import atomic_write_json

        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "RunRecord":
        """``run_dir/run.json``, checked."""
        path = Path(run_dir) / RUN_FILE
        if not path.is_file():
            raise ConfigError(f"no {RUN_FILE} in run directory {str(run_dir)!r}")
        from .io import read_json

        return cls.from_dict(read_json(path), repr(str(path)))


# numeric fields inside the free-form sections that readers compute with: section -> field ("*" = every value)
_PAYLOAD_NUMBERS: dict[str, tuple[str, ...]] = {
    "search": ("seconds",), "recovery": ("seconds",), "timings": ("*",),
    "sizes": ("dense_bytes", "compressed_bytes", "ratio", "prunable_ratio", "bits_per_weight"),
}
_PAYLOAD_LISTS: dict[str, tuple[str, ...]] = {"search": ("history",), "recovery": ("blocks", "loss", "val_ppl", "stages")}
_PAYLOAD_DICTS = ("zeroshot", "lm_eval")  # every value is a per-task dict


try:  # "X | None" annotations are types.UnionType at runtime
    from types import UnionType as _UnionType
except ImportError:  # pragma: no cover - Python 3.9
    _UnionType = typing.Union  # type: ignore[misc,assignment]


def _options(tp: Any) -> list:
    if typing.get_origin(tp) in (typing.Union, _UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def _check(value: Any, tp: Any, where: str, path: str) -> Any:
    """``value`` against annotation ``tp``; an int stands for a float, a bool is no number."""
    if value is None:
        return None
    options = _options(tp)
    for a in options:
        if dataclasses.is_dataclass(a):
            return _build(a, value, where, path)
        if a in (int, float):
            if isinstance(value, _NUM) and not isinstance(value, bool) and (
                    a is float or isinstance(value, int) or float(value).is_integer()):
                return value
        elif isinstance(value, a):
            return value
    if "." not in path:
        raise ConfigError(f"{where}: section {path!r} must be a {options[0].__name__}, got {type(value).__name__}")
    want = " or ".join("a number" if a in (int, float) else f"a {a.__name__}" for a in options)
    raise ConfigError(f"{where}: {path} must be {want}, got {value!r}")


def _build(cls: type, data: Any, where: str, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: section {path!r} must be a dict, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(f'{path}.{k}' if path else k for k in unknown)} "
                          f"(schema {SCHEMA})")
    kwargs = {}
    for k, v in data.items():
        sub = f"{path}.{k}" if path else k
        tp = hints[k]
        kwargs[k] = _check(v, tp, where, sub)
        if not path and isinstance(v, dict):
            _check_payload(k, v, where)
    if cls is PruningInfo:
        for name, value in (kwargs.get("achieved") or {}).items():
            if not isinstance(value, _NUM) or isinstance(value, bool):
                raise ConfigError(f"{where}: pruning.achieved.{name} must be a number, got {value!r}")
    return cls(**kwargs)


def _check_payload(section: str, value: dict, where: str) -> None:
    for name in _PAYLOAD_NUMBERS.get(section, ()):
        items = value.items() if name == "*" else [(name, value.get(name))]
        for key, v in items:
            if v is not None and (not isinstance(v, _NUM) or isinstance(v, bool)):
                raise ConfigError(f"{where}: {section}.{key} must be a number, got {v!r}")
    for name in _PAYLOAD_LISTS.get(section, ()):
        if value.get(name) is not None and not isinstance(value[name], list):
            raise ConfigError(f"{where}: {section}.{name} must be a list, got {value[name]!r}")
    if section in _PAYLOAD_DICTS:
        for key, v in value.items():
            if v is not None and not isinstance(v, dict):
                raise ConfigError(f"{where}: {section}.{key} must be a dict, got {v!r}")
    if section == "recovery":  # a chained mode: each stage is a recovery record of its own
        for i, stage in enumerate(value.get("stages") or []):
            if not isinstance(stage, dict):
                raise ConfigError(f"{where}: recovery.stages[{i}] must be an object, got {stage!r}")
            _check_payload("recovery", stage, f"{where}: recovery.stages[{i}]")
    if section == "search":
        for i, h in enumerate(value.get("history") or []):
            if not isinstance(h, dict) or not isinstance(h.get("best_fitness"), _NUM + (str, type(None))):
                raise ConfigError(f"{where}: search.history[{i}] must be an object with a numeric best_fitness")

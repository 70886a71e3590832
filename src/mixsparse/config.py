"""Typed run configuration. YAML keys equal dataclass field names; unknown keys are refused with
their full path (``search.generatons``), so a typo never silently falls back to a default."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .allocation import available_allocations, get_allocation
from .errors import ConfigError
from .io import yaml_load
from .quant import QuantizeSection
from .recovery import MODES as RECOVER_MODES, BlockwiseOptions, FinetuneOptions
from .search.options import SearchSection
from .sparsity import NM, parse_layer_sparsity

if TYPE_CHECKING:  # annotations only: the config imports no torch
    import torch


@dataclass
class ModelConfig:
    name: str = "embedded"  # "embedded", a local HF directory, or a hub id (needs internet)
    dtype: str = "float32"
    device: str = "auto"  # "auto": cuda if available, else cpu
    # "whole": stages move the whole model to the device; "blockwise": one decoder block at a time (models
    # larger than the device); "auto": whole when the model fits in the device's free memory
    placement: str = "auto"
    # dtype placed blocks compute in: "auto" upcasts a bf16/fp16 model to float32 where the device only emulates
    # its dtype (CPUs without AVX512-BF16/AMX: ~10x faster), "model" never, "float32" always; stored in the
    # model's dtype either way
    compute_dtype: str = "auto"
    # "always": decoder blocks stay on the safetensors checkpoint and are read one at a time (models larger than RAM,
    # see mixsparse.streaming); "auto": when the model would not fit in 80% of the free RAM; "never"
    stream: str = "auto"

    def __post_init__(self) -> None:
        if self.stream not in ("auto", "always", "never"):
            raise ConfigError(f"model.stream must be auto, always or never, got {self.stream!r}")
        if self.placement not in ("auto", "whole", "blockwise"):
            raise ConfigError(f"model.placement must be auto, whole or blockwise, got {self.placement!r}")
        if self.compute_dtype not in ("auto", "model", "float32"):
            raise ConfigError(f"model.compute_dtype must be auto, model or float32, got {self.compute_dtype!r}")
    allow_pickle: bool = False  # load pytorch_model.bin checkpoints (can execute code)


@dataclass
class DataConfig:
    calibration: str = "wiki"  # "wiki", "lee", "wiki+lee", a .txt path, or "hf:NAME[:CONFIG]"
    calibration_samples: int = 32
    seqlen: int = 512
    seed: int = 0
    validation: str = "wiki"  # held-out tokens for search fitness (never the test split)
    evaluation: str = "wiki"  # test split for perplexity
    eval_tokens: int = 20480  # 0 = the whole test split
    batch_size: int = 1
    # what windows start with: "auto" follows the tokenizer (its BOS if it adds one, e.g. Llama-2, Gemma;
    # nothing for SmolLM2), "always" the BOS token, "never" nothing
    bos: str = "auto"

    def __post_init__(self) -> None:
        for k in ("calibration_samples", "seqlen", "batch_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"data.{k} must be >= 1, got {getattr(self, k)}")
        if self.seqlen < 2:
            raise ConfigError("data.seqlen must be >= 2")
        if self.eval_tokens < 0:
            raise ConfigError(f"data.eval_tokens must be >= 0, got {self.eval_tokens}")
        if self.bos not in ("auto", "always", "never"):
            raise ConfigError(f"data.bos must be auto, always or never, got {self.bos!r}")


@dataclass
class PruneSection:
    pruner: str = "wanda"
    options: dict = field(default_factory=dict)  # pruner options, e.g. {blocksize: 128, percdamp: 0.01}
    sparsity: Any = None  # global target: a float in [0, 1) or an "N:M" pattern (0.5 when not given)
    allocation: str = "uniform"
    allocation_file: str | None = None  # YAML map from `mixsparse search` (allocation: file)
    sequential: bool = True  # calibrate each block on the outputs of the pruned blocks before it
    offload: bool = True  # keep activations on the CPU between blocks
    # a layer that saw fewer than this share of the calibration tokens (a MoE expert the router rarely picks)
    # is pruned by magnitude and quantized by RTN instead (GPTQModel's rule: 0.5%); recorded in run.json
    min_token_share: float = 0.005

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_token_share < 1.0:
            raise ConfigError(f"prune.min_token_share must be in [0, 1), got {self.min_token_share}")
        # whether the user gave a target: an allocation file then has to agree with it
        self.sparsity_given = self.sparsity is not None
        self.sparsity = parse_layer_sparsity(0.5 if self.sparsity is None else self.sparsity, "prune.sparsity")
        if self.allocation not in available_allocations():
            raise ConfigError(f"prune.allocation must be one of {', '.join(available_allocations())}, got {self.allocation!r}")
        if self.allocation == "file" and not self.allocation_file:
            raise ConfigError("prune.allocation 'file' needs prune.allocation_file (a YAML map from `mixsparse search`)")
        if self.allocation_file and self.allocation not in ("file", "uniform"):  # uniform is the default
            raise ConfigError(f"prune.allocation_file is given but prune.allocation is {self.allocation!r}; use the file "
                              f"(--allocation-file alone) or the method (--allocation {self.allocation} without a file)")
        if self.allocation_file:
            self.allocation = "file"
        if isinstance(self.sparsity, NM) and not get_allocation(self.allocation).assigns_patterns:
            able = [m for m in available_allocations() if get_allocation(m).assigns_patterns and m != "file"]
            raise ConfigError(f"allocation {self.allocation!r} assigns unstructured sparsities; with an N:M target use "
                              f"one of {', '.join(able)}")


@dataclass
class RecoverSection:
    """Recovery after pruning, mask fixed: "blockwise" reconstruction (one block on the device at a time),
    "finetune" (end-to-end, the whole model on the device), "lora" (peft adapters, masked merge), "none", or
    block-wise followed by a whole-model pass ("blockwise+finetune", "blockwise+lora")."""

    mode: str = "none"
    blockwise: BlockwiseOptions = field(default_factory=BlockwiseOptions)
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)  # also the settings of "lora"

    def __post_init__(self) -> None:
        if self.mode not in RECOVER_MODES:
            raise ConfigError(f"recover.mode must be one of {', '.join(RECOVER_MODES)}, got {self.mode!r}")


@dataclass
class EvalConfig:
    perplexity: bool = True
    dense_baseline: bool = True  # also measure the dense model's perplexity
    zeroshot: list = field(default_factory=lambda: ["sentiment", "cloze"])
    zeroshot_n: int | None = None  # examples per task (task defaults when None)
    lm_eval_tasks: list = field(default_factory=list)  # lm-evaluation-harness tasks (needs internet + lm-eval)

    def __post_init__(self) -> None:
        if self.zeroshot_n is not None and self.zeroshot_n < 1:
            raise ConfigError(f"eval.zeroshot_n must be >= 1 (or null for the task defaults), got {self.zeroshot_n}")


@dataclass
class ExportConfig:
    checkpoint: bool = True  # HF safetensors with zeros (from_pretrained loads it)
    compressed: bool = True  # bitmask / N:M packed checkpoint
    # dtype of the compressed checkpoint's floating tensors. "auto": a bf16/fp16 model keeps its own (casting
    # bf16 to fp16 flushes tiny weights to new zeros and clips large ones); a float32 model is stored in float16
    dtype: str = "auto"
    # a quantized run also writes model-quantized/: the compressed-tensors format from_pretrained reads
    # (needs the "quant" extra: pip install 'mixsparse[quant]')
    quantized_hf: bool = True
    report: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise ConfigError(f"export.dtype must be auto, float16, bfloat16 or float32, got {self.dtype!r}")

    def compressed_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        import torch

        if self.dtype == "auto":
            return model_dtype if model_dtype in (torch.bfloat16, torch.float16) else torch.float16
        return getattr(torch, self.dtype)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneSection = field(default_factory=PruneSection)
    # every registered method's options, by method name (allocation.owl.lam, allocation.msp.samples, ...)
    allocation: dict | None = field(default_factory=dict)
    search: SearchSection = field(default_factory=SearchSection)
    recover: RecoverSection = field(default_factory=RecoverSection)
    quantize: QuantizeSection = field(default_factory=QuantizeSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        self.allocation = _allocation_options(self.allocation)
        q = self.quantize
        if q.method == "joint":
            if self.prune.pruner != "sparsegpt":
                raise ConfigError(f"quantize.method joint prunes and quantizes in SparseGPT's sweep; it needs "
                                  f"--pruner sparsegpt (got {self.prune.pruner!r}); with other pruners use gptq or rtn")
            if self.prune.allocation == "msp" and self.search.final == "stitched":
                raise ConfigError("quantize.method joint needs the engine to prune the final model, but MSP stitches it "
                                  "from the search's levels (search.final: stitched); use quantize.method gptq, or "
                                  "search.final: sequential")
            if self.prune.allocation == "joint" and self.search.bits_per_weight is None:
                raise ConfigError("allocation joint needs search.bits_per_weight, the budget of the prunable layers "
                                  "(e.g. 3.25: the bytes of 50% sparse + 4-bit, or of dense 3-bit, with group-64 scales)")
            if self.recover.mode != "none":
                raise ConfigError("quantize.method joint quantizes while pruning, and recovery would then train the "
                                  "weights off the grid; use quantize.method gptq (it runs after recovery)")
        elif self.prune.allocation == "joint":
            raise ConfigError("allocation joint searches each layer's sparsity and bit width together; set "
                              "quantize.method: joint (with --pruner sparsegpt; search.bits lists the bit widths, "
                              "quantize.group_size and quantize.symmetric set the grid)")
        taken = {"bits", "group_size", "symmetric"} & set(self.prune.options)
        if taken:
            raise ConfigError(f"prune.options {', '.join(sorted(taken))}: quantization is set under quantize "
                              "(quantize.method joint for SparseGPT's one-sweep mode)")

    def allocation_options(self, method: str | None = None):
        """The typed options of ``method`` (default: the run's ``prune.allocation``)."""
        return self.allocation[method or self.prune.allocation]

    def pruner_options(self) -> dict:
        """``prune.options``, plus the grid of a joint SparseGPT quantization."""
        q = self.quantize
        if q.method != "joint":
            return dict(self.prune.options)
        return {**self.prune.options, "bits": q.bits, "group_size": q.group_size, "symmetric": q.symmetric}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["prune"]["sparsity"] = str(self.prune.sparsity) if not isinstance(self.prune.sparsity, float) else self.prune.sparsity
        if not self.prune.sparsity_given:  # so that config.yaml reloads as "not given" (an allocation file decides)
            d["prune"]["sparsity"] = None
        return d


# the flat allocation section of records written before methods had their own options (run.json schema 1):
# old key -> the fields it set, "<method>.<field>"
LEGACY_ALLOCATION_KEYS = {
    "sensitivity_samples": ("fisher.samples", "msp.samples"),
    "sensitivity_seqlen": ("fisher.seqlen", "msp.seqlen", "hessian.seqlen"),
    "fisher_mode": ("fisher.mode", "msp.mode"), "fisher_alpha": ("fisher.alpha", "msp.alpha"),
    "fisher_normalize": ("fisher.normalize", "msp.normalize"), "alpha": ("hessian.alpha",),
    "hessian_probes": ("hessian.probes",), "hessian_samples": ("hessian.samples",),
    "per_block": ("hessian.per_block",), "owl_m": ("owl.m",), "owl_lambda": ("owl.lam",),
    **{k: tuple(f"{m}.{k}" for m in ("fisher", "msp", "hessian", "owl")) for k in ("min_sparsity", "max_sparsity")},
}


def migrate_legacy_config(data: dict) -> dict:
    """A config dict as an older mixsparse wrote it (flat ``allocation`` section) in today's layout."""
    alloc = data.get("allocation")
    if not isinstance(alloc, dict) or not any(k in LEGACY_ALLOCATION_KEYS for k in alloc):
        return data
    new: dict = {k: v for k, v in alloc.items() if k not in LEGACY_ALLOCATION_KEYS}
    for key, value in alloc.items():
        for target in LEGACY_ALLOCATION_KEYS.get(key, ()):
            method, field_ = target.split(".")
            new.setdefault(method, {})[field_] = value
    return {**data, "allocation": new}


def _allocation_options(data: Any) -> dict:
    """``allocation.<method>`` sections typed by each registered method's ``Options`` (defaults for the rest)."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"allocation: expected a mapping of method -> options, got {data!r}")
    for key in data:
        if key in LEGACY_ALLOCATION_KEYS:
            raise ConfigError(f"allocation.{key}: allocation settings are per method now; use "
                              + " and ".join(f"allocation.{t}" for t in LEGACY_ALLOCATION_KEYS[key]))
        if key not in available_allocations():
            raise ConfigError(f"unknown config key(s): allocation.{key}; valid keys under allocation (one per "
                              f"method): {', '.join(available_allocations())}")
    out = {}
    for name in available_allocations():
        cls = get_allocation(name).Options
        given = data.get(name)
        out[name] = given if isinstance(given, cls) else from_dict(cls, given, f"allocation.{name}")
    return out


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Light type check: YAML gives ints for floats, lists for tuples; anything else is an error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or value is None and (type(None) in args):
        return value
    if origin is typing.Union or (origin is not None and type(None) in args):
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: {value!r} has the wrong type (expected {tp})")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool, float):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
        return value
    if tp in (list, dict) or origin in (list, dict):
        base = origin or tp
        if not isinstance(value, base):
            raise ConfigError(f"{path}: expected a {base.__name__}, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from nested dicts, refusing unknown keys by their dotted path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown config key(s): {', '.join(where + str(k) for k in unknown)}; "
            f"valid keys{' under ' + path if path else ''}: {', '.join(fields)}"
        )
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        sub = f"{path}.{k}" if path else k
        if dataclasses.is_dataclass(tp):
            kwargs[k] = from_dict(tp, v, sub)
        else:
            kwargs[k] = _coerce(v, tp, sub)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # a section's own check may not name it (an allocation method's options do not know their method)
        if path and path not in str(e):
            raise type(e)(f"{path}: {e}") from None
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Read a YAML run config (missing sections take defaults) and apply dotted overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    return from_dict(RunConfig, apply_overrides(data, overrides))


def apply_overrides(data: dict, overrides: dict | None) -> dict:
    """``data`` (nested dicts, changed in place) with dotted ``section.key`` overrides set."""
    for dotted, value in (overrides or {}).items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {dotted}: {part} is not a section")
        node[parts[-1]] = value
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``key.path=value`` with the value parsed as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value

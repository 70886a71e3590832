"""One options dataclass per recovery method (YAML keys under ``recover.blockwise`` / ``recover.finetune``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

MODES = ("none", "blockwise", "finetune", "lora", "blockwise+finetune", "blockwise+lora")


def stages_of(mode: str) -> tuple[str, ...]:
    """The recovery methods ``mode`` runs, in order ("blockwise+lora": block-wise reconstruction, then a LoRA pass
    over the whole model, which can fix what no single block's target shows: the error at the logits)."""
    return () if mode == "none" else tuple(mode.split("+"))


def stage_records(record: dict) -> list[dict]:
    """The per-method records of a recovery record: its ``stages`` for a chained mode, else the record itself."""
    return record.get("stages") or [record]


def trains_whole(mode: str) -> bool:
    """Whether ``mode`` trains the whole model at once (it must then fit on the device, and cannot stream)."""
    return any(s in ("finetune", "lora") for s in stages_of(mode))


def _positive(section: str, **values) -> None:
    for k, v in values.items():
        if v is not None and v <= 0:
            raise ConfigError(f"recover.{section}.{k} must be > 0, got {v}")


@dataclass
class BlockwiseOptions:
    """Tune each pruned block's kept weights so its output matches the dense block's (mean squared error
    on the hidden states, as EBFT does: the block's output is all the next block sees)."""

    # measured on the embedded model at 70% (benchmarks/results/recovery.md): lr 3e-3 beats 1e-3 and 1e-2, and
    # 4 epochs beat 2 (uniform Wanda 871 -> 101 test perplexity in 2.4 min on 2 cores)
    epochs: int = 4  # passes over the calibration windows, per block
    lr: float = 3e-3  # Adam
    batch_size: int = 2  # windows per optimiser step
    samples: int | None = None  # calibration windows (default: data.calibration_samples)
    # what the pruned block is given: "recovered" (the outputs of the blocks already recovered, so it also
    # learns to undo what the blocks before it could not) or "dense" (the dense model's own activations)
    inputs: str = "recovered"
    params: str = "linears"  # "linears" (the kept weights and biases) or "linears+norms"
    dtype: str = "auto"  # autocast dtype: "auto" = bfloat16 where native (AMX CPUs, GPUs), else float32
    # "constant" lr, or "cosine": decays to 0 over each block's steps, so the last epochs refine instead of
    # jumping around the minimum (Adam at a constant lr keeps a noise floor)
    schedule: str = "constant"

    def __post_init__(self) -> None:
        _positive("blockwise", epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, samples=self.samples)
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"recover.blockwise.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.inputs not in ("recovered", "dense"):
            raise ConfigError(f"recover.blockwise.inputs must be 'recovered' or 'dense', got {self.inputs!r}")
        _check_params("blockwise", self.params)
        _check_dtype("blockwise", self.dtype)


@dataclass
class FinetuneOptions:
    """End-to-end next-token training with the mask enforced (gradients of pruned weights are zeroed and
    the weights re-masked after every step). Also the settings of ``lora`` (peft adapters whose merged
    delta is masked, so merging keeps every zero)."""

    steps: int = 200
    lr: float = 1e-4  # full fine-tuning: peak of a linear warm-up then cosine decay
    lora_lr: float = 1e-3  # the same for LoRA adapters (measured: 60 steps took 70% Wanda from 871 to 119)
    warmup: int = 10
    batch_size: int = 4
    seqlen: int = 256
    corpus: str = "wiki+lee"  # training text (the calibration split): wiki, lee, wiki+lee, a .txt file, hf:NAME
    kl_weight: float = 0.0  # + kl_weight * KL(dense || model) per token (needs the dense snapshot)
    eval_every: int = 50  # validation perplexity every N steps (0 = only at the end)
    val_windows: int = 8  # windows of the validation split (data.validation)
    checkpoint_every: int = 50  # resumable checkpoint every N steps (0 = none)
    gradient_checkpointing: bool = True
    params: str = "linears"  # full fine-tuning: "linears" or "linears+norms"
    weight_decay: float = 0.0
    dtype: str = "auto"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        _positive("finetune", steps=self.steps, lr=self.lr, lora_lr=self.lora_lr, batch_size=self.batch_size, seqlen=self.seqlen,
                  val_windows=self.val_windows, lora_r=self.lora_r, lora_alpha=self.lora_alpha)
        for k in ("warmup", "eval_every", "checkpoint_every"):
            if getattr(self, k) < 0:
                raise ConfigError(f"recover.finetune.{k} must be >= 0, got {getattr(self, k)}")
        if self.kl_weight < 0 or self.weight_decay < 0 or not 0 <= self.lora_dropout < 1:
            raise ConfigError("recover.finetune: kl_weight and weight_decay must be >= 0, lora_dropout in [0, 1)")
        if self.seqlen < 2:
            raise ConfigError("recover.finetune.seqlen must be >= 2")
        _check_params("finetune", self.params)
        _check_dtype("finetune", self.dtype)


def _check_params(section: str, value: str) -> None:
    if value not in ("linears", "linears+norms"):
        raise ConfigError(f"recover.{section}.params must be 'linears' or 'linears+norms', got {value!r}")


def _check_dtype(section: str, value: str) -> None:
    if value not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"recover.{section}.dtype must be auto, float32, bfloat16 or float16, got {value!r}")

"""The ``quantize`` section of a run config."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

METHODS = ("none", "rtn", "gptq", "joint")


@dataclass
class QuantizeSection:
    """``rtn``: round-to-nearest; ``gptq``: OBS quantization with the pruned positions fixed at 0 (after
    pruning and recovery); ``joint``: SparseGPT prunes and quantizes in one sweep (pruner sparsegpt)."""

    method: str = "none"
    bits: int = 4  # 2, 3, 4 or 8
    # input columns per scale; 0 = per output channel. 64, not the usual 128: it divides more widths (SmolLM2's
    # 576 and 1536, Llama's 4096 and 11008), and compressed-tensors needs whole groups
    group_size: int = 64
    symmetric: bool = True
    blocksize: int = 128  # gptq: columns per lazy-update block
    percdamp: float = 0.01  # gptq: Hessian dampening
    calibration_samples: int | None = None  # gptq: windows (default data.calibration_samples)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"quantize.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"quantize.bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.group_size < 0:
            raise ConfigError(f"quantize.group_size must be >= 0 (0 = per channel), got {self.group_size}")
        if self.blocksize < 1 or self.percdamp < 0:
            raise ConfigError("quantize.blocksize must be >= 1 and quantize.percdamp >= 0")
        if self.calibration_samples is not None and self.calibration_samples < 1:
            raise ConfigError(f"quantize.calibration_samples must be >= 1, got {self.calibration_samples}")

"""Where a stage runs: one placement policy for every stage of the pipeline.

The model lives at its *home* (the CPU, or wherever the user put it) between stages. A stage runs
either with the whole model on the device (``whole``) or block by block with one decoder block there at
a time (``blockwise``); ``auto`` chooses ``whole`` when the model fits in the device's free memory.

Every stage enters :meth:`Placement.stage`, which puts the model back at its home on exit, whatever the
stage raised: no stage leaves a model half-placed (embeddings on the GPU, blocks on the CPU), so the next
stage never mixes devices. The search's fitness does not move modules at all: it calls blocks with
device copies of their tensors (``torch.func.functional_call``), see :mod:`mixsparse.search.fitness`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

MODES = ("auto", "whole", "blockwise")


def check_device(name: str | torch.device | None) -> torch.device:
    """The device a config names, checked against this torch build before any work starts."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"model.device: unknown device {name!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device={name}: this torch build has no usable CUDA "
                              f"(torch {torch.__version__}); use model.device=cpu or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"model.device={name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"model.device={name}: MPS is not available in this torch build; use model.device=cpu")
    elif dev.type not in ("cpu", "meta", torch._C._get_privateuse1_backend_name()):  # an out-of-tree backend is fine
        raise ConfigError(f"model.device={name}: unsupported device type {dev.type!r}; use cpu, cuda or mps")
    return dev


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are native here (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    if device.type == "cuda":  # native bf16 from Ampere on; older GPUs only emulate it, slowly
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory on an accelerator (None when unknown, e.g. for the CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # memory torch's caching allocator holds but does not use is free for this process
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return None


def home_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    """``device``: where computation runs. ``mode``: ``whole`` or ``blockwise`` (resolved, never auto).
    ``offload``: keep activations between blocks on the CPU (blockwise stages)."""

    device: torch.device
    mode: str = "blockwise"
    offload: bool = True

    @classmethod
    def resolve(cls, device: "str | torch.device | Placement | None" = None, mode: str = "auto",
                model: nn.Module | None = None, *, offload: bool = True, headroom: float = 0.8) -> "Placement":
        """``auto``: ``whole`` on the CPU (the model is already there) and when the model takes at most
        ``headroom`` of the accelerator's free memory; ``blockwise`` otherwise."""
        if isinstance(device, Placement):
            return device
        if mode not in MODES:
            raise ConfigError(f"model.placement must be one of {', '.join(MODES)}, got {mode!r}")
        dev = torch.device(device) if device is not None else (home_of(model) if model is not None else torch.device("cpu"))
        if mode == "auto":
            if dev.type == "cpu" or model is None:
                mode = "whole"
            else:
                free = free_device_bytes(dev)
                mode = "whole" if free is not None and model_bytes(model) <= headroom * free else "blockwise"
        return cls(dev, mode, offload)

    @property
    def store(self) -> torch.device:
        """Where activations wait between blocks."""
        return torch.device("cpu") if self.offload else self.device

    @staticmethod
    @contextlib.contextmanager
    def stage(model: nn.Module) -> Iterator[torch.device]:
        """Run a stage; on exit (also on error) every parameter and buffer is back at the model's home.
        A model dispatched by accelerate over several devices is gathered on the CPU first (its home from
        then on): sending it back to its first parameter's GPU would put all of it on one device."""
        from .modeling import take_placement

        take_placement(model)
        home = home_of(model)
        try:
            yield home
        finally:
            model.to(home)

    @contextlib.contextmanager
    def whole(self, model: nn.Module) -> Iterator[torch.device]:
        """The whole model on the device for the duration, then back home."""
        with self.stage(model):
            model.to(self.device)
            yield self.device

    @contextlib.contextmanager
    def block(self, block: nn.Module) -> Iterator[nn.Module]:
        """One block on the device for the duration, then back where it was."""
        home = home_of(block)
        block.to(self.device)
        try:
            yield block
        finally:
            block.to(home)


"""Where a stage runs: one placement policy for every stage of the pipeline.

The model lives at its *home* (the CPU, or wherever the user put it) between stages. A stage runs
either with the whole model on the device (``whole``) or block by block with one decoder block there at
a time (``blockwise``); ``auto`` chooses ``whole`` when the model fits in the device's free memory.

Every stage enters :meth:`Placement.stage`, which puts the model back at its home on exit, whatever the
stage raised: no stage leaves a model half-placed (embeddings on the GPU, blocks on the CPU), so the next
stage never mixes devices. The search's fitness does not move modules at all: it calls blocks with
device copies of their tensors (``torch.func.functional_call``), see :mod:`mixsparse.search.fitness`.

The policy also decides the *compute dtype* (``model.compute_dtype``): a bf16 (fp16) model on a device whose
bf16 (fp16) matmuls are emulated (CPUs without AVX512-BF16/AMX, GPUs before Ampere; fp16 on most CPUs) is
~10x slower than in float32 there. Such a model's 16-bit tensors are upcast to float32 while they are placed
(one block at a time, or the whole model when it fits in twice its size) and narrowed back into the model's
own dtype when they leave: bf16 -> float32 -> bf16 is exact for untouched weights, a changed weight is
rounded once, and a weight that was non-zero in float32 never becomes a new zero (it keeps the smallest
subnormal of its sign), so masks survive exactly. Where bf16 is native nothing changes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)

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


def fast_fp16(device: torch.device) -> bool:
    """Whether fp16 matmuls are native here (every CUDA GPU; CPUs with AVX512-FP16/AMX-FP16)."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


HALF = (torch.bfloat16, torch.float16)
COMPUTE_DTYPES = ("auto", "model", "float32")


def compute_dtype(setting: "str | torch.dtype | None", model_dtype: torch.dtype, device: torch.device
                  ) -> torch.dtype | None:
    """The dtype placed tensors compute in, None for the model's own. ``auto``: float32 for a 16-bit model on
    a device that only emulates its dtype; ``model``: never upcast; ``float32``: always upcast 16-bit tensors."""
    if isinstance(setting, torch.dtype):
        return None if setting == model_dtype else setting
    if setting not in (*COMPUTE_DTYPES, None):
        raise ConfigError(f"model.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {setting!r}")
    if setting in (None, "model") or model_dtype not in HALF:
        return None
    if setting == "float32":
        return torch.float32
    native = fast_bf16(device) if model_dtype == torch.bfloat16 else fast_fp16(device)
    return None if native else torch.float32


def available_ram_bytes() -> int | None:
    try:
        import psutil  # a dependency of accelerate
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def home_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype ``t`` has at home: its own, or the one it was upcast from while placed (quantization grids
    use it: scales are stored in the model's dtype)."""
    return getattr(t, "_mixsparse_home_dtype", t.dtype)


def narrow(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in the 16-bit ``dtype``, rounded once; an entry non-zero in ``t`` stays non-zero (the smallest
    subnormal of its sign where rounding would flush it), so zero patterns are exactly kept."""
    out = t.to(dtype)
    lost = (out == 0) & (t != 0)
    if bool(lost.any()):
        tiny = torch.nextafter(torch.zeros((), dtype=dtype, device=t.device), torch.ones((), dtype=dtype, device=t.device))
        out = torch.where(lost, tiny * torch.sign(t).to(dtype), out)
    return out


def _upcast(module: nn.Module, dtype: torch.dtype | None, recurse: bool = True) -> None:
    """Every 16-bit floating parameter and buffer under ``module`` (``recurse`` False: of ``module`` itself) in
    ``dtype``, in place (parameters keep their identity: hooks, optimisers and views taken later see the new data)."""
    if dtype is None:
        return
    for m in (module.modules() if recurse else [module]):
        for name, p in m._parameters.items():
            if p is not None and p.dtype in HALF and p.dtype != dtype:
                home = p.dtype
                p.data = p.data.to(dtype)
                p._mixsparse_home_dtype = home
        for name, b in m._buffers.items():
            if b is not None and b.dtype in HALF and b.dtype != dtype:
                m._buffers[name] = b.to(dtype)
                m._buffers[name]._mixsparse_home_dtype = b.dtype


def _restore(module: nn.Module) -> None:
    """Every upcast tensor under ``module`` back in its home dtype (see :func:`narrow`)."""
    for m in module.modules():
        for name, p in m._parameters.items():
            home = getattr(p, "_mixsparse_home_dtype", None) if p is not None else None
            if home is not None:
                with torch.no_grad():
                    p.data = p.data.to(home) if p.is_meta else narrow(p.data, home)
                del p._mixsparse_home_dtype
        for name, b in m._buffers.items():
            home = getattr(b, "_mixsparse_home_dtype", None) if b is not None else None
            if home is not None:
                m._buffers[name] = b.to(home)


def _send_home(model: nn.Module, home: torch.device) -> None:
    """``model.to(home)``, leaving tensors on the meta device (a streamed model's blocks) where they are."""
    if not any(p.is_meta for p in model.parameters()):
        model.to(home)
        return
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None and not p.is_meta and p.device != home:
                p.data = p.data.to(home)
        for name, b in m._buffers.items():
            if b is not None and not b.is_meta and b.device != home:
                m._buffers[name] = b.to(home)


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
    p = next((p for p in model.parameters() if not p.is_meta), None)  # a streamed model's blocks are on meta
    return p.device if p is not None else torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    """``device``: where computation runs. ``mode``: ``whole`` or ``blockwise`` (resolved, never auto).
    ``offload``: keep activations between blocks on the CPU (blockwise stages). ``compute``: the dtype 16-bit
    tensors are upcast to while placed (None: the model's own; see the module docstring)."""

    device: torch.device
    mode: str = "blockwise"
    offload: bool = True
    compute: torch.dtype | None = None

    @classmethod
    def resolve(cls, device: "str | torch.device | Placement | None" = None, mode: str = "auto",
                model: nn.Module | None = None, *, offload: bool = True, headroom: float = 0.8,
                compute: "str | torch.dtype | None" = "auto") -> "Placement":
        """``auto``: ``whole`` on the CPU (the model is already there) and when the model takes at most
        ``headroom`` of the accelerator's free memory (in the compute dtype); ``blockwise`` otherwise."""
        if isinstance(device, Placement):
            return device
        if mode not in MODES:
            raise ConfigError(f"model.placement must be one of {', '.join(MODES)}, got {mode!r}")
        dev = torch.device(device) if device is not None else (home_of(model) if model is not None else torch.device("cpu"))
        from .streaming import stream_of

        if model is not None and stream_of(model) is not None:  # its blocks live on disk: one at a time
            mode = "blockwise"
        model_dtype = next(model.parameters()).dtype if model is not None else torch.float32
        dtype = compute_dtype(compute, model_dtype, dev)
        if mode == "auto":
            if dev.type == "cpu" or model is None:
                mode = "whole"
            else:
                free = free_device_bytes(dev)
                need = model_bytes(model) * (2 if dtype is not None else 1)
                mode = "whole" if free is not None and need <= headroom * free else "blockwise"
        return cls(dev, mode, offload, dtype)

    def upcast(self, module: nn.Module, recurse: bool = True) -> None:
        """``module``'s 16-bit tensors in the compute dtype (restored by :meth:`stage` at the latest)."""
        _upcast(module, self.compute, recurse)

    def cast(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loose tensors (a dense snapshot's block) in the compute dtype, as the placed modules are."""
        if self.compute is None:
            return tensors
        return {k: v.to(self.compute) if v.dtype in HALF else v for k, v in tensors.items()}

    def whole_upcast(self, model: nn.Module, headroom: float = 0.8) -> bool:
        """Whether the whole model is upcast when placed whole: only when its float32 copy fits (in the
        device's free memory, or the CPU's available RAM); else it runs in its own dtype, slower."""
        if self.compute is None:
            return False
        extra = model_bytes(model)  # a 16-bit model doubles in float32
        free = free_device_bytes(self.device) if self.device.type != "cpu" else available_ram_bytes()
        return free is None or extra <= headroom * free

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
            _restore(model)  # whatever the stage upcast goes back to the model's dtype, also after an error
            _send_home(model, home)

    @contextlib.contextmanager
    def whole(self, model: nn.Module) -> Iterator[torch.device]:
        """The whole model on the device (upcast when :meth:`whole_upcast`) for the duration, then back home."""
        from .streaming import refuse

        refuse(model, "placing the whole model on the device", "use model.placement=blockwise")
        with self.stage(model):
            model.to(self.device)
            if self.whole_upcast(model):
                self.upcast(model)
            elif self.compute is not None:
                log.warning("the model in %s would not fit next to the rest in memory: this stage runs it in its "
                            "own dtype %s (emulated here, slower)", self.compute, next(model.parameters()).dtype)
            yield self.device

    @contextlib.contextmanager
    def block(self, block: nn.Module) -> Iterator[nn.Module]:
        """One block on the device (in the compute dtype) for the duration, then back where it was."""
        home = home_of(block)
        block.to(self.device)
        self.upcast(block)
        try:
            yield block
        finally:
            _restore(block)
            block.to(home)


"""Load a run's compressed checkpoint as a model whose pruned linears compute from the packed format.

The model is built on the meta device; every tensor comes from the checkpoint's safetensors files, which are
memory-mapped (a tensor read from them costs no copy: resident memory grows only with the pages a forward
touches). A prunable linear stored as ``bitmask`` becomes a :class:`SparseLinear` on the file's own bitmask and
values; ``nm`` and ``quantized`` (int4/int8 codes) layers are converted to bitmask + values at load, exactly
(an N:M layer's positions and values; a quantized layer other than 4-bit, or one whose groups the kernel does
not take, as its dequantized values at the dtype the index records); a 4-bit quantized layer keeps its codes and
group scales (:class:`Q4SparseLinear`, half a byte per kept weight); a layer whose sparsity is below ``min_sparsity`` (where bitmask + values would be
slower than the dense GEMV) or whose shape the kernel does not take stays a dense float32 linear. Everything
else (embeddings, norms, head) is float32, or the head in ``head_dtype``: fp16/bf16 (half the bytes a token reads
of it), or int8 with one scale per row (a quarter; an approximation of the stored head, a user's choice), through a
dense kernel; a tied embedding then looks its rows up in the same matrix. The head is held so even without the
compiled kernels, with a warning: the pure-torch path expands it to float32 for every call, so it is smaller only at
rest, and slower.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelLoadError
from .linear import DenseLowpLinear, Q4SparseLinear, SparseLinear, quantize_rows_int8
from .options import HEAD_DTYPES

log = logging.getLogger(__name__)


@dataclass
class RuntimeInfo:
    """What the loader did: per layer, sparse (kernel or torch path) or dense and why; bytes held."""

    kernels: str  # "avx512", "avx2", "scalar" (compiled CPU kernels), "triton" (GPU) or "torch" (the slower path)
    sparse: dict[str, str] = field(default_factory=dict)  # layer -> its stored encoding
    dense: dict[str, str] = field(default_factory=dict)  # layer -> why it stays dense
    weight_bytes: int = 0  # bytes of every tensor the model computes from
    kernels_missing: str | None = None
    zeros: int = 0  # zeros in the linear layers' weights other than the head (sparse and dense ones)
    linear_params: int = 0

    @property
    def sparsity(self) -> float:
        return self.zeros / self.linear_params if self.linear_params else 0.0


def compressed_dir(path: str | os.PathLike) -> Path:
    """A run directory's ``compressed/``, or the compressed checkpoint directory itself."""
    from ..export import INDEX_FILE

    p = Path(path).expanduser()
    if (p / INDEX_FILE).is_file():
        return p
    if (p / "compressed" / INDEX_FILE).is_file():
        return p / "compressed"
    raise ModelLoadError(f"{p} holds no compressed checkpoint ({INDEX_FILE}, or compressed/{INDEX_FILE} of a run); "
                         "prune with export.compressed on (the default)")


def _open_all(d: Path, index: dict) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from ..export import TENSOR_FILE

    files = index.get("files") or {str(index.get("file", TENSOR_FILE)): None}
    stored: dict[str, torch.Tensor] = {}
    for fname in files:
        with safe_open(str(d / fname), framework="pt", device="cpu") as f:  # tensors are views of the mapping
            stored.update({k: f.get_tensor(k) for k in f.keys()})
    return stored


def _as_bitmask(name: str, entry: dict, stored: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, values)`` of a stored prunable weight in the bitmask layout (the file's own for ``bitmask``)."""
    from ..export import _decode, bitmask_encode

    if entry["encoding"] == "bitmask":
        return stored[f"{name}::bitmask"], stored[f"{name}::values"]
    return bitmask_encode(_decode(name, entry, stored))  # N:M or quantized: exact values, converted once


KERNEL_CHOICES = ("auto", "compiled", "triton", "torch")


def _kernels_for(device: torch.device, kernels: str):
    """``(backend or None, its name, why the wanted one is missing)``; a choice that cannot work here is refused
    in one line before anything is read."""
    from . import kernels as K
    from . import triton_kernels as TK

    if kernels not in KERNEL_CHOICES:
        raise ConfigError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {kernels!r}")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"the sparse runtime runs on cpu or cuda, not {device.type}; use cpu or cuda")
    if kernels == "auto":
        kernels = "compiled" if device.type == "cpu" else "triton"
    if device.type != "cpu" and kernels != "triton":
        raise ConfigError(f"on {device} the sparse runtime computes with its Triton kernels; kernels={kernels!r} runs "
                          "on the CPU only: leave kernels at 'auto'")
    if kernels == "triton":
        if TK.reason() is not None:
            raise ConfigError(f"the sparse runtime on {device} needs its Triton kernels, but {TK.reason()}: "
                              "pip install triton")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("the Triton kernels run on the CPU only in Triton's interpreter (TRITON_INTERPRET=1, "
                              "for tests); on the CPU use kernels='auto'")
        return TK.TritonKernels(), "triton", None
    if kernels == "torch":
        return None, "torch", None
    kern = K.get()
    if kern is None and kernels == "compiled":  # named, not chosen: no quiet fallback
        raise ConfigError(f"the compiled sparse kernels are unavailable ({K.reason()}): run scripts/install.sh with a "
                          "C++ compiler present, or use kernels='auto' (the pure-torch path, slower)")
    if kern is None:
        log.warning("sparse kernels unavailable (%s): the pure-torch path is used (correct, slower)", K.reason())
        return None, "torch", K.reason()
    return kern, "compiled", None


def load_sparse(path: str | os.PathLike, *, device: str | torch.device = "cpu", head_dtype: str = "float32",
                min_sparsity: float = 0.3, kernels: str = "auto", isa: int = -1) -> tuple[nn.Module, RuntimeInfo]:
    """``(model, info)``: the compressed checkpoint in ``path`` (a run directory or its ``compressed/``) with its
    pruned linears as :class:`SparseLinear` (see the module docstring), on ``device``. ``kernels``: ``auto`` (the
    compiled CPU kernels on the CPU, the Triton ones on a GPU), ``compiled``, ``triton`` or ``torch`` (the pure-torch
    path, CPU). ``isa`` caps the CPU kernels' instruction set (0 scalar, 1 AVX2, 2 AVX-512; -1 the best this CPU
    has)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..export import _decode, _read_index
    from . import kernels as K

    if head_dtype not in HEAD_DTYPES:
        raise ConfigError(f"head_dtype must be one of {', '.join(HEAD_DTYPES)}, got {head_dtype!r}")
    device = torch.device(device)
    kern, backend, missing = _kernels_for(device, kernels)
    d = compressed_dir(path)
    index = _read_index(d)
    stored = _open_all(d, index)
    entries: dict[str, dict] = index["tensors"]
    aliases: dict[str, str] = index.get("aliases", {})
    info = RuntimeInfo(kernels=K.isa(isa) if backend == "compiled" else backend, kernels_missing=missing)
    config = AutoConfig.from_pretrained(d)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    replaced: dict[str, nn.Module] = {}
    head = model.get_output_embeddings()
    head_name = next((n for n, m in modules.items() if m is head), None)
    for name, entry in entries.items():
        owner, _, attr = name.rpartition(".")
        mod = modules.get(owner)
        enc = entry["encoding"]
        counted = attr == "weight" and isinstance(mod, nn.Linear) and owner != head_name
        if attr == "weight" and isinstance(mod, nn.Linear) and enc in ("bitmask", "nm", "quantized", "quantized_dense"):
            rows, cols = entry["shape"]
            bias_entry = entries.get(f"{owner}.bias")
            bias = None if bias_entry is None else _decode(f"{owner}.bias", bias_entry, stored)
            layer, why = None, None
            if cols % 8:
                why = f"in_features {cols} is not a multiple of 8"
            elif enc == "quantized_dense":
                why = f"quantized int{entry['bits']} without pruning: held dequantized, dense"
            elif enc == "quantized" and int(entry["bits"]) == 4 and kern is not None \
                    and (cols // stored[f"{name}::scale"].shape[1]) % 8 == 0:
                layer = Q4SparseLinear(cols, rows, stored[f"{name}::bitmask"], stored[f"{name}::codes"],
                                       stored[f"{name}::scale"], None if entry["symmetric"] else stored[f"{name}::zero"],
                                       bias, kernels=kern, isa=isa)
            else:
                mask, values = _as_bitmask(name, entry, stored)  # the file's own tensors for a bitmask entry
                sparsity = 1 - values.numel() / (rows * cols)
                if sparsity < min_sparsity:
                    why = f"sparsity {sparsity:.3f} < min_sparsity {min_sparsity}"
                else:
                    layer = SparseLinear(cols, rows, mask, values, bias, kernels=kern, isa=isa)
            if layer is not None:
                replaced[owner] = layer
                info.sparse[owner] = "quantized int4" if isinstance(layer, Q4SparseLinear) else enc
                info.zeros += rows * cols - layer.nnz
                info.linear_params += rows * cols
                continue
            info.dense[owner] = why
        state[name] = _decode(name, entry, stored)
        if counted:
            info.zeros += int((state[name] == 0).sum())
            info.linear_params += state[name].numel()
    for alias, target in aliases.items():
        if target in state:
            state[alias] = state[target]
    if head_name is not None and head_dtype != "float32" and head_name not in replaced:
        w = state.pop(f"{head_name}.weight", None)  # a tied embedding keeps its own (float32) tensor in ``state``
        if w is not None:
            if kern is None:
                log.warning("head_dtype %s without the compiled kernels: the head is expanded to float32 for every "
                            "call (smaller at rest only, and slower)", head_dtype)
            if head_dtype == "int8":
                low, scale = quantize_rows_int8(w)
            else:
                low, scale = w.to(getattr(torch, head_dtype)).contiguous(), None
            replaced[head_name] = DenseLowpLinear(low, scale, state.pop(f"{head_name}.bias", None), kernels=kern, isa=isa)
            info.sparse[head_name] = replaced[head_name]._stored()
            emb = model.get_input_embeddings()
            emb_name = next((n for n, m in modules.items() if m is emb), None)
            if emb_name is not None and state.get(f"{emb_name}.weight") is w:  # tied: look rows up in the same values
                state.pop(f"{emb_name}.weight")
                replaced[emb_name] = PackedEmbedding(low, scale)
    if backend == "compiled" and isa < 0:
        info.kernels = _fastest_isa([m for m in replaced.values() if isinstance(m, SparseLinear)], kern)
    for owner, new in replaced.items():
        parent, _, child = owner.rpartition(".")
        setattr(modules[parent] if parent else model, child, new)
        for suffix in ("weight", "bias"):
            state.pop(f"{owner}.{suffix}", None)
    as_float: dict[int, torch.Tensor] = {}  # tied tensors stay one tensor

    def f32(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        return as_float.setdefault(id(t), t.float())

    state = {k: f32(v) for k, v in state.items()}
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ModelLoadError(f"the compressed checkpoint in {d} lacks {left[0]!r}")
    if unexpected:
        raise ModelLoadError(f"the compressed checkpoint in {d} holds {unexpected[0]!r}, which the model does not have")
    info.weight_bytes = _weight_bytes(model)
    model.config.use_cache = True
    if device.type != "cpu":
        to_device(model, device)
    return model.eval(), info


def to_device(model: nn.Module, device: torch.device) -> None:
    """``model.to(device)`` that keeps shared tensors shared: ``Module.to`` copies each module's tensors on its own, so
    a tied head and embedding (two Parameters on one tensor here, or the low-precision head's matrix that the
    embedding looks rows up in) would each get a copy on the device."""
    moved: dict[tuple, torch.Tensor] = {}

    def move(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())
        if key not in moved:
            moved[key] = t.to(device)
        return moved[key]

    model._apply(move)


class PackedEmbedding(nn.Module):
    """Token embeddings looked up in the tied head's low-precision matrix (16-bit, or int8 times its row's scale):
    rows come out in float32."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight_lowp", weight, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = torch.nn.functional.embedding(input_ids, self.weight_lowp).float()
        return rows if self.scale is None else rows * self.scale[input_ids].unsqueeze(-1)


def _fastest_isa(layers: list[SparseLinear], kern) -> str:
    """Set each layer to the instruction set whose kernel multiplies it fastest here, timed once per kind and
    shape (AVX-512 is not always faster: on AMD Zen 4 the AVX2 path wins on the small MLP projections and loses
    on the large dense-masked head); returns how many layers use which."""
    import time

    from .kernels import ISA_NAMES

    levels = sorted({int(kern.isa_level(i)) for i in (1, 2)})
    groups: dict[tuple, list[SparseLinear]] = {}
    for m in layers:
        groups.setdefault((m.in_features, m.out_features, m._stored()), []).append(m)
    count: dict[str, int] = {}
    for group in groups.values():
        rep = max(group, key=lambda m: m.nnz)
        x = torch.randn(1, rep.in_features)
        best = None
        for level in levels:
            rep.isa = level
            for _ in range(3):
                rep(x)
            sec = float("inf")
            for _ in range(3):  # the best of three short runs: robust to a neighbour's burst
                t = time.perf_counter()
                for _ in range(10):
                    rep(x)
                sec = min(sec, time.perf_counter() - t)
            if best is None or sec < best[0]:
                best = (sec, level)
        for m in group:
            m.isa = best[1]
        name = ISA_NAMES[best[1]]
        count[name] = count.get(name, 0) + len(group)
    if len(count) <= 1:
        return next(iter(count), "none")
    return ", ".join(f"{k}: {v} layers" for k, v in sorted(count.items()))


def _weight_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total

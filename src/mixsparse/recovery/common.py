"""What every recovery method shares: the mask held fixed, the parameters it tunes, the dense teacher."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, SparsityError
from ..io import atomic_write_text
from ..experts import bias_owner, owners, weight_owner
from ..modeling import find_decoder_blocks, prunable_linears
from ..placement import fast_bf16


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``recover.*.dtype`` (None = plain float32). Master weights stay in the model's
    dtype; only the matmuls run in bf16 (AMX CPUs and GPUs do them several times faster)."""
    if name == "auto":
        return torch.bfloat16 if fast_bf16(device) else None
    return None if name == "float32" else getattr(torch, name)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() and not list(module.children())


def tuned_parameters(root: nn.Module, linears: dict[str, nn.Linear], params: str) -> list[nn.Parameter]:
    """The parameters a recovery tunes: the prunable linears' weights and biases, and with
    ``linears+norms`` the normalisation layers' parameters under ``root``."""
    out = {}  # by id: the experts of one fused tensor share it
    for lin in linears.values():
        for p in (weight_owner(lin), bias_owner(lin)):
            if p is not None:
                out.setdefault(id(p), p)
    out = list(out.values())
    if params == "linears+norms":
        out += [p for m in root.modules() if is_norm(m) for p in m.parameters(recurse=False)]
    return out


class FixedMask:
    """The zeros of the prunable weights at the start of recovery, held exactly by :class:`MasterWeights`:
    gradients at pruned positions are zeroed before each step and the weights re-masked after it (an
    optimiser with weight decay or momentum could otherwise move a zero). One bool per weight."""

    def __init__(self, linears: dict[str, nn.Linear]):
        # per parameter holding prunable weights (a fused experts tensor holds all its experts' masks)
        self.by_param = {id(p): p.detach() != 0 for p in owners(linears.values())[0]}


class MasterWeights:
    """Mixed-precision training of a bf16/fp16 model's tuned tensors: the optimiser steps on float32 master
    copies, and the model's own tensors receive the masters rounded once per step. Without masters an update
    smaller than half a unit in the last place of the weight (bf16: 2^-9 of its magnitude, e.g. lr 1e-4 on a
    weight of 0.05) is rounded away and training stalls. An fp16 model's loss is also scaled (dynamic loss
    scaling: a step whose gradients overflow is skipped and the scale halved; it doubles after ``growth``
    good steps), because fp16 gradients underflow. float32 tensors are their own masters (nothing changes).

    The mask is held on the masters (gradients at pruned positions zeroed, weights re-masked after the
    step), so the model's zeros are exactly zero; a kept weight whose master rounds to zero in fp16 gets
    the smallest subnormal of its sign, so no new zero appears."""

    def __init__(self, params: "dict[str, torch.Tensor]", mask: "FixedMask | None" = None, growth: int = 1000):
        self.params = params
        self.masters = {n: p if p.dtype == torch.float32 else p.detach().float().clone() for n, p in params.items()}
        self.masks = {}
        if mask is not None:
            self.masks = {n: mask.by_param[id(p)] for n, p in params.items() if id(p) in mask.by_param}
        self.scale = 2.0 ** 16 if any(p.dtype == torch.float16 for p in params.values()) else 1.0
        self.growth, self.good_steps, self.skipped = growth, 0, 0

    @property
    def active(self) -> bool:
        return any(m is not self.params[n] for n, m in self.masters.items())

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.scale if self.scale != 1.0 else loss).backward()

    def step(self, opt: torch.optim.Optimizer) -> bool:
        """Unscale the gradients into the masters, step, write back; False when the step was skipped."""
        finite = True
        for n, p in self.params.items():
            m = self.masters[n]
            if p.grad is None:
                continue
            g = p.grad.float() if m is not p else p.grad
            if self.scale != 1.0:
                g = g / self.scale
            if n in self.masks:
                g = g * self.masks[n]
            if m is not p:
                p.grad = None
            m.grad = g
            if self.scale != 1.0:  # only a scaled (fp16) step can overflow; a check costs a device sync
                finite = finite and bool(torch.isfinite(g).all())
        if not finite and self.scale != 1.0:  # fp16 overflow: skip this step, retry with a smaller scale
            opt.zero_grad(set_to_none=True)
            self.scale, self.good_steps, self.skipped = self.scale / 2, 0, self.skipped + 1
            return False
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.to_model()
        if self.scale != 1.0:
            self.good_steps += 1
            if self.good_steps % self.growth == 0:
                self.scale *= 2
        return True

    @torch.no_grad()
    def to_model(self) -> None:
        """Re-mask the masters and round them into the model's tensors."""
        for n, m in self.masters.items():
            keep = self.masks.get(n)
            if keep is not None:
                m.mul_(keep)
            p = self.params[n]
            if m is p:
                continue
            p.copy_(m)
            if keep is not None:
                lost = keep & (p == 0) & (m != 0)
                if bool(lost.any()):
                    tiny = torch.nextafter(torch.zeros((), dtype=p.dtype, device=p.device),
                                           torch.ones((), dtype=p.dtype, device=p.device))
                    p.copy_(torch.where(lost, tiny * torch.sign(m).to(p.dtype), p))


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Where every prunable weight is zero (what a recovery must leave exactly as it found)."""
    return {n: (lin.weight.detach() == 0).cpu() for n, lin in prunable_linears(model).items()}


def check_pruned(model: nn.Module) -> None:
    """Recovery tunes a pruned model back toward its dense original; a model without a single pruned
    weight is refused (there is no mask to keep, and fine-tuning a dense model is another tool's job)."""
    from ..modeling import measured_sparsity

    if not any(v > 0 for v in measured_sparsity(model)[0].values()):
        raise SparsityError("recovery needs a pruned model, but no prunable weight of this model is zero; "
                            "prune it first (mixsparse prune ... --recover blockwise)")


def check_zeros_match(model: nn.Module, achieved: dict[str, float], where: str) -> None:
    """The model's zeros agree with the sparsity a run recorded, layer by layer (one weight of slack)."""
    linears = prunable_linears(model)
    for name, frac in achieved.items():
        if name not in linears:
            raise SparsityError(f"{where} records layer {name}, which this model does not have; is it the run's model?")
        w = linears[name].weight
        zeros = int((w == 0).sum())
        if abs(zeros - frac * w.numel()) > 1:
            raise SparsityError(f"{name} has {zeros / w.numel():.4f} zeros but {where} recorded {frac:.4f}; the model "
                                "is not the one this run pruned (re-export it or prune again)")


class DenseStore:
    """The dense model's decoder blocks, saved before pruning (one safetensors file per block), so that a
    recovery can compute dense block outputs or logits without a second model in memory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta = self.path / "complete.json"
        if not meta.is_file():
            raise ConfigError(f"{self.path} holds no complete dense snapshot")
        self.meta = json.loads(meta.read_text())

    @classmethod
    def snapshot(cls, model: nn.Module, path: str | os.PathLike, fingerprint: str) -> "DenseStore":
        """Write the blocks of ``model`` (dense) to ``path``; an existing complete snapshot with the same
        fingerprint is reused."""
        from safetensors.torch import save_file

        from ..modeling import stream_of

        stream = stream_of(model)
        if stream is not None:  # its checkpoint is the dense model: read from there, no copy
            return CheckpointDense(stream, fingerprint)

        path = Path(path)
        with contextlib.suppress(ConfigError):
            old = cls(path)
            if old.meta.get("fingerprint") == fingerprint:
                return old
        path.mkdir(parents=True, exist_ok=True)
        (path / "complete.json").unlink(missing_ok=True)
        _, blocks = find_decoder_blocks(model)
        for i, block in enumerate(blocks):
            tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in block.state_dict().items()}
            tmp = path / f".block-{i}.tmp"
            save_file(tensors, str(tmp))
            os.replace(tmp, path / f"block-{i}.safetensors")
        atomic_write_text(path / "complete.json", json.dumps({"fingerprint": fingerprint, "blocks": len(blocks)}))
        return cls(path)

    def __len__(self) -> int:
        return int(self.meta["blocks"])

    def block(self, i: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / f"block-{i}.safetensors"), device=str(device))

    def params(self, blocks_name: str, device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """Every dense block tensor by its qualified name in the model."""
        for i in range(len(self)):
            for k, v in self.block(i, device).items():
                yield f"{blocks_name}.{i}.{k}", v


class CheckpointDense(DenseStore):
    """The dense snapshot of a model streamed from its checkpoint (:mod:`mixsparse.streaming`): the checkpoint's
    own block tensors, read when asked (pruning writes elsewhere, so the checkpoint stays dense)."""

    def __init__(self, stream, fingerprint: str):
        if stream.version:
            raise ConfigError("the dense snapshot of a streamed model is taken before any block is changed")
        self.stream, self.path = stream, stream.checkpoint.path
        self.meta = {"fingerprint": fingerprint, "blocks": len(stream.blocks), "checkpoint": str(self.path)}

    def block(self, i: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        names = [n for n, _ in self.stream.blocks[i].named_parameters()]
        got = self.stream.checkpoint.read([self.stream._key(i, n) for n in names])
        return {n: got[self.stream._key(i, n)].to(device=device, dtype=self.stream.dtype) for n in names}

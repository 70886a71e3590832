"""Models larger than RAM: decoder blocks stream from the checkpoint, one or two at a time.

:func:`load_streamed` builds the model on the meta device and loads only what is outside the decoder blocks
(embeddings, final norm, head). Each block's weights are read from the safetensors checkpoint (memory-mapped)
when a stage places that block (:meth:`LayerwiseRunner.on_device`), and dropped back to the meta device when it
leaves; a stage that changes weights (pruning) writes the block to the stream's work directory, and later
stages read that version. RAM holds at most two blocks (the one in flight and, while the next is read, its
successor) plus the calibration activations and the non-block tensors, whatever the model's size.

:func:`save_streamed` writes the result as a Hugging Face checkpoint (one shard per block, plus the
non-block tensors), which ``from_pretrained`` loads, without ever holding the whole model.

What streams: every pruner and the OWL, Fisher and MSP allocations (the level database keeps a mask-only
pruner's masks on disk; the fitness reads each block once per stage for all candidates), block-wise recovery
(the checkpoint itself is the dense teacher), RTN/GPTQ quantization (the packed codes are not kept: for a model
larger than RAM they would not fit in it), perplexity and zero-shot evaluation, the HF checkpoint and the
compressed export. What needs the whole model at once is refused before any work, naming the alternative
(:func:`check_streamed`): the Hessian allocation, end-to-end fine-tuning and LoRA, lm-eval, and the
compressed-tensors export (skipped, with the reason in run.json).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, ModelLoadError
from .io import atomic_dir, atomic_write_text
from .modeling import stream_of  # noqa: F401 - part of this module's API
from .recovery import trains_whole

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """A safetensors checkpoint's tensors by name (one file or an index of shards), read lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if (self.path / INDEX).is_file():
            self.files = {k: self.path / v for k, v in json.loads((self.path / INDEX).read_text())["weight_map"].items()}
        elif (self.path / SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(str(self.path / SINGLE), framework="pt") as f:
                self.files = {k: self.path / SINGLE for k in f.keys()}
        else:
            raise ModelLoadError(f"{self.path} holds no safetensors checkpoint ({SINGLE} or {INDEX}); streaming reads "
                                 "safetensors only (save the model once with save_pretrained)")

    def bytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.files.values()))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once (its pages are mapped, read and released)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                out.update({k: f.get_tensor(k) for k in keys})
        return out


class BlockStream:
    """Where a streamed model's blocks live: the checkpoint, or the work directory once a stage changed them."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, blocks_name: str, blocks: nn.ModuleList,
                 work_dir: Path, dtype: torch.dtype):
        # the blocks themselves, not the ModuleList: the runner swaps recorders into the list while it captures
        self.checkpoint, self.blocks_name, self.blocks, self.dtype = checkpoint, blocks_name, list(blocks), dtype
        self.work_dir = work_dir
        self.live: set[int] = set()
        self.version = 0  # bumped whenever a block is written: what a cached fingerprint was computed on
        self._fingerprint: tuple[int, str] | None = None
        self.peak_live = 0  # most blocks materialised at once (a test asserts it stays at most two)
        self.reads = 0
        for i, block in enumerate(blocks):
            missing = [n for n, _ in block.named_parameters() if self._key(i, n) not in checkpoint.files]
            if missing:
                raise ModelLoadError(
                    f"the checkpoint in {checkpoint.path} has no tensor {self._key(i, missing[0])!r} that block {i} "
                    "needs; streaming reads tensors under the model's own names (a checkpoint in an older layout, "
                    "e.g. per-expert MoE weights, must be loaded and saved once with save_pretrained)")

    def _key(self, i: int, local: str) -> str:
        return f"{self.blocks_name}.{i}.{local}"

    def _saved(self, i: int) -> Path:
        return self.work_dir / f"block-{i}.safetensors"

    def read(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s parameters by local name, in the model's dtype: its latest version."""
        from safetensors.torch import load_file

        self.reads += 1
        if self._saved(i).is_file():
            return load_file(str(self._saved(i)))
        names = [n for n, _ in self.blocks[i].named_parameters()]
        got = self.checkpoint.read([self._key(i, n) for n in names])
        return {n: got[self._key(i, n)].to(self.dtype) for n in names}

    @staticmethod
    def _set(block: nn.Module, tensors: "dict[str, torch.Tensor] | None") -> None:
        """Every parameter of ``block`` replaced by one holding ``tensors[name]`` (None: an empty meta tensor). New
        parameter objects: torch does not let a parameter's data move between the meta device and a real one."""
        for prefix, m in block.named_modules():
            for attr, p in list(m._parameters.items()):
                if p is not None:
                    name = f"{prefix}.{attr}" if prefix else attr
                    t = torch.empty_like(p, device="meta") if tensors is None else tensors[name]
                    m._parameters[attr] = nn.Parameter(t, requires_grad=p.requires_grad)

    def materialise(self, i: int) -> nn.Module:
        block = self.blocks[i]
        self._set(block, self.read(i))
        self.live.add(i)
        self.peak_live = max(self.peak_live, len(self.live))
        return block

    def release(self, i: int, write: bool) -> None:
        """Back to the meta device; with ``write`` the block's weights go to the work directory first."""
        block = self.blocks[i]
        if write:
            from safetensors.torch import save_file

            self.work_dir.mkdir(parents=True, exist_ok=True)
            tmp = self._saved(i).with_suffix(".tmp")
            save_file({n: p.detach().to("cpu").contiguous() for n, p in block.named_parameters()}, str(tmp))
            os.replace(tmp, self._saved(i))
            self.version += 1
        self._set(block, None)
        self.live.discard(i)

    @contextlib.contextmanager
    def placed(self, i: int, placement, write: bool) -> Iterator[nn.Module]:
        """Block ``i`` read, on the placement's device for the duration, then written (``write``) and dropped."""
        block = self.materialise(i)
        try:
            with placement.block(block):
                yield block
        finally:
            self.release(i, write)

    def fingerprint_into(self, h) -> None:
        """Feed every block's current tensors (name, shape, dtype, bytes) to the hash ``h``, one block at a time;
        the digest is kept until a block is written, so the stages of one run read the blocks for it only once."""
        import hashlib

        if self._fingerprint is None or self._fingerprint[0] != self.version:
            inner = hashlib.sha256()
            for i, tensors in self.blocks_at_rest():
                for n in sorted(tensors):
                    t = tensors[n]
                    inner.update(f"{self._key(i, n)}:{tuple(t.shape)}:{t.dtype}".encode())
                    inner.update(t.reshape(-1).view(torch.uint8).numpy())
            self._fingerprint = (self.version, inner.hexdigest())
        h.update(self._fingerprint[1].encode())

    def zeros_at_rest(self) -> dict[str, int]:
        """Exact zeros of every parameter of the blocks, by qualified name (one block at a time)."""
        return {self._key(i, n): int((t == 0).sum()) for i, tensors in self.blocks_at_rest() for n, t in tensors.items()}

    def by_block(self, names) -> dict[int, list[str]]:
        """Qualified layer names grouped by the block they belong to, blocks in order."""
        from .names import block_index

        out: dict[int, list[str]] = {}
        for name in names:
            out.setdefault(block_index(name, self.blocks_name), []).append(name)
        return dict(sorted(out.items()))

    def editing(self, names) -> Iterator[list[str]]:
        """For each block holding some of the layers ``names``: the block read, its names yielded for the caller to
        change their weights in place, then the block written back and dropped (also when the caller raises)."""
        for i, group in self.by_block(names).items():
            self.materialise(i)
            try:
                yield group
            finally:
                self.release(i, write=True)

    def layer_weights(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, weight)`` of every prunable layer at rest, one block at a time (an expert's as its slice)."""
        from .experts import ExpertMatrix
        from .modeling import prunable_linears

        layers = prunable_linears(model)  # names and kinds only: the blocks' tensors are on the meta device
        groups = self.by_block(layers)
        for i, tensors in self.blocks_at_rest():
            for name in groups.get(i, []):
                lin, local = layers[name], name[len(f"{self.blocks_name}.{i}."):]
                yield name, (lin.slot(tensors[local.split("[")[0]]) if isinstance(lin, ExpertMatrix)
                             else tensors[f"{local}.weight"])

    def measured_sparsity(self, model: nn.Module) -> tuple[dict[str, float], float]:
        """:func:`~mixsparse.modeling.measured_sparsity` of the streamed ``model``, one block at a time."""
        from .sparsity import weighted_average

        per, counts = {}, {}
        for name, w in self.layer_weights(model):
            per[name] = float((w == 0).sum()) / w.numel()
            counts[name] = w.numel()
        return per, weighted_average(per, counts)

    def blocks_at_rest(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Every block's current tensors, one block at a time (for measurements and the export)."""
        for i in range(len(self.blocks)):
            yield i, self.read(i)


def should_stream(path: str | os.PathLike, dtype: torch.dtype, share: float = 0.8) -> bool:
    """Whether the checkpoint in ``path``, loaded in ``dtype``, would take more than ``share`` of the RAM available
    now (from its tensors' shapes, nothing read); False when it is not a safetensors checkpoint."""
    import logging

    import psutil
    from safetensors import safe_open

    try:
        ckpt = Checkpoint(path)
    except ModelLoadError:
        return False
    size = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    need = 0
    for file in set(ckpt.files.values()):
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                stored = {"F32": 4, "F64": 8, "I64": 8, "I32": 4}.get(sl.get_dtype(), 2)
                need += n * (size or stored)
    free = psutil.virtual_memory().available
    if need > share * free:
        logging.getLogger(__name__).warning(
            "the model takes %.1f GiB in memory, %.1f GiB of RAM are available: its decoder blocks are streamed from "
            "the checkpoint (model.stream=never to load it whole)", need / 2**30, free / 2**30)
        return True
    return False


def load_streamed(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                  work_dir: str | os.PathLike | None = None) -> nn.Module:
    """The model in ``path`` with its decoder blocks left on the checkpoint (see the module docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling import find_decoder_blocks

    if isinstance(dtype, str):
        name, dtype = dtype, getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"unknown dtype {name!r} (float32, bfloat16 or float16)")
    ckpt = Checkpoint(path)
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    blocks_name, blocks = find_decoder_blocks(model)
    inside = {id(p) for p in blocks.parameters()}
    outside = [n for n, p in model.named_parameters() if id(p) not in inside]
    have = [n for n in outside if n in ckpt.files]
    state = {n: t.to(dtype) for n, t in ckpt.read(have).items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if id(p) not in inside and p.is_meta]
    if left:
        raise ModelLoadError(f"the checkpoint in {path} lacks {left[0]!r}, which the model needs outside its blocks")
    own = work_dir is None
    wd = Path(tempfile.mkdtemp(prefix="mixsparse-stream-")) if own else Path(work_dir)
    try:
        stream = BlockStream(model, ckpt, blocks_name, blocks, wd, dtype)
    except BaseException:
        if own:
            shutil.rmtree(wd, ignore_errors=True)
        raise
    if own:  # a temporary work directory goes with the model (the pruned blocks in it are the model's weights)
        weakref.finalize(model, shutil.rmtree, str(wd), True)
    object.__setattr__(model, "_mixsparse_stream", stream)
    model.config.use_cache = False
    return model.eval()


def check_streamed(cfg, model: nn.Module) -> None:
    """A run's stages that need the whole model at once, refused for a streamed model before any work."""
    if stream_of(model) is None:
        return
    why = "the model is streamed from its checkpoint (larger than RAM, or model.stream=always)"
    if cfg.prune.allocation == "hessian":
        raise ConfigError(f"allocation hessian needs the whole model on the device, but {why}; use msp, fisher, owl or "
                          "uniform (they stream)")
    if trains_whole(cfg.recover.mode):
        raise ConfigError(f"recovery {cfg.recover.mode} trains the whole model at once, but {why}; use --recover "
                          "blockwise (it streams), or a machine whose RAM holds the model")
    if cfg.eval.lm_eval_tasks:
        raise ConfigError(f"lm-eval needs the whole model, but {why}; drop eval.lm_eval_tasks")


def refuse(model: nn.Module, stage: str, alternative: str) -> None:
    """A stage that needs the whole model at once stops on a streamed model, naming what to do instead."""
    if stream_of(model) is not None:
        raise ConfigError(f"{stage} needs the whole model in memory, but this model is streamed from its checkpoint "
                          f"(larger than RAM); {alternative}")


def save_streamed(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False,
                  config=None) -> Path:
    """A Hugging Face checkpoint of a streamed model: the non-block tensors in one shard, each block in its own
    (``config``: the config to write, default the model's)."""
    from safetensors.torch import save_file

    stream = stream_of(model)
    if stream is None:
        raise ConfigError("save_streamed takes a streamed model (mixsparse.streaming.load_streamed)")
    inside = {id(p) for b in stream.blocks for p in b.parameters()}
    weight_map: dict[str, str] = {}
    with atomic_dir(out_dir, overwrite) as tmp:
        seen, rest = set(), {}
        for n, p in model.named_parameters():
            if id(p) not in inside and id(p) not in seen:  # tied weights are written once (the loader re-ties)
                seen.add(id(p))
                rest[n] = p.detach().cpu().contiguous()
        files = len(stream.blocks) + 1
        name = f"model-00001-of-{files:05d}.safetensors"
        save_file(rest, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in rest})
        for i, tensors in stream.blocks_at_rest():
            name = f"model-{i + 2:05d}-of-{files:05d}.safetensors"
            full = {stream._key(i, k): v.contiguous() for k, v in tensors.items()}
            save_file(full, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in full})
        total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        atomic_write_text(tmp / INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                  indent=2))
        (config or model.config).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)

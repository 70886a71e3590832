"""Block-wise reconstruction: each pruned decoder block is tuned, mask fixed, so that its output matches
the dense block's output on calibration activations. One block is on the device at a time (the engine's
:class:`~mixsparse.runner.LayerwiseRunner`), so it scales like pruning does.

The student block gets either the outputs of the blocks already recovered (``inputs: recovered``, the
default: it then also learns to undo the error the blocks before it left) or the dense model's own
activations; the target is always the dense model's block output. After each block the tuned tensors
are saved, so an interrupted recovery resumes at the next block with the same result.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import batches as split_batches
from ..runner import LayerwiseRunner
from ..errors import NumericalError
from ..io import atomic_write_text
from ..modeling import prunable_linears
from ..placement import Placement
from .common import DenseStore, FixedMask, MasterWeights, autocast, autocast_dtype, tuned_parameters
from .options import BlockwiseOptions

log = logging.getLogger(__name__)


def _mse(outs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    total = sum(float(F.mse_loss(o.float(), t.float(), reduction="sum")) for o, t in zip(outs, targets))
    return total / sum(t.numel() for t in targets)


class _Progress:
    """The per-block resume record: ``progress.json`` (fingerprint, blocks done, their statistics) and the
    tuned tensors of every finished block."""

    def __init__(self, path: Path | None, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        self.blocks: list[dict] = []
        if path is not None and (path / "progress.json").is_file():
            rec = json.loads((path / "progress.json").read_text())
            if rec.get("fingerprint") == fingerprint:
                self.blocks = rec["blocks"]
            else:
                log.warning("block-wise recovery state in %s is for other settings or another model; starting over", path)

    def load(self, i: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / f"block-{i}.safetensors"))

    def save(self, i: int, block: nn.Module, names: list[str], stats: dict) -> None:
        self.blocks.append(stats)
        if self.path is None:
            return
        from safetensors.torch import save_file

        self.path.mkdir(parents=True, exist_ok=True)
        state = block.state_dict()
        tmp = self.path / f".block-{i}.tmp"
        save_file({n: state[n].detach().cpu().contiguous() for n in names}, str(tmp))
        tmp.replace(self.path / f"block-{i}.safetensors")
        atomic_write_text(self.path / "progress.json",
                          json.dumps({"fingerprint": self.fingerprint, "blocks": self.blocks}, indent=1))


def reconstruct_blockwise(model: nn.Module, calib_ids: torch.Tensor, dense: DenseStore, options: BlockwiseOptions,
                          *, device: Placement | torch.device | str | None = None, seed: int = 0,
                          state_dir: str | Path | None = None, fingerprint: str = "", progress: bool = True) -> dict:
    """Tune ``model``'s pruned blocks in place toward ``dense``; returns the per-block errors before/after.

    ``state_dir``: where finished blocks are kept so an interrupted call resumes (same ``fingerprint``)."""
    placement = Placement.resolve(device, "blockwise", model)
    with Placement.stage(model):
        return _reconstruct(model, calib_ids, dense, options, placement, seed,
                            Path(state_dir) if state_dir is not None else None, fingerprint, progress)


def _reconstruct(model, calib_ids, dense, opts: BlockwiseOptions, placement, seed, state_dir, fingerprint, progress):
    t0 = time.perf_counter()
    runner = LayerwiseRunner(model, device=placement)
    runner.writes = True  # a streamed model's tuned blocks go back to disk
    prunable = prunable_linears(model)
    if len(dense) != len(runner.blocks):
        raise ValueError(f"dense snapshot has {len(dense)} blocks, the model {len(runner.blocks)}")
    state = runner.catch(split_batches(calib_ids, opts.batch_size))
    dense_hidden = list(state.hidden)  # embeddings are not pruned: both streams start equal
    amp = autocast_dtype(opts.dtype, placement.device)
    record = _Progress(state_dir, fingerprint)
    bar = tqdm(list(enumerate(runner.blocks)), desc="recover[blockwise]", disable=not progress)
    for i, block in bar:
        with runner.on_device(block):
            dense_params = placement.cast(dense.block(i, placement.device))  # the placed block's dtype
            targets = runner.run_block(i, state, dense_params, hidden=dense_hidden)
            del dense_params
            prefix = f"{runner.blocks_name}.{i}."  # the block's prunable linears (ArchSpec.skip, routers left out)
            linears = {n[len(prefix):]: lin for n, lin in prunable.items() if n.startswith(prefix)}
            params = tuned_parameters(block, linears, opts.params)
            names = [n for n, p in block.named_parameters() if any(p is q for q in params)]
            resumed = i < len(record.blocks)
            if resumed:  # finished before an interruption
                with torch.no_grad():
                    saved = record.load(i)
                    for n, p in block.named_parameters():
                        if n in saved:
                            p.copy_(saved[n])
            else:
                inputs = state.hidden if opts.inputs == "recovered" else dense_hidden
                stats, outs = _tune_block(runner, i, block, linears, params, inputs, state, targets, opts, amp,
                                          seed * 100003 + i)
                record.save(i, block, names, {"block": i, **stats})
                bar.set_postfix(mse=f"{stats['mse_before']:.3g}->{stats['mse_after']:.3g}")
                if opts.inputs == "recovered":  # the tuned block's outputs on its inputs: the next block's inputs
                    state.hidden = outs
            if resumed or opts.inputs == "dense":
                state.hidden = runner.run_block(i, state)
        dense_hidden = targets
    stats = record.blocks
    return {"mode": "blockwise", "settings": dataclasses.asdict(opts), "seconds": round(time.perf_counter() - t0, 3),
            "blocks": stats, "autocast": None if amp is None else str(amp).replace("torch.", "")}


def _tune_block(runner, index, block, linears, params, inputs, state, targets, opts: BlockwiseOptions, amp,
                seed) -> tuple[dict, list[torch.Tensor]]:
    kwargs = state.of_block(index)
    before = runner.run_block(index, state, hidden=inputs)
    mse_before = _mse(before, targets)
    original = [p.detach().clone() for p in params]
    mask = FixedMask(linears)
    flags = [p.requires_grad for p in block.parameters()]
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    mp = MasterWeights({str(i): p for i, p in enumerate(params)}, mask)  # fp32 masters of a bf16/fp16 block
    opt = torch.optim.Adam(list(mp.masters.values()), lr=opts.lr)
    gen = torch.Generator().manual_seed(seed)
    dev = runner.device
    losses = []
    total = opts.epochs * len(inputs)
    try:
        for _ in range(opts.epochs):
            for j in torch.randperm(len(inputs), generator=gen).tolist():
                if opts.schedule == "cosine":
                    for group in opt.param_groups:
                        group["lr"] = opts.lr * 0.5 * (1 + math.cos(math.pi * len(losses) / total))
                with autocast(dev, amp):
                    out = runner.call(index, inputs[j], kwargs[j])
                loss = F.mse_loss(out.float(), targets[j].to(dev).float())
                if not torch.isfinite(loss):
                    with torch.no_grad():
                        for p, o in zip(params, original):
                            p.copy_(o)
                    raise NumericalError(f"block-wise recovery: the loss of block {index} became {float(loss)}; "
                                         "the block is restored. Lower recover.blockwise.lr or use dtype float32")
                mp.backward(loss)
                mp.step(opt)  # masked on the fp32 masters, rounded once into the block
                losses.append(float(loss.detach()))
    finally:
        for p, f in zip(block.parameters(), flags):
            p.requires_grad_(f)
        del opt
    after = runner.run_block(index, state, hidden=inputs)
    mse_after = _mse(after, targets)
    kept = mse_after < mse_before
    if not kept:  # never hand back a block that matches the dense one worse than before
        with torch.no_grad():
            for p, o in zip(params, original):
                p.copy_(o)
        mse_after, after = mse_before, before
    return ({"mse_before": mse_before, "mse_after": mse_after, "kept": kept, "steps": len(losses),
             "master_weights": mp.active, "skipped_steps": mp.skipped,
             "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}, after)

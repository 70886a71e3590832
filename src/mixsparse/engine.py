"""Layer-wise execution: one decoder block on the device at a time (as SparseGPT/Wanda do).

:class:`LayerwiseRunner` catches the inputs of the first block once (hidden states plus whatever
keyword arguments the model passes its blocks: masks, rotary embeddings, positions), then runs the
blocks one by one, keeping activations on the CPU between blocks when ``offload`` is set. The same
runner serves pruning, statistics collection and evaluation of models larger than the device.

:func:`prune_layerwise` is the pruning engine. It knows no pruner by name: it asks the registry for a
:class:`~mixsparse.pruners.LayerPruner`, feeds it each linear's inputs through forward hooks, and
writes back the weight it computes for the layer's target from the :class:`SparsityMap`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import batches as split_batches
from .errors import DataError, SparsityError
from .modeling import block_linears, find_decoder_blocks, take_placement
from .placement import Placement
from .pruners import LayerPruner, get_pruner
from .sparsity import SparsityMap, sparsity_of, weighted_average

log = logging.getLogger(__name__)


class _InputsCaught(Exception):
    """Raised by :class:`_Catcher` to stop the model's forward right after the first block's input."""


class _BlockProxy(nn.Module):
    """Stands in for a decoder block; attribute look-ups fall through to the real block, because
    some models read attributes such as ``attention_type`` off their blocks while looping."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


class _Catcher(_BlockProxy):
    def __init__(self, block: nn.Module, sink: list):
        super().__init__(block)
        self.sink = sink

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        if rest:
            raise TypeError(f"{type(self.block).__name__} got unexpected positional arguments; cannot catch inputs")
        self.sink.append((hidden, kwargs))
        raise _InputsCaught


class _Replay(_BlockProxy):
    """Returns stored final hidden states instead of computing the block (to reuse the model's own
    head: final norm + lm_head, whatever they are called in this architecture)."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor | None, as_tuple: bool):
        super().__init__(block)
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args, **kwargs):
        h = self.hidden if self.hidden is not None else (args[0] if args else kwargs["hidden_states"])
        return (h,) if self.as_tuple else h


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockInputs:
    """Activations entering the current block: one tensor (batch, seq, hidden) per calibration batch,
    with the keyword arguments the model passed its blocks for that batch."""

    input_ids: list[torch.Tensor]
    hidden: list[torch.Tensor]
    kwargs: list[dict]


class LayerwiseRunner:
    """Runs a model block by block. The caller holds :meth:`Placement.stage` around the whole use, so
    whatever this moves to the device goes back home when the stage ends."""

    def __init__(self, model: nn.Module, device: "str | torch.device | Placement | None" = None, offload: bool = True):
        self.model = model
        take_placement(model)  # a device_map-dispatched model is gathered on the CPU; offloaded weights are refused
        self.blocks_name, self.blocks = find_decoder_blocks(model)
        self.placement = device if isinstance(device, Placement) else Placement(
            torch.device(device) if device is not None else next(model.parameters()).device, "blockwise", offload)
        self.device = self.placement.device
        self.store = self.placement.store
        self.block_returns_tuple: bool | None = None

    # --- placement -------------------------------------------------------------------------
    def _non_block_modules(self) -> Iterator[nn.Module]:
        inside = {id(m) for m in self.blocks.modules()}
        for m in self.model.modules():
            if id(m) not in inside and (any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))):
                yield m

    def _place_non_blocks(self, device: torch.device) -> None:
        for m in self._non_block_modules():
            m.to(device)

    @contextlib.contextmanager
    def _swapped_blocks(self, make: Callable[[int, nn.Module], nn.Module]):
        originals = list(self.blocks)
        try:
            for i, b in enumerate(originals):
                self.blocks[i] = make(i, b)
            yield
        finally:
            for i, b in enumerate(originals):
                self.blocks[i] = b

    # --- steps -----------------------------------------------------------------------------
    def _call_model(self, params: dict | None, **kwargs):
        """The model's forward; with ``params`` (device tensors by qualified name) through
        ``functional_call``, so nothing of the model moves."""
        if params is None:
            return self.model(**kwargs)
        return torch.func.functional_call(self.model, params, (), kwargs, strict=False)

    @torch.no_grad()
    def catch(self, batches: Sequence[torch.Tensor], params: dict | None = None,
              attention_masks: Sequence[torch.Tensor] | None = None) -> BlockInputs:
        """Run the model up to the first block for every batch of token ids; keep what enters it.
        ``params``: the non-block tensors already on the device (else the non-block modules are moved
        there; the caller's :meth:`Placement.stage` moves them back)."""
        if len(batches) == 0:
            raise DataError("no calibration/evaluation batches were given")
        if params is None:
            self._place_non_blocks(self.device)
        sink: list = []
        state = BlockInputs([], [], [])
        with self._swapped_blocks(lambda i, b: _Catcher(b, sink) if i == 0 else b):
            for j, ids in enumerate(batches):
                sink.clear()
                extra = {} if attention_masks is None else {"attention_mask": attention_masks[j].to(self.device)}
                try:
                    self._call_model(params, input_ids=ids.to(self.device), use_cache=False, **extra)
                except _InputsCaught:
                    pass
                if not sink:
                    raise RuntimeError(f"{type(self.model).__name__} never called its first decoder block")
                hidden, kwargs = sink[0]
                kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
                kwargs["use_cache"] = False
                state.input_ids.append(ids.cpu())
                state.hidden.append(hidden.to(self.store))
                state.kwargs.append(_to(kwargs, self.store))
        return state

    @torch.no_grad()
    def run_block(self, block: nn.Module, state: BlockInputs) -> list[torch.Tensor]:
        """Forward every batch through ``block`` (already on the device); outputs go to storage."""
        outs = []
        for h, kw in zip(state.hidden, state.kwargs):
            out = block(h.to(self.device), **_to(kw, self.device))
            if self.block_returns_tuple is None:
                self.block_returns_tuple = isinstance(out, (tuple, list))
            outs.append(_first_output(out).to(self.store))
        return outs

    @torch.no_grad()
    def logits(self, state: BlockInputs) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(input_ids, logits)`` per batch from final hidden states, through the model's own head."""
        for ids, h in zip(state.input_ids, state.hidden):
            yield ids, self.head_logits(ids, h)

    def head_logits(self, input_ids: torch.Tensor, hidden: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        """Logits of one batch from its final hidden states, under the caller's grad mode.

        Unlike :meth:`logits` this does not disable autograd, so a loss on the result can be
        differentiated with respect to ``hidden`` (the Fisher computation needs d loss / d h_final).
        """
        if params is None:
            self._place_non_blocks(self.device)
        as_tuple = bool(self.block_returns_tuple)
        with self._swapped_blocks(lambda i, b: _Replay(b, hidden.to(self.device) if i == 0 else None, as_tuple)):
            return self._call_model(params, input_ids=input_ids.to(self.device), use_cache=False).logits

    def on_device(self, block: nn.Module):
        return self.placement.block(block)

    def forward_all(self, batches: Sequence[torch.Tensor], progress: bool = False,
                    attention_masks: Sequence[torch.Tensor] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Layer-by-layer forward of whole batches: ``(input_ids, logits)`` per batch (the model is
        back at its home when the generator finishes or is closed)."""
        with Placement.stage(self.model):
            state = self.catch(batches, attention_masks=attention_masks)
            for block in tqdm(self.blocks, desc="blocks", disable=not progress, leave=False):
                with self.on_device(block):
                    state.hidden = self.run_block(block, state)
            yield from self.logits(state)


@dataclass
class PruneReport:
    pruner: str
    requested: dict[str, float | str]
    achieved: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    quantized: dict[str, Any] = field(default_factory=dict)  # codes of layers a pruner also quantized

    def overall(self, param_counts: dict[str, int]) -> float:
        return weighted_average(self.achieved, param_counts)


def prune_layerwise(
    model: nn.Module,
    calib_ids: torch.Tensor | None,
    targets: SparsityMap,
    pruner: str = "wanda",
    pruner_options: dict | None = None,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    offload: bool = True,
    sequential: bool = True,
    on_layer: Callable[[str, LayerPruner], None] | None = None,
    progress: bool = True,
) -> PruneReport:
    """Prune ``model`` in place, block by block.

    ``targets`` maps qualified linear names to their sparsity; layers not in it stay dense. With
    ``sequential`` (default) each block is calibrated on the outputs of the already-pruned blocks
    before it; otherwise on dense activations. ``on_layer(name, pruner)`` is called once a layer's
    statistics are complete and before it is pruned (the search uses it to cache every level).
    """
    with Placement.stage(model):
        return _prune_layerwise(model, calib_ids, targets, pruner, pruner_options, device=device, batch_size=batch_size,
                                offload=offload, sequential=sequential, on_layer=on_layer, progress=progress)


def _prune_layerwise(model, calib_ids, targets, pruner, pruner_options, *, device, batch_size, offload, sequential,
                     on_layer, progress) -> PruneReport:
    cls = get_pruner(pruner)
    options = cls.make_options(pruner_options)
    runner = LayerwiseRunner(model, device=device, offload=offload)
    blocks_name = runner.blocks_name
    known = {f"{blocks_name}.{i}.{n}": lin for i, b in enumerate(runner.blocks) for n, lin in block_linears(b).items()}
    unknown = sorted(set(targets) - set(known))
    if unknown:
        raise SparsityError(f"sparsity map names layers this model does not have: {', '.join(unknown[:5])}")
    targets.check_divisible({n: known[n].in_features for n in targets})

    report = PruneReport(pruner, targets.to_dict(), {})
    t_start = time.perf_counter()
    needs_data = cls.needs_inputs or on_layer is not None
    if needs_data and calib_ids is None:
        raise DataError(f"pruner {pruner!r} needs calibration data")
    state = runner.catch(split_batches(calib_ids, batch_size)) if needs_data else None

    bar = tqdm(list(enumerate(runner.blocks)), desc=f"prune[{pruner}]", disable=not progress)
    for i, block in bar:
        names = {n: f"{blocks_name}.{i}.{n}" for n in block_linears(block)}
        active = {short: full for short, full in names.items() if full in targets or on_layer is not None}
        if not active:
            if state is not None:
                with runner.on_device(block):
                    state.hidden = runner.run_block(block, state)
            continue
        with runner.on_device(block):
            lin = block_linears(block)
            pruners = {short: cls(lin[short], options, layer_name=full) for short, full in active.items()}
            if state is not None:
                hooks = [
                    lin[short].register_forward_hook(lambda m, inp, out, p=p: p.add_batch(inp[0]))
                    for short, p in pruners.items()
                ]
                try:
                    outs = runner.run_block(block, state)
                finally:
                    for h in hooks:
                        h.remove()
            for short, p in pruners.items():
                full = active[short]
                if on_layer is not None:
                    on_layer(full, p)
                if full in targets and (sparsity_of(targets[full]) > 0 or p.changes_unpruned()):
                    t0 = time.perf_counter()
                    res = p.compute(targets[full])
                    lin[short].weight.data.copy_(res.weight)
                    if res.quantized is not None:
                        report.quantized[full] = res.quantized.cpu()
                    report.seconds[full] = time.perf_counter() - t0
                w = lin[short].weight.data
                if full in targets:
                    report.achieved[full] = float((w == 0).sum().item()) / w.numel()
                p.free()
            if state is not None:
                state.hidden = runner.run_block(block, state) if sequential else outs
        bar.set_postfix(block=i)
    report.total_seconds = time.perf_counter() - t_start
    return report

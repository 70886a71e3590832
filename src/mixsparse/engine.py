"""Layer-wise execution: one decoder block on the device at a time (as SparseGPT/Wanda do).

:class:`LayerwiseRunner` catches the inputs of the first block once (hidden states plus whatever
keyword arguments the model passes its blocks: masks, rotary embeddings, positions), then runs the
blocks one by one, keeping activations on the CPU between blocks when ``offload`` is set. The same
runner serves pruning, statistics collection and evaluation of models larger than the device.

:func:`prune_layerwise` is the pruning engine. It knows no pruner by name: it asks the registry for a
:class:`~mixsparse.pruners.LayerPruner`, feeds it each linear's inputs through forward hooks, and
writes back the weight it computes for the layer's target from the :class:`SparsityMap`. The hooks are
the engine's one calibrate/observe step (:func:`calibrated_blocks`), which :func:`observe_layerwise`
also offers without pruning: OWL's activation statistics and the search's level database use it. Both
see the prunable linears only (``ArchSpec.skip`` honoured).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import batches as split_batches
from .errors import DataError, SparsityError
from .modeling import find_decoder_blocks, prunable_linears, take_placement, zero_fraction
from .names import block_index
from .placement import Placement
from .pruners import get_pruner
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


class Observer(Protocol):
    """Collects statistics of one linear layer's inputs (a :class:`LayerPruner` is one)."""

    def add_batch(self, inp: torch.Tensor) -> None: ...


def block_layers(model: nn.Module, runner: "LayerwiseRunner", wanted: Iterable[str] | None) -> list[dict[str, nn.Linear]]:
    """Per block, the prunable linears (``ArchSpec.skip`` honoured) to observe: all, or those in ``wanted``."""
    prunable = prunable_linears(model)
    if wanted is not None:
        wanted = set(wanted)
        unknown = sorted(wanted - set(prunable))
        if unknown:
            raise SparsityError(f"sparsity map names layers this model does not have (or does not prune): "
                                f"{', '.join(unknown[:5])}")
    per_block: list[dict[str, nn.Linear]] = [{} for _ in runner.blocks]
    for name, lin in prunable.items():
        if wanted is None or name in wanted:
            per_block[block_index(name, runner.blocks_name)][name] = lin
    return per_block


def calibrated_blocks(runner: "LayerwiseRunner", state: BlockInputs | None, per_block: list[dict[str, nn.Linear]],
                       make: Callable[[str, nn.Linear], Observer], sequential: bool, progress: bool, desc: str
                       ) -> Iterator[tuple[int, dict[str, nn.Linear], dict[str, Observer]]]:
    """The engine's calibrate/observe step, shared by pruning and every statistics pass: for each block (on
    the device for the duration), hooks feed each wanted linear's inputs to its observer during one forward
    of the calibration batches, then ``(index, linears, observers)`` is yielded so the caller can read the
    statistics and change the weights; the block's outputs then feed the next block (recomputed with the
    changed weights when ``sequential``, else the outputs seen while observing). ``state`` None: no data."""
    bar = tqdm(list(enumerate(runner.blocks)), desc=desc, disable=not progress)
    for i, block in bar:
        linears = per_block[i]
        if not linears:
            if state is not None:
                with runner.on_device(block):
                    state.hidden = runner.run_block(block, state)
            continue
        with runner.on_device(block):
            observers = {name: make(name, lin) for name, lin in linears.items()}
            outs = None
            if state is not None:
                hooks = [lin.register_forward_hook(lambda m, inp, out, o=observers[name]: o.add_batch(inp[0]))
                         for name, lin in linears.items()]
                try:
                    outs = runner.run_block(block, state)
                finally:
                    for h in hooks:
                        h.remove()
            yield i, linears, observers
            if state is not None:
                state.hidden = runner.run_block(block, state) if sequential else outs
        bar.set_postfix(block=i)


def observe_layerwise(
    model: nn.Module,
    calib_ids: torch.Tensor,
    make: Callable[[str, nn.Linear], Observer],
    on_layer: Callable[[str, Observer], None],
    *,
    layers: Iterable[str] | None = None,
    device: "str | torch.device | Placement | None" = None,
    batch_size: int = 1,
    offload: bool = True,
    progress: bool = False,
    desc: str = "observe",
) -> None:
    """Statistics of every prunable linear (or of ``layers``) on the dense model, block by block, nothing
    changed: ``make(name, linear)`` builds an observer fed the layer's calibration inputs, and
    ``on_layer(name, observer)`` is called once its statistics are complete (while its block is on the
    device). OWL's outlier ratios and the search's level database are built this way."""
    if calib_ids is None:
        raise DataError("observing layer inputs needs calibration data")
    with Placement.stage(model):
        runner = LayerwiseRunner(model, device=device, offload=offload)
        per_block = block_layers(model, runner, layers)
        state = runner.catch(split_batches(calib_ids, batch_size))
        with contextlib.closing(calibrated_blocks(runner, state, per_block, make, False, progress, desc)) as blocks:
            for _, _, observers in blocks:
                for name, obs in observers.items():
                    on_layer(name, obs)


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
    progress: bool = True,
) -> PruneReport:
    """Prune ``model`` in place, block by block.

    ``targets`` maps qualified linear names to their sparsity; layers not in it stay dense. With
    ``sequential`` (default) each block is calibrated on the outputs of the already-pruned blocks
    before it; otherwise on dense activations.
    """
    with Placement.stage(model):
        return _prune_layerwise(model, calib_ids, targets, pruner, pruner_options, device=device, batch_size=batch_size,
                                offload=offload, sequential=sequential, progress=progress)


def _prune_layerwise(model, calib_ids, targets, pruner, pruner_options, *, device, batch_size, offload, sequential,
                     progress) -> PruneReport:
    cls = get_pruner(pruner)
    make = cls.factory(pruner_options)
    runner = LayerwiseRunner(model, device=device, offload=offload)
    per_block = block_layers(model, runner, targets)
    targets.check_divisible({n: lin.in_features for layers in per_block for n, lin in layers.items()})

    report = PruneReport(pruner, targets.to_dict(), {})
    t_start = time.perf_counter()
    if cls.needs_inputs and calib_ids is None:
        raise DataError(f"pruner {pruner!r} needs calibration data")
    state = runner.catch(split_batches(calib_ids, batch_size)) if cls.needs_inputs else None
    blocks = calibrated_blocks(runner, state, per_block, make, sequential, progress, f"prune[{pruner}]")
    with contextlib.closing(blocks):  # an error mid-block sends the block home now, not when the traceback dies
        for _, linears, pruners in blocks:
            for name, p in pruners.items():
                lin = linears[name]
                if sparsity_of(targets[name]) > 0 or p.changes_unpruned():
                    t0 = time.perf_counter()
                    res = p.compute(targets[name])
                    lin.weight.data.copy_(res.weight)
                    if res.quantized is not None:
                        report.quantized[name] = res.quantized.cpu()
                    report.seconds[name] = time.perf_counter() - t0
                report.achieved[name] = zero_fraction(lin.weight.data)
                p.free()
    report.total_seconds = time.perf_counter() - t_start
    return report

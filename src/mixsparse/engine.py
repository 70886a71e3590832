"""Layer-wise pruning: one decoder block on the device at a time (as SparseGPT/Wanda do).

Blocks are run by :class:`~mixsparse.runner.LayerwiseRunner` (the one block runner: each block gets the
arguments the model's own forward gives it), keeping activations on the CPU between blocks when
``offload`` is set.

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
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import batches as split_batches
from .errors import DataError, SparsityError
from .experts import observing
from .modeling import prunable_linears, zero_fraction
from .names import block_index
from .placement import Placement
from .pruners import get_pruner
from .runner import BlockInputs, LayerwiseRunner  # noqa: F401  (BlockInputs: re-exported for callers)
from .sparsity import SparsityMap, sparsity_of, weighted_average

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    pruner: str
    requested: dict[str, float | str]
    achieved: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    quantized: dict[str, Any] = field(default_factory=dict)  # codes of layers a pruner also quantized
    #: layers pruned without their statistics (too few calibration tokens: a rarely routed expert)
    fallbacks: dict[str, dict] = field(default_factory=dict)

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
                    state.hidden = runner.run_block(i, state)
            continue
        with runner.on_device(block):
            observers = {name: make(name, lin) for name, lin in linears.items()}
            outs = None
            if state is not None:
                hooks = [lin.register_forward_hook(lambda m, inp, out, o=observers[name]: o.add_batch(inp[0]))
                         for name, lin in linears.items()]
                try:
                    with observing(linears.values()):  # fused experts: each expert's matrices see its routed tokens
                        outs = runner.run_block(i, state)
                finally:
                    for h in hooks:
                        h.remove()
            yield i, linears, observers
            if state is not None:
                state.hidden = runner.run_block(i, state) if sequential else outs
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
    min_token_share: float = 0.005,
    layer_options: Mapping[str, dict] | None = None,
) -> PruneReport:
    """Prune ``model`` in place, block by block.

    ``targets`` maps qualified linear names to their sparsity; layers not in it stay dense. With
    ``sequential`` (default) each block is calibrated on the outputs of the already-pruned blocks
    before it; otherwise on dense activations. A layer whose inputs held fewer than ``min_token_share``
    of the calibration tokens (an expert the router rarely picks; at least one token is always needed)
    is pruned by its pruner's data-free :meth:`~mixsparse.pruners.LayerPruner.fallback`, recorded in
    :attr:`PruneReport.fallbacks`. ``layer_options``: per-layer options over ``pruner_options`` (a joint search's
    bit width per layer).
    """
    with Placement.stage(model):
        return _prune_layerwise(model, calib_ids, targets, pruner, pruner_options, device=device, batch_size=batch_size,
                                offload=offload, sequential=sequential, progress=progress,
                                min_token_share=min_token_share, layer_options=layer_options)


def min_tokens(calib_ids: torch.Tensor | None, share: float) -> int:
    """Fewest calibration tokens a layer's statistics may rest on: ``share`` of them, at least one."""
    if not 0.0 <= share < 1.0:
        raise SparsityError(f"min_token_share must be in [0, 1), got {share}")
    return 0 if calib_ids is None else max(1, math.ceil(share * calib_ids.numel()))


def _prune_layerwise(model, calib_ids, targets, pruner, pruner_options, *, device, batch_size, offload, sequential,
                     progress, min_token_share, layer_options=None) -> PruneReport:
    cls = get_pruner(pruner)
    least = min_tokens(calib_ids, min_token_share)
    default = cls.factory(pruner_options, least)
    makers = {n: cls.factory({**(pruner_options or {}), **o}, least) for n, o in (layer_options or {}).items()}

    def make(name: str, layer: nn.Module):
        return makers.get(name, default)(name, layer)
    runner = LayerwiseRunner(model, device=device, offload=offload)
    runner.writes = True  # a streamed model's pruned blocks go back to disk
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
                    res = p.prune(targets[name])
                    if p.starved:
                        report.fallbacks[name] = {"tokens": p.nsamples, "min_tokens": p.min_tokens,
                                                  "fallback": "magnitude per row" + (" + rtn" if res.quantized is not None else "")}
                    lin.weight.data.copy_(res.weight)
                    if res.quantized is not None:
                        report.quantized[name] = res.quantized.cpu()
                    report.seconds[name] = time.perf_counter() - t0
                report.achieved[name] = zero_fraction(lin.weight.data)
                p.free()
    report.total_seconds = time.perf_counter() - t_start
    return report

"""The one block runner: calls each decoder block exactly as the model's own forward calls it.

Models no longer give every block the same arguments: hybrid-attention models (Gemma-2/3, Cohere2,
GPT-OSS, Mistral/Qwen with sliding windows) pass a sliding-window mask to some layers and a full mask to
others, and Gemma-3 passes local and global rotary embeddings. Replaying block 0's arguments to every
block (what GPTQ-style loops do) silently computes another model.

So :meth:`LayerwiseRunner.catch` runs the model's own forward once per batch with every block replaced by
a *recorder*: a pass-through that stores the arguments the model hands that block and returns its input
unchanged, so the model's loop computes each layer's mask and position embeddings itself without any
block's compute (the last recorder stops the forward before the head). Tensors shared between blocks
(the same mask or rotary tables) are stored once. Models whose loop carries state from block to block
beyond the hidden states (shared KV caches, per-layer inputs) cannot be replayed this way: the block
runner's layer-wise logits must equal the whole-model forward, which ``tests/test_architectures.py``
checks per family.

Every stage (pruning statistics, the level database, the search's fitness, the Fisher trace, block-wise
recovery, GPTQ, layer-wise evaluation) calls blocks through :meth:`LayerwiseRunner.call` or
:meth:`LayerwiseRunner.run_block`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import DataError, ModelLoadError
from .modeling import find_decoder_blocks, take_placement
from .placement import Placement

_DROPPED = ("past_key_values", "past_key_value", "cache_params", "cache")  # the KV cache, by each name transformers has given it


class _InputsCaught(Exception):
    """Raised by the last recorder: the forward stops before the model's head."""


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


def _hidden_and_kwargs(block: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """The hidden states and every other argument by name (positional ones named from the block's signature)."""
    kwargs = dict(kwargs)
    if args:
        hidden, rest = args[0], args[1:]
    else:
        hidden, rest = kwargs.pop("hidden_states"), ()
    if rest:
        params = [p.name for p in inspect.signature(block.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
        if len(rest) > len(params):
            raise TypeError(f"{type(block).__name__} got {len(rest)} extra positional arguments; cannot name them")
        kwargs.update(zip(params, rest))
    return hidden, kwargs


class _Recorder(_BlockProxy):
    """Stores the arguments block ``index`` receives and passes its input through unchanged."""

    def __init__(self, block: nn.Module, index: int, sink: dict, last: bool, as_tuple: Callable[[], bool]):
        super().__init__(block)
        self.index, self.sink, self.last, self.as_tuple = index, sink, last, as_tuple

    def forward(self, *args, **kwargs):
        hidden, kw = _hidden_and_kwargs(self.block, args, kwargs)
        self.sink[self.index] = (hidden, kw)
        if self.last:
            raise _InputsCaught
        return (hidden,) if self.as_tuple() else hidden


class _Replay(_BlockProxy):
    """Returns stored final hidden states instead of computing the block (to reuse the model's own
    head: final norm + lm_head, whatever they are called in this architecture)."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor | None, as_tuple: bool):
        super().__init__(block)
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args, **kwargs):
        h = self.hidden if self.hidden is not None else (args[0] if args else kwargs["hidden_states"])
        return (h,) if self.as_tuple else h


def to_device(obj: Any, device: torch.device, memo: dict | None = None) -> Any:
    """``obj`` (tensors in tuples, lists, dicts) on ``device``; with ``memo``, a tensor met twice moves once."""
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # keep obj alive: its id must not be reused
        return memo[id(obj)][1]
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    return obj


def first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockInputs:
    """Activations entering the current block: one tensor (batch, seq, hidden) per calibration batch, and
    per batch the keyword arguments the model passes *each* block (``kwargs[batch][block]``)."""

    input_ids: list[torch.Tensor]
    hidden: list[torch.Tensor]
    kwargs: list[list[dict]]

    def of_block(self, i: int) -> list[dict]:
        """Per batch, the arguments of block ``i``."""
        return [per_block[i] for per_block in self.kwargs]


class LayerwiseRunner:
    """Runs a model block by block. The caller holds :meth:`Placement.stage` around the whole use, so
    whatever this moves to the device goes back home when the stage ends."""

    def __init__(self, model: nn.Module, device: "str | torch.device | Placement | None" = None, offload: bool = True):
        self.model = model
        take_placement(model)  # a device_map-dispatched model is gathered on the CPU; offloaded weights are refused
        self.blocks_name, self.blocks = find_decoder_blocks(model)
        self.placement = Placement.resolve(device, "blockwise", model, offload=offload)
        self.device = self.placement.device
        self.store = self.placement.store
        self.block_returns_tuple: bool | None = None
        from .streaming import stream_of

        # a model larger than RAM: blocks are read from its checkpoint when placed (mixsparse.streaming); a stage
        # that changes weights sets ``writes`` so that each block is written back before it is dropped
        self.stream = stream_of(model)
        self.writes = False
        self._index = {id(b): i for i, b in enumerate(self.blocks)}

    # --- placement -------------------------------------------------------------------------
    def _non_block_modules(self) -> Iterator[nn.Module]:
        inside = {id(m) for m in self.blocks.modules()}
        for m in self.model.modules():
            if id(m) not in inside and (any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))):
                yield m

    def _place_non_blocks(self, device: torch.device) -> None:
        for m in self._non_block_modules():
            m.to(device)
            self.placement.upcast(m, recurse=False)  # its own tensors; back home when Placement.stage ends

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

    def _call_model(self, params: dict | None, **kwargs):
        """The model's forward; with ``params`` (device tensors by qualified name) through
        ``functional_call``, so nothing of the model moves."""
        if params is None:
            return self.model(**kwargs)
        return torch.func.functional_call(self.model, params, (), kwargs, strict=False)

    # --- steps -----------------------------------------------------------------------------
    @torch.no_grad()
    def _learn_output_form(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict, params: dict | None) -> None:
        """Whether blocks return a tuple (older layouts) or the hidden states alone: block 0 is run once."""
        if params is None:  # the non-block modules were placed: place the block too
            with self.on_device(block, write=False):
                out = block(hidden, **kwargs)
        else:  # the caller holds device copies of the non-block tensors only (the fitness): the block's own
            # tensors, in the dtype the caller computes in (e.g. a float32 fitness of a bf16 model)
            with self.readable(0):
                tensors = {n: t.to(self.device, dtype=hidden.dtype if t.is_floating_point() else t.dtype)
                           for n, t in [*block.named_parameters(), *block.named_buffers()]}
            out = torch.func.functional_call(block, tensors, (hidden,), kwargs, strict=False)
        self.block_returns_tuple = isinstance(out, (tuple, list))

    @torch.no_grad()
    def catch(self, batches: Sequence[torch.Tensor], params: dict | None = None,
              attention_masks: Sequence[torch.Tensor] | None = None) -> BlockInputs:
        """Run the model's forward for every batch of token ids with every block recorded, not computed:
        keep what enters block 0 and the arguments the model gives each block. ``params``: the non-block
        tensors already on the device (else the non-block modules are moved there; the caller's
        :meth:`Placement.stage` moves them back)."""
        if len(batches) == 0:
            raise DataError("no calibration/evaluation batches were given")
        if params is None:
            self._place_non_blocks(self.device)
        n = len(self.blocks)
        sink: dict[int, tuple] = {}
        block0 = self.blocks[0]

        def as_tuple() -> bool:  # asked by a recorder whose output the model's loop is about to read
            if self.block_returns_tuple is None:
                self._learn_output_form(block0, sink[0][0], _clean(sink[0][1]), params)
            return self.block_returns_tuple

        state = BlockInputs([], [], [])
        with self._swapped_blocks(lambda i, b: _Recorder(b, i, sink, i == n - 1, as_tuple)):
            for j, ids in enumerate(batches):
                sink.clear()
                extra = {} if attention_masks is None else {"attention_mask": attention_masks[j].to(self.device)}
                try:
                    self._call_model(params, input_ids=ids.to(self.device), use_cache=False, **extra)
                except _InputsCaught:
                    pass
                if len(sink) != n:
                    missing = sorted(set(range(n)) - set(sink))
                    if not sink:
                        raise ModelLoadError(f"{type(self.model).__name__} never called its first decoder block")
                    raise ModelLoadError(f"{type(self.model).__name__} did not call decoder block(s) {missing[:5]} in "
                                         "its forward; its blocks cannot be run one by one")
                memo: dict = {}  # a batch's tensors shared by several blocks (masks, rotary tables) are stored once
                state.input_ids.append(ids.cpu())
                state.hidden.append(sink[0][0].to(self.store))
                state.kwargs.append([to_device(_clean(sink[i][1]), self.store, memo) for i in range(n)])
        return state

    def call(self, i: int, hidden: torch.Tensor, kwargs: dict, params: dict | None = None,
             block: nn.Module | None = None) -> torch.Tensor:
        """Block ``i`` (or ``block`` standing in for it, e.g. a dense copy) on ``hidden`` with block ``i``'s
        own arguments, under the caller's grad mode; ``params``: the block's tensors by local name (through
        ``functional_call``: nothing of the module moves). Returns the block's hidden-state output on the device."""
        block = self.blocks[i] if block is None else block
        args, kw = (hidden.to(self.device),), to_device(kwargs, self.device)
        out = block(*args, **kw) if params is None else torch.func.functional_call(block, params, args, kw, strict=False)
        if self.block_returns_tuple is None:
            self.block_returns_tuple = isinstance(out, (tuple, list))
        return first_output(out)

    @torch.no_grad()
    def run_block(self, i: int, state: BlockInputs, params: dict | None = None,
                  block: nn.Module | None = None, hidden: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Every batch through block ``i`` (already on the device, or given as ``params``); outputs go to
        storage. ``hidden``: other inputs than ``state.hidden`` (e.g. the dense stream)."""
        hidden = state.hidden if hidden is None else hidden
        return [self.call(i, h, kw, params, block).to(self.store) for h, kw in zip(hidden, state.of_block(i))]

    @torch.no_grad()
    def logits(self, state: BlockInputs) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(input_ids, logits)`` per batch from final hidden states, through the model's own head."""
        for ids, h in zip(state.input_ids, state.hidden):
            yield ids, self.head_logits(ids, h)

    def head_logits(self, input_ids: torch.Tensor, hidden: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        """Logits of one batch from its final hidden states, under the caller's grad mode (the Fisher
        computation differentiates a loss on the result with respect to ``hidden``)."""
        if params is None:
            self._place_non_blocks(self.device)
        as_tuple = bool(self.block_returns_tuple)
        with self._swapped_blocks(lambda i, b: _Replay(b, hidden.to(self.device) if i == 0 else None, as_tuple)):
            return self._call_model(params, input_ids=input_ids.to(self.device), use_cache=False).logits

    @contextlib.contextmanager
    def readable(self, i: int) -> Iterator[None]:
        """Block ``i``'s weights readable where they are for the duration: a streamed block at rest is read from
        the checkpoint and dropped after, unchanged (tensors taken from it meanwhile stay valid)."""
        if self.stream is None or i in self.stream.live:
            yield
            return
        self.stream.materialise(i)
        try:
            yield
        finally:
            self.stream.release(i, write=False)

    def on_device(self, block: nn.Module, write: bool | None = None):
        """``block`` on the device for the duration (read from the checkpoint first when streamed; written back
        after when the stage ``writes``)."""
        if self.stream is not None:
            return self.stream.placed(self._index[id(block)], self.placement, self.writes if write is None else write)
        return self.placement.block(block)

    def forward_all(self, batches: Sequence[torch.Tensor], progress: bool = False,
                    attention_masks: Sequence[torch.Tensor] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Layer-by-layer forward of whole batches: ``(input_ids, logits)`` per batch (the model is
        back at its home when the generator finishes or is closed)."""
        with Placement.stage(self.model):
            state = self.catch(batches, attention_masks=attention_masks)
            for i, block in enumerate(tqdm(self.blocks, desc="blocks", disable=not progress, leave=False)):
                with self.on_device(block):
                    state.hidden = self.run_block(i, state)
            yield from self.logits(state)


def _clean(kwargs: dict) -> dict:
    """A block's arguments for replay: no cache (each block runs once per batch), ``use_cache`` off."""
    kw = {k: v for k, v in kwargs.items() if k not in _DROPPED}
    if "use_cache" in kw or any(k in kwargs for k in _DROPPED):
        kw["use_cache"] = False
    return kw

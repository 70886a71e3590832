"""Fused MoE experts as prunable units: one matrix of one expert is a layer like any ``nn.Linear``.

transformers 5 stores a MoE block's experts as 3-D parameters (Mixtral, Qwen3-MoE, GPT-OSS, DeepSeek-V3...):
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, or transposed (``[E, in, out]``, GPT-OSS) when the
class says ``is_transposed``. Those classes follow one contract (``transformers.integrations.moe``:
``num_experts``, ``has_gate``, ``has_bias``, ``is_transposed``, ``_apply_gate``, ``act_fn``), which is
what lets transformers swap their kernel (``grouped_mm``, ``batched_mm``); mixsparse reads the same
contract, so every model whose experts transformers can dispatch is covered without a per-model script.

* :class:`ExpertMatrix` is expert ``e``'s slice of one fused parameter, seen as a linear layer
  (``weight`` ``[out, in]``, ``in_features``, ``bias``): pruners, the level database, GPTQ and the
  measurements take it like an ``nn.Linear``. Its name is ``<experts>.<param>[e]``, e.g.
  ``model.layers.3.mlp.experts.down_proj[5]``. It is not a submodule of the model: the model's modules,
  state dict and saved checkpoints are unchanged, and its weight is read from the fused parameter on every
  access (so it follows the block to the device and back).
* Statistics must come from the tokens routed to each expert, but the fused kernels run all experts in
  one call that no per-expert hook sees. :func:`observing` therefore swaps the experts' forward, for one
  observation pass, for a per-expert loop on the same contract that calls each :class:`ExpertMatrix`
  (whose forward hooks then see exactly that expert's tokens). Its output is checked against the model's
  own experts forward on the first batch, so a class that breaks the contract fails loudly instead of
  calibrating on another model.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelLoadError

_CONTRACT = ("num_experts", "has_gate", "is_transposed")


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a fused experts module mixsparse can prune (transformers' experts contract)."""
    if not all(hasattr(module, a) for a in _CONTRACT):
        return False
    up = "gate_up_proj" if module.has_gate else "up_proj"
    return all(isinstance(getattr(module, a, None), nn.Parameter) and getattr(module, a).dim() == 3
               for a in (up, "down_proj"))


def matrix_names(module: nn.Module) -> tuple[str, str]:
    """The fused parameters holding the experts' matrices, in forward order."""
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


class ExpertMatrix(nn.Module):
    """Expert ``index``'s matrix in the fused parameter ``attr`` of ``experts``, seen as a linear layer."""

    def __init__(self, experts: nn.Module, attr: str, index: int):
        super().__init__()
        object.__setattr__(self, "experts", experts)  # not registered: the model's module tree stays as it is
        self.attr, self.index = attr, index
        self.transposed = bool(experts.is_transposed)

    @property
    def fused(self) -> nn.Parameter:
        """The 3-D parameter this matrix is a slice of (what an optimiser or a state dict sees)."""
        return getattr(self.experts, self.attr)

    @property
    def fused_bias(self) -> nn.Parameter | None:
        return getattr(self.experts, f"{self.attr}_bias", None) if getattr(self.experts, "has_bias", False) else None

    @property
    def weight(self) -> torch.Tensor:
        """``[out, in]`` view of the fused parameter's storage: writing into it writes the model."""
        return self.slot(self.fused.detach())

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.fused_bias
        return None if b is None else b.detach()[self.index]

    @property
    def in_features(self) -> int:
        return self.fused.shape[1 if self.transposed else 2]

    @property
    def out_features(self) -> int:
        return self.fused.shape[2 if self.transposed else 1]

    def slot(self, t: torch.Tensor) -> torch.Tensor:
        """This matrix's part of a tensor shaped like the fused parameter (its gradient, a mask), as ``[out, in]``."""
        t = t[self.index]
        return t.t() if self.transposed else t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.attr}[{self.index}], in_features={self.in_features}, out_features={self.out_features}"


def expert_matrices(experts: nn.Module) -> dict[str, ExpertMatrix]:
    """Every matrix of every expert of a fused experts module by local name (``down_proj[3]``), in forward
    order (all experts' up/gate projections, then their down projections)."""
    return {f"{attr}[{e}]": ExpertMatrix(experts, attr, e)
            for attr in matrix_names(experts) for e in range(getattr(experts, attr).shape[0])}


def weight_owner(layer: nn.Module) -> nn.Parameter:
    """The parameter a prunable layer's weight lives in (the fused 3-D one for an expert)."""
    return layer.fused if isinstance(layer, ExpertMatrix) else layer.weight


def bias_owner(layer: nn.Module) -> nn.Parameter | None:
    return layer.fused_bias if isinstance(layer, ExpertMatrix) else layer.bias


def owners(layers: Iterable[nn.Module]) -> tuple[list[nn.Parameter], list[int]]:
    """The distinct parameters holding ``layers``' weights (the experts of one fused tensor share it), and for
    each layer the position of its parameter in that list."""
    params: list[nn.Parameter] = []
    index: dict[int, int] = {}
    where = []
    for lin in layers:
        p = weight_owner(lin)
        if id(p) not in index:
            index[id(p)] = len(params)
            params.append(p)
        where.append(index[id(p)])
    return params, where


def slot(layer: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``layer``'s part of a tensor shaped like :func:`weight_owner` (a gradient, a probe, a mask)."""
    return layer.slot(t) if isinstance(layer, ExpertMatrix) else t


# ---------------------------------------------------------------------------------------------
# Observation: one pass with a per-expert loop whose matrices are called as modules (hooks fire)
# ---------------------------------------------------------------------------------------------
def _routing(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden_states, top_k_index, top_k_weights)`` whatever the class calls them (GPT-OSS:
    ``router_indices``, ``routing_weights``): bound by position from its own forward's signature."""
    params = list(inspect.signature(type(module).forward).parameters)[1:4]
    bound = dict(zip(params, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    if len(bound) != 3 or set(kwargs) - set(params):
        raise ModelLoadError(f"{type(module).__name__}.forward is called with {sorted(set(bound) | set(kwargs))}; "
                             "mixsparse knows fused experts called with (hidden_states, top_k_index, top_k_weights)")
    return bound[params[0]], bound[params[1]], bound[params[2]]


def _per_expert_forward(module: nn.Module, units: dict[tuple[str, int], ExpertMatrix],
                        hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' output computed expert by expert, each matrix through its :class:`ExpertMatrix` (the
    transformers contract's eager loop); tokens routed to an expert are exactly the inputs its hooks see."""
    up_attr, down_attr = matrix_names(module)
    out = torch.zeros_like(hidden)
    for e in range(module.num_experts):
        token, pos = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        up, down = units.get((up_attr, e)), units.get((down_attr, e))
        up = ExpertMatrix(module, up_attr, e) if up is None else up
        down = ExpertMatrix(module, down_attr, e) if down is None else down
        h = up(hidden[token])
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        y = down(h)
        if getattr(module, "has_post_expert_norm", False):
            y = module.post_expert_norm(y)
        out.index_add_(0, token, (y * top_k_weights[token, pos, None]).to(out.dtype))
    return out


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-4, torch.float64: 1e-9}.get(dtype, 2e-2)  # 16-bit: a few units in the last place


@contextlib.contextmanager
def observing(layers: Iterable[nn.Module]) -> Iterator[None]:
    """While inside, the fused experts modules of the given :class:`ExpertMatrix` layers compute expert by
    expert through those layers, so forward hooks on them see their routed tokens. Other layers are ignored."""
    by_module: dict[int, tuple[nn.Module, dict]] = {}
    for lin in layers:
        if isinstance(lin, ExpertMatrix):
            by_module.setdefault(id(lin.experts), (lin.experts, {}))[1][(lin.attr, lin.index)] = lin
    saved = []
    try:
        for module, units in by_module.values():
            saved.append((module, vars(module).get("forward")))
            original = module.forward
            checked = [False]

            def forward(*args, _m=module, _u=units, _orig=original, _checked=checked, **kwargs):
                hidden, index, weights = _routing(_m, args, kwargs)
                out = _per_expert_forward(_m, _u, hidden, index, weights)
                if not _checked[0]:  # once per pass: the loop must be this class's own computation
                    _checked[0] = True
                    ref = _orig(*args, **kwargs)
                    if not torch.allclose(out.float(), ref.float(), rtol=_tolerance(out.dtype),
                                          atol=_tolerance(out.dtype) * float(ref.abs().max().clamp_min(1e-6))):
                        raise ModelLoadError(
                            f"{type(_m).__name__}: the per-expert computation mixsparse uses to observe each expert's "
                            f"tokens differs from the model's own experts forward (max abs diff "
                            f"{float((out.float() - ref.float()).abs().max()):.3g}); this experts class does not follow "
                            "transformers' experts contract and cannot be pruned per expert")
                return out

            module.forward = forward
        yield
    finally:
        for module, old in saved:
            if old is None:
                vars(module).pop("forward", None)
            else:
                module.forward = old

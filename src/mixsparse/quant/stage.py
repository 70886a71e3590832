"""Quantization as a stage of a run, after pruning and recovery: every prunable linear's kept weights go
on an integer grid and its zeros stay exactly zero. ``rtn`` needs no data; ``gptq`` runs the model block
by block on calibration windows (the engine's :class:`~mixsparse.runner.LayerwiseRunner`), each block
seeing the outputs of the blocks already quantized, and sweeps each layer with its pruned positions fixed.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import batches as split_batches
from ..engine import block_layers, calibrated_blocks, min_tokens
from ..runner import LayerwiseRunner
from ..errors import ConfigError
from ..modeling import prunable_linears, stream_of
from ..placement import Placement
from .grid import QuantizedWeight, QuantSpec, quantize_rtn


def spec_of(section) -> QuantSpec:
    return QuantSpec(section.bits, section.group_size, section.symmetric)


def check_not_quantized(model: nn.Module) -> None:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        raise ConfigError(f"this model is already quantized ({method}); quantize the unquantized checkpoint instead "
                          "(a second rounding only adds error)")


def check_groups(model: nn.Module, spec: QuantSpec) -> None:
    """Every prunable layer splits into whole groups (before any work)."""
    for name, lin in prunable_linears(model).items():
        spec.groups(lin.in_features, name)


def quantize_model(model: nn.Module, method: str, spec: QuantSpec, calib_ids: torch.Tensor | None = None, *,
                   device: Placement | torch.device | str | None = None, blocksize: int = 128, percdamp: float = 0.01,
                   progress: bool = True, min_token_share: float = 0.005) -> tuple[dict[str, QuantizedWeight], dict]:
    """Quantize the prunable linears of ``model`` in place; returns their codes (for the packed
    checkpoint) and a record (method, spec, seconds; with gptq, ``fallbacks``: the layers that saw fewer than
    ``min_token_share`` of the calibration tokens, rarely routed experts, rounded to nearest instead). A streamed
    model is quantized block by block and its codes are not returned: for a model larger than RAM they would not fit
    in it (its compressed export stores the quantized values as bitmask + values instead of packed codes)."""
    check_not_quantized(model)
    check_groups(model, spec)
    t0 = time.perf_counter()
    stream = stream_of(model)
    if method == "rtn":
        # a streamed model block by block, each written back to disk, its codes not kept
        out, layers = {}, prunable_linears(model)
        groups = [list(layers)] if stream is None else stream.editing(layers)
        with tqdm(total=len(layers), desc="quantize[rtn]", disable=not progress) as bar:
            for names in groups:
                for name in names:
                    qw = _write(layers[name], quantize_rtn(layers[name].weight.data, spec, name), name)
                    if stream is None:
                        out[name] = qw
                    bar.update(1)
    elif method == "gptq":
        if calib_ids is None:
            raise ConfigError("quantize.method gptq needs calibration data")
        with Placement.stage(model):
            out, fallbacks = _gptq(model, calib_ids, spec, Placement.resolve(device, "blockwise", model), blocksize,
                                   percdamp, progress, min_tokens(calib_ids, min_token_share))
    else:
        raise ConfigError(f"quantize_model: unknown method {method!r} (rtn or gptq; joint runs inside SparseGPT)")
    record = {"method": method, "scheme": spec.label(), "seconds": round(time.perf_counter() - t0, 3)}
    if method == "gptq":
        record["fallbacks"] = fallbacks
    return out, record


@torch.no_grad()
def _write(lin: nn.Linear, qw: QuantizedWeight, name: str) -> QuantizedWeight:
    w = qw.dequantize()
    if not bool(torch.all((w == 0) | (lin.weight.data != 0))):
        raise AssertionError(f"quantization moved a pruned weight of {name}")  # 0 is on every grid: a bug if hit
    lin.weight.data.copy_(w.to(lin.weight.dtype))
    return qw.cpu()


def _gptq(model, calib_ids, spec, placement, blocksize, percdamp, progress, least: int
          ) -> tuple[dict[str, QuantizedWeight], dict[str, dict]]:
    from ..pruners.sparsegpt import SparseGPTPruner
    from .gptq import obs_sweep

    runner = LayerwiseRunner(model, device=placement)
    runner.writes = True  # a streamed model's quantized blocks go back to disk
    keep_codes = runner.stream is None  # a streamed model's codes would fill RAM (see the docstring)
    per_block = block_layers(model, runner, None)  # the same layers as rtn and check_groups
    state = runner.catch(split_batches(calib_ids, 1))
    out, fallbacks = {}, {}
    make = SparseGPTPruner.factory({"blocksize": blocksize, "percdamp": percdamp}, least)  # its Hessian statistics
    # sequential: the next block sees the quantized outputs
    blocks = calibrated_blocks(runner, state, per_block, make, True, progress, "quantize[gptq]")
    with contextlib.closing(blocks):
        for _, linears, stats in blocks:
            for name, p in stats.items():
                W0 = linears[name].weight.data
                if p.starved:  # a Hessian from a handful of routed tokens: round to nearest instead (zeros stay)
                    qw = quantize_rtn(W0, spec, name, p.storage_dtype)
                    fallbacks[name] = {"tokens": p.nsamples, "min_tokens": p.min_tokens, "fallback": "rtn"}
                else:
                    W, _, qw = obs_sweep(W0, p.factor(), blocksize, fixed=W0 == 0, spec=spec, name=name,
                                         storage_dtype=p.storage_dtype)
                qw = _write(linears[name], qw, name)
                if keep_codes:
                    out[name] = qw
                p.free()
    return out, fallbacks

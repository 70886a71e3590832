"""Perplexity on non-overlapping windows, and next-token distributions for KL fitness.

Two execution paths give the same numbers: a plain forward when the model sits on the device, and a
layer-by-layer forward (:class:`~mixsparse.runner.LayerwiseRunner`) for models larger than the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import batches as split_batches
from .runner import LayerwiseRunner
from .errors import NumericalError
from .placement import Placement


def iter_logits(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    device: str | torch.device | Placement | None = None,
    layerwise: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(input_ids, logits)`` per batch, full-model or layer by layer. With a
    :class:`~mixsparse.placement.Placement` its mode decides; the model is back home afterwards."""
    batches = split_batches(windows, batch_size, "evaluation windows", min_len=2)
    placement = Placement.resolve(device, "blockwise" if layerwise else "whole", model)
    if placement.mode == "blockwise":
        runner = LayerwiseRunner(model, device=placement)
        yield from runner.forward_all(batches, progress=progress)
        return
    with placement.whole(model) as dev, torch.no_grad():
        for ids in tqdm(batches, desc=desc, disable=not progress, leave=False):
            ids = ids.to(dev)
            yield ids, model(input_ids=ids, use_cache=False).logits


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens."""
    shift = logits[:, :-1].float()
    target = ids[:, 1:].to(shift.device)
    loss = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1), reduction="sum")
    return float(loss), target.numel()


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    device: str | torch.device | Placement | None = None,
    layerwise: bool = False,
    progress: bool = True,
) -> float:
    """exp(mean next-token NLL) over all windows (each window is scored on its own, no overlap)."""
    total, count = 0.0, 0
    for ids, logits in iter_logits(
        model, windows, batch_size=batch_size, device=device, layerwise=layerwise, progress=progress, desc="perplexity"
    ):
        s, n = nll_sum(logits, ids)
        total += s
        count += n
    if not math.isfinite(total):
        raise NumericalError("perplexity is not finite: the model produced NaN/Inf logits")
    return math.exp(total / count)


def mean_kl(ref_logprobs: torch.Tensor, logits: torch.Tensor) -> tuple[float, int]:
    """Summed per-token KL(reference || model) and the number of tokens, in float32."""
    logq = F.log_softmax(logits.float(), dim=-1)
    logp = ref_logprobs.to(logq.device, torch.float32)[: logq.shape[0]]
    return float((logp.exp() * (logp - logq)).sum()), logq.shape[0] * logq.shape[1]

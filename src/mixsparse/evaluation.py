"""Perplexity on non-overlapping windows, and next-token distributions for KL fitness.

Two execution paths give the same numbers: a plain forward when the model sits on the device, and a
layer-by-layer forward (:class:`~mixsparse.engine.LayerwiseRunner`) for models larger than the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import batches as split_batches
from .engine import LayerwiseRunner
from .errors import NumericalError


def iter_logits(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    layerwise: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(input_ids, logits)`` per batch, full-model or layer by layer."""
    batches = split_batches(windows, batch_size, "evaluation windows", min_len=2)
    if layerwise:
        runner = LayerwiseRunner(model, device=device)
        yield from runner.forward_all(batches, progress=progress)
        return
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    with torch.no_grad():
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
    device: str | torch.device | None = None,
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


class DenseReference:
    """The dense model's next-token log-probabilities on fixed windows, kept for KL fitness.

    Stored in float16 to halve memory (vocab x tokens can be large); KL is computed in float32.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1, device=None):
        self.windows = windows
        self.batch_size = batch_size
        self.logprobs = [
            F.log_softmax(logits.float(), dim=-1).to(torch.float16).cpu()
            for _, logits in iter_logits(model, windows, batch_size=batch_size, device=device)
        ]

    def kl(self, model: nn.Module, *, upto: int | None = None, device=None) -> float:
        """Mean per-token KL(dense || model) over the first ``upto`` windows (all by default)."""
        windows = self.windows if upto is None else self.windows[:upto]
        total, count = 0.0, 0
        for (ids, logits), ref in zip(iter_logits(model, windows, batch_size=self.batch_size, device=device), self.logprobs):
            s, n = mean_kl(ref, logits)
            total += s
            count += n
        if not math.isfinite(total):
            return math.inf
        return total / count

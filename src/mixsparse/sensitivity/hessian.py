"""Per-layer Hessian trace by Hutchinson's estimator (the sensitivity of Shao et al.'s allocation).

With Rademacher probes ``z`` drawn over all prunable weights at once, ``z_l . (H z)_l`` is an
unbiased estimate of ``Tr(H_ll)`` (the cross terms ``z_l^T H_lk z_k``, ``k != l``, have zero mean
because ``z_l`` and ``z_k`` are independent), so one Hessian-vector product per probe serves every
layer. ``H`` is the Hessian of the mean next-token loss over the calibration batch; ``H z`` comes
from a double backward.
"""

from __future__ import annotations


import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..errors import ConfigError, NumericalError
from ..experts import ExpertMatrix, owners
from ..modeling import prunable_linears
from ..placement import Placement
from .fisher import check_calib_ids, eval_mode, sequence_loss, weights_require_grad


def rademacher(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Tensor of independent +-1 (float32, CPU) drawn from ``generator``."""
    return torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).float().mul_(2).sub_(1)


def _placed(model: nn.Module, device):
    """The Hutchinson estimate needs a double backward through the whole model: it runs with the whole
    model on the device (placement ``whole``); a blockwise placement is refused with what to do instead."""
    placement = Placement.resolve(device, "whole" if not isinstance(device, Placement) else device.mode, model)
    if placement.mode == "blockwise":
        raise ConfigError("the Hessian trace needs the whole model on the device (double backward through every block); "
                          "set model.placement=whole, use model.device=cpu, or choose allocation fisher/msp/owl")
    return placement.whole(model)


def hessian_trace(
    model: nn.Module,
    calib_ids: torch.Tensor,
    *,
    n_probes: int = 32,
    seed: int = 0,
    device: str | torch.device | None = None,
    batch_size: int | None = 1,
    progress: bool = True,
) -> dict[str, float]:
    """Hutchinson estimate of ``Tr(H_ll)`` for every prunable linear ``l``, by qualified name.

    ``H`` is the Hessian of the mean next-token cross-entropy over all of ``calib_ids`` (samples,
    seq_len). ``n_probes`` Rademacher probes drawn from ``seed`` are averaged; the result is
    reproducible for a given seed. ``batch_size`` splits the samples into chunks whose Hessians are
    combined (the same probes are reused for every chunk, so the result does not depend on the
    chunking); ``None`` takes all samples at once. The work is ``n_probes`` Hessian-vector products
    over all samples whatever the chunking, so small chunks cost little time and save memory.

    Memory: the whole model on ``device`` (it is moved there and back if ``device`` differs from
    where it is), plus a double-backward graph of one chunk: roughly 2-3x the activations of a
    training step on ``batch_size x seq_len`` tokens, plus the first-order gradients and one probe
    (each the size of the prunable weights); measured on SmolLM2-135M (fp32, CPU), one 256-token
    sample per chunk: ~5.6 GB above the loaded model, and each probe costs about five forward
    passes over all samples. Attention runs on PyTorch's "math" SDPA kernel here,
    because the fused kernels cannot be differentiated twice.

    Traces of a non-convex loss can be negative; allocate from them by rank, not by log.
    """
    check_calib_ids(calib_ids)
    if not isinstance(n_probes, int) or n_probes < 1:
        raise ConfigError(f"n_probes must be a positive integer, got {n_probes!r}")
    n = calib_ids.shape[0]
    batch_size = n if batch_size is None else batch_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    linears = prunable_linears(model)
    totals = torch.zeros(len(linears), dtype=torch.float64)
    chunks = [calib_ids[i : i + batch_size] for i in range(0, n, batch_size)]

    with _placed(model, device) as dev:
        _hutchinson(model, list(linears.values()), chunks, n, n_probes, seed, dev, totals, progress)
    return {name: t / n_probes for name, t in zip(linears, totals.tolist())}


def _hutchinson(model, layers, chunks, n, n_probes, seed, dev, totals, progress) -> None:
    # the placed parameters holding the weights, whatever .to() made of them (an expert's matrix is a slice
    # of a fused 3-D parameter: its trace is the probe's sum over that slice)
    weights, where = owners(layers)
    with eval_mode(model), weights_require_grad(weights), torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        bar = tqdm(total=len(chunks) * n_probes, desc="hessian", disable=not progress, leave=False)
        for chunk in chunks:
            logits = model(input_ids=chunk.to(dev), use_cache=False).logits
            # weight each chunk by its share of the samples: the sum is the mean loss over all of them
            loss = sequence_loss(logits, chunk) * (chunk.shape[0] / n)
            if not torch.isfinite(loss):
                raise NumericalError(f"non-finite calibration loss ({loss.item()}) while computing the Hessian trace")
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            gen = torch.Generator().manual_seed(seed)  # same probes for every chunk
            for _ in range(n_probes):
                zs = [rademacher(w.shape, gen).to(device=dev, dtype=w.dtype) for w in weights]
                gz = sum((g * z).sum() for g, z in zip(grads, zs))
                # allow_unused: a weight the gradient does not depend on has a zero Hessian block
                hz = torch.autograd.grad(gz, weights, retain_graph=True, allow_unused=True)
                # z^T H z per parameter, then per layer: a linear's whole product, an expert's sum over its slice
                # (dim 0 of a fused tensor, whichever way its matrices are laid out)
                prods = [None if h is None else (z * h).double() for z, h in zip(zs, hz)]
                sums = [None if p is None else (p.flatten(1).sum(1) if p.dim() == 3 else p.sum()).cpu() for p in prods]
                totals += torch.tensor([0.0 if sums[j] is None else float(sums[j][lin.index] if isinstance(
                    lin, ExpertMatrix) else sums[j]) for lin, j in zip(layers, where)], dtype=torch.float64)
                bar.update()
            del grads, logits, loss
        bar.close()

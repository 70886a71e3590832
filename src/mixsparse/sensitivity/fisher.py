"""Empirical Fisher trace per linear layer (the sensitivity MSP allocates from).

For calibration sequences ``s`` with loss ``L_s`` (mean next-token cross-entropy over the
sequence), the Fisher trace of layer ``l`` is ``F_l = sum_s ||dL_s / dW_l||^2``: the sum over
samples of the squared per-sample gradient, i.e. the trace of the empirical Fisher block.

It is computed block by block so that a model larger than the device works: a forward pass stores
every block's input activations on the CPU, the head gives ``dL_s / dh_final``, then the blocks are
visited backwards, each one moved to the device, its forward recomputed with inputs that require
grad, and each sample's output gradient back-propagated separately (per-sample gradients cannot be
recovered from a summed backward).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..runner import LayerwiseRunner
from ..errors import DataError, NumericalError
from ..experts import owners, slot
from ..modeling import block_linears, prunable_linears
from ..placement import Placement

log = logging.getLogger(__name__)


def sequence_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all positions of ``input_ids`` (batch, seq)."""
    pred = logits[:, :-1]
    if pred.dtype in (torch.float16, torch.bfloat16):  # half-precision softmax loses too much
        pred = pred.float()
    target = input_ids[:, 1:].to(pred.device)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1))


def check_calib_ids(calib_ids: torch.Tensor) -> None:
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.shape[0] == 0:
        shape = tuple(calib_ids.shape) if isinstance(calib_ids, torch.Tensor) else type(calib_ids).__name__
        raise DataError(f"calibration ids must be a non-empty (samples, seq_len) tensor, got {shape}")
    if calib_ids.shape[1] < 2:
        raise DataError(f"calibration sequences need at least 2 tokens for a next-token loss, got {calib_ids.shape[1]}")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Deterministic forward (no dropout) for the duration; restores the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def weights_require_grad(weights: list[torch.Tensor]) -> Iterator[None]:
    """Let autograd differentiate with respect to ``weights``; restores their flags afterwards
    (loaded models for inference often have ``requires_grad=False``)."""
    before = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        for w, flag in zip(weights, before):
            w.requires_grad_(flag)


def fisher_trace(
    model: nn.Module,
    calib_ids: torch.Tensor,
    *,
    device: str | torch.device | None = None,
    normalize: bool = False,
    offload: bool = True,
    progress: bool = True,
) -> dict[str, float]:
    """Empirical Fisher trace ``sum_s ||dL_s/dW_l||^2`` of every prunable linear, by qualified name.

    ``calib_ids`` is a (samples, seq_len) tensor; each row is one sample ``s`` whose loss is the mean
    next-token cross-entropy over the row. ``normalize`` divides each trace by the layer's number
    of weights (mean squared gradient instead of the sum).

    Memory: block inputs are stored for every ``ceil(sqrt(num_blocks))``-th block only and recomputed for
    one segment at a time in the backward pass (one extra forward), so about
    ``2 x sqrt(num_blocks) x samples x seq_len x hidden x bytes_per_element`` on the CPU (4 bytes in fp32;
    e.g. 11 x 16 x 512 x 576 x 4 = 208 MB for SmolLM2-135M instead of 566 MB for all 30 blocks),
    plus one set of per-sample output gradients (``samples x seq_len x hidden x 4``); on the device,
    one block, the model's embedding/head, and the activations and gradients of one sample through
    one block. With ``offload=False`` the stored activations stay on the device instead.

    The model's weights are not modified; it is run in eval mode (restored afterwards).
    """
    check_calib_ids(calib_ids)
    runner = LayerwiseRunner(model, device=device, offload=offload)
    names = list(prunable_linears(model))
    wanted = set(names)
    per_sample = [calib_ids[i : i + 1] for i in range(calib_ids.shape[0])]
    with eval_mode(model), Placement.stage(model):  # back home afterwards, also on error
        # forward: keep what enters each block (the backward pass recomputes each block from it)
        state = runner.catch(per_sample)
        n_blocks = len(runner.blocks)
        seg = max(1, math.isqrt(n_blocks - 1) + 1) if n_blocks > 1 else 1  # ceil(sqrt(blocks))
        checkpoints: dict[int, list[torch.Tensor]] = {}
        for i, block in enumerate(tqdm(runner.blocks, desc="fisher fwd", disable=not progress, leave=False)):
            if i % seg == 0:
                checkpoints[i] = state.hidden
            with runner.on_device(block):
                state.hidden = runner.run_block(i, state)

        # head: dL_s / dh_final for every sample
        grads: list[torch.Tensor] = []
        with torch.enable_grad():
            for ids, h in zip(state.input_ids, state.hidden):
                h_dev = h.to(runner.device).detach().requires_grad_(True)
                loss = sequence_loss(runner.head_logits(ids, h_dev), ids)
                if not torch.isfinite(loss):
                    raise NumericalError(f"non-finite calibration loss ({loss.item()}) while computing the Fisher trace")
                (g,) = torch.autograd.grad(loss, h_dev)
                grads.append(g.to(runner.store))
        state.hidden = []

        # backward, one block at a time, one sample at a time; a segment's block inputs are recomputed
        # from its checkpoint (same kernels, same inputs: the same numbers as storing them all)
        scores: dict[str, float] = {}
        block_inputs: dict[int, list[torch.Tensor]] = {}
        bar = tqdm(list(reversed(range(n_blocks))), desc="fisher bwd", disable=not progress, leave=False)
        for i in bar:
            if i not in block_inputs:
                start = i - i % seg
                block_inputs[start] = checkpoints.pop(start)
                for j in range(start, i):
                    with runner.on_device(runner.blocks[j]):
                        block_inputs[j + 1] = runner.run_block(j, state, hidden=block_inputs[j])
            block = runner.blocks[i]
            inputs = block_inputs.pop(i)
            with runner.on_device(block):
                prefix = f"{runner.blocks_name}.{i}."
                linears = {n: lin for n, lin in block_linears(block).items() if prefix + n in wanted}
                # the parameters holding the weights (an expert's matrix is a slice of a fused 3-D one)
                weights, where = owners(linears.values())
                sums = torch.zeros(len(linears), dtype=torch.float64, device=runner.device)
                with weights_require_grad(weights), torch.enable_grad():
                    for s, (h, kw) in enumerate(zip(inputs, state.of_block(i))):
                        h_in = h.to(runner.device).detach().requires_grad_(True)
                        out = runner.call(i, h_in, kw)
                        g_in, *g_w = torch.autograd.grad(out, [h_in, *weights], grad_outputs=grads[s].to(runner.device))
                        if g_w:
                            sums += torch.stack([(slot(lin, g_w[j]).double() ** 2).sum()
                                                 for lin, j in zip(linears.values(), where)])
                        grads[s] = g_in.to(runner.store)
                for (short, lin), total in zip(linears.items(), sums.cpu().tolist()):
                    scores[prefix + short] = total / lin.weight.numel() if normalize else total
    return {name: scores[name] for name in names}

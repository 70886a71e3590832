"""OWL (Yin et al., 2023): layer-wise outlier ratios of Wanda scores.

A block's outlier ratio is the share of its Wanda scores ``|W_ij| * ||X_j||_2`` (all linears of the
block pooled) that exceed ``M`` times their mean. Blocks with more outliers are kept denser by
:func:`mixsparse.allocation.owl_allocation`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..engine import observe_layerwise
from ..errors import ConfigError
from ..modeling import find_decoder_blocks
from ..names import block_index
from ..pruners.wanda import WandaPruner
from .fisher import check_calib_ids, eval_mode


def outlier_ratio(scores: Sequence[torch.Tensor], M: float) -> float:
    """Share of the pooled entries of ``scores`` greater than ``M`` times their mean, in float64, one layer at a
    time (a pooled float64 copy of a 13B block's scores would be 2.5 GB)."""
    n = sum(s.numel() for s in scores)
    if n == 0:
        return 0.0
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / n
    return sum(int((s.double() > M * mean).sum()) for s in scores) / n


def owl_outlier_ratios(
    model: nn.Module,
    calib_ids: torch.Tensor,
    *,
    M: float = 5.0,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    offload: bool = True,
    progress: bool = True,
) -> dict[int, float]:
    """Outlier ratio (a fraction in [0, 1], not OWL's percent) of every decoder block, by block index.

    Activation norms come from the dense model, through the engine's observe pass with Wanda's own
    statistics (OWL's scores are Wanda's; nothing is pruned).
    Peak extra memory is one block's worth of float32 scores on the CPU.
    """
    check_calib_ids(calib_ids)
    if not (isinstance(M, (int, float)) and M > 0):
        raise ConfigError(f"OWL outlier threshold M must be a positive number, got {M!r}")
    blocks_name, _ = find_decoder_blocks(model)
    ratios: dict[int, float] = {}
    pending: dict[int, list[torch.Tensor]] = {}

    def flush(upto: int | None) -> None:
        for b in sorted(pending):
            if upto is None or b < upto:
                ratios[b] = outlier_ratio(pending.pop(b), M)

    def on_layer(name: str, obs: WandaPruner) -> None:
        b = block_index(name, blocks_name)
        flush(b)  # blocks run in order: earlier blocks are complete
        if obs.nsamples == 0:  # a MoE expert no token was routed to: no activations, no outliers
            return
        # per-token mean norms: an expert sees a share of the tokens, attention all of them; summed norms would
        # make the block's outliers follow routing (the same ratios as OWL's for dense models)
        pending.setdefault(b, []).append((obs.scores() / obs.nsamples ** 0.5).cpu())

    with eval_mode(model):
        observe_layerwise(model, calib_ids, WandaPruner.factory(), on_layer, device=device,
                          batch_size=batch_size, offload=offload, progress=progress, desc="observe[owl]")
    flush(None)
    return ratios

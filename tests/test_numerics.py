"""The tolerances of ``tests/numerics.py`` hold against real rounding noise and still catch real errors.

Another CPU kind's kernels are reproduced on any machine by a second attention kernel: the same model
pruned once with SDPA and once with eager attention sees inputs that differ only by rounding, as the
AVX2-only EPYC's did against the AMX machines' (where a 1e-6 absolute tolerance failed).
"""

import copy

import pytest
import torch

from mixsparse.engine import prune_layerwise
from mixsparse.modeling import param_counts
from mixsparse.sparsity import SparsityMap

from .numerics import assert_same_pruned
from .tiny import tiny_ids, tiny_model


def _eager(model):
    model.config._attn_implementation = "eager"
    for m in model.modules():
        if getattr(m, "config", None) is not None:
            m.config._attn_implementation = "eager"
    return model


def _linears(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_rounding_noise_from_another_kernel_stays_within_the_tolerance(pruner, seed):
    sdpa = tiny_model("llama", seed=seed)
    eager = _eager(copy.deepcopy(sdpa))
    smap = SparsityMap.uniform(0.5, param_counts(sdpa))
    ids = tiny_ids(seed=seed)
    ref_logits = sdpa(input_ids=ids).logits
    assert not torch.equal(eager(input_ids=ids).logits, ref_logits)  # the two kernels really round differently
    for m in (sdpa, eager):
        prune_layerwise(m, ids, smap, pruner, sequential=False, progress=False)
    assert_same_pruned(_linears(eager), _linears(sdpa))


def test_the_tolerance_catches_a_missing_compensation_step():
    """Planted bug: SparseGPT's mask with the original kept weights (no OBS update) must not pass."""
    model = tiny_model("llama")
    dense = _linears(model)
    prune_layerwise(model, tiny_ids(), SparsityMap.uniform(0.5, param_counts(model)), "sparsegpt",
                    sequential=False, progress=False)
    pruned = _linears(model)
    uncompensated = {n: torch.where(pruned[n] == 0, torch.zeros(()), dense[n]) for n in dense}
    with pytest.raises(AssertionError):
        assert_same_pruned(uncompensated, pruned)
    flipped = dict(pruned)
    name = next(iter(pruned))
    w = pruned[name].clone()
    w.view(-1)[torch.nonzero(w.view(-1) == 0)[0]] = 1e-3  # one zero of the mask kept instead
    flipped[name] = w
    with pytest.raises(AssertionError, match="zero patterns differ"):
        assert_same_pruned(flipped, pruned)

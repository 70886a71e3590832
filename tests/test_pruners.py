"""Base pruners on hand-built layers: exact masks, N:M, reconstruction quality, errors."""

import pytest
import torch
from torch import nn

from mixsparse.errors import ConfigError, NumericalError, UnknownNameError
from mixsparse.masks import is_nm
from mixsparse.pruners import available_pruners, get_pruner
from mixsparse.sparsity import NM

W = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])


def _layer(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data.copy_(weight)
    return lin


def _pruner(name, weight, inputs=None, **opts):
    cls = get_pruner(name)
    p = cls(_layer(weight), cls.make_options(opts))
    if inputs is not None:
        p.add_batch(inputs)
    return p


def test_registry_lists_builtins():
    assert {"magnitude", "wanda", "sparsegpt"} <= set(available_pruners())
    with pytest.raises(UnknownNameError, match="nope"):
        get_pruner("nope")
    with pytest.raises(ConfigError, match="blocksiz"):
        get_pruner("sparsegpt").make_options({"blocksiz": 3})


def test_magnitude_layer_group_exact():
    r = _pruner("magnitude", W).compute(0.5)
    assert torch.equal(r.mask, torch.tensor([[False, False, True, True], [True, True, False, False]]))
    assert torch.equal(r.weight, W * r.mask)


def test_wanda_uses_input_norms_per_row():
    x = torch.tensor([[4.0, 1.0, 1.0, 1.0]])  # ||X_j|| = [4, 1, 1, 1]
    r = _pruner("wanda", W, x).compute(0.5)
    # scores [[4,2,3,4],[16,3,2,1]] -> drop the two lowest of each row
    assert torch.equal(r.mask, torch.tensor([[True, False, False, True], [True, True, False, False]]))
    assert torch.equal(r.weight, W * r.mask)


def test_sparsegpt_with_diagonal_hessian_is_saliency_pruning_without_updates():
    # orthogonal inputs -> diagonal Hessian -> no error propagation between columns
    x = torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0]))
    r = _pruner("sparsegpt", W, x).compute(0.5)
    # saliency w^2 * h_jj: [[2.0, 2.0, 4.6, 8.1], [32.1, 4.6, 2.0, 0.5]] -> 4 lowest in the block
    assert torch.equal(r.mask, torch.tensor([[False, False, True, True], [True, True, False, False]]))
    assert torch.equal(r.weight, W * r.mask)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [NM(2, 4), NM(1, 4), NM(3, 4), NM(4, 8), NM(1, 2)])
def test_nm_patterns_exact(name, pattern):
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    r = _pruner(name, w, torch.randn(32, 16)).compute(pattern)
    assert is_nm(r.mask, pattern)
    assert is_nm(r.weight != 0, pattern)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_counts_exact(name):
    torch.manual_seed(1)
    w = torch.randn(8, 300)
    p = _pruner(name, w, torch.randn(64, 300))
    for s in (0.3, 0.5, 0.7, 0.8):
        r = p.compute(s)
        assert int((r.weight == 0).sum()) == round(w.numel() * s)
    assert torch.equal(p.compute(0.0).weight, w)


def test_compute_does_not_modify_layer():
    p = _pruner("sparsegpt", W.clone(), torch.randn(8, 4))
    p.compute(0.5)
    assert torch.equal(p.layer.weight.data, W)


def _recon_error(w_new, w, x):
    return float(((x @ (w - w_new).t()) ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("target", [0.5, 0.7, 0.8, NM(2, 4)])
def test_reconstruction_error_sparsegpt_le_wanda_le_magnitude(target, seed):
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = 64, 32
    # uneven, correlated input channels (what makes activation-aware pruning matter); a spread far
    # beyond ~10x lets SparseGPT's 1% dampening dominate the weak channels
    scales = torch.logspace(-0.5, 0.5, d_in)[torch.randperm(d_in, generator=g)]
    mix = torch.eye(d_in) + 0.5 * torch.randn(d_in, d_in, generator=g) / d_in**0.5
    x = (torch.randn(512, d_in, generator=g) @ mix) * scales
    w = torch.randn(d_out, d_in, generator=g)
    errs = {n: _recon_error(_pruner(n, w, x).compute(target).weight, w, x) for n in ("sparsegpt", "wanda", "magnitude")}
    assert errs["sparsegpt"] <= errs["wanda"] <= errs["magnitude"], errs


def test_nan_inputs_raise_clear_error():
    p = _pruner("wanda", W)
    with pytest.raises(NumericalError, match="NaN/Inf"):
        p.add_batch(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))


def test_sparsegpt_singular_hessian_is_dampened():
    # rank-1 inputs and a dead input column: H is singular; dampening must still give a result
    x = torch.tensor([[1.0, 2.0, 0.0, 3.0]]).repeat(5, 1)
    r = _pruner("sparsegpt", W, x, percdamp=0.0).compute(0.5)
    assert torch.isfinite(r.weight).all() and int((r.weight == 0).sum()) == 4


def test_sparsegpt_without_inputs_errors():
    with pytest.raises(NumericalError, match="no calibration"):
        _pruner("sparsegpt", W).compute(0.5)

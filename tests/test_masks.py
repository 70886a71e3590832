"""Exact masks on hand-built tensors (True = keep)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixsparse.errors import SparsityError
from mixsparse.masks import (
    is_nm,
    mask_from_ranks,
    nm_mask,
    prune_count,
    score_ranks,
    split_counts,
    unstructured_mask,
)
from mixsparse.sparsity import NM


def test_row_mask_prunes_lowest_per_row():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.4, 0.3, 0.2]])
    expected = torch.tensor([[True, False, True, False], [True, True, False, False]])
    assert torch.equal(unstructured_mask(s, 0.5, "row"), expected)


def test_layer_mask_compares_whole_matrix():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.4, 0.3, 0.2]])
    expected = torch.tensor([[True, True, True, True], [False, False, False, False]])
    assert torch.equal(unstructured_mask(s, 0.5, "layer"), expected)


def test_ties_go_to_lower_index():
    s = torch.ones(1, 4)
    assert torch.equal(unstructured_mask(s, 0.5), torch.tensor([[False, False, True, True]]))


def test_zero_sparsity_keeps_everything():
    assert unstructured_mask(torch.randn(3, 5), 0.0).all()


def test_nm_mask_exact():
    s = torch.tensor([[1.0, 4.0, 2.0, 3.0, 8.0, 5.0, 7.0, 6.0]])
    assert torch.equal(nm_mask(s, NM(2, 4)), torch.tensor([[False, True, False, True, True, False, True, False]]))
    assert torch.equal(nm_mask(s, NM(1, 4)), torch.tensor([[False, True, False, False, True, False, False, False]]))
    assert torch.equal(nm_mask(s, NM(3, 4)), torch.tensor([[False, True, True, True, True, False, True, True]]))


def test_nm_needs_divisible_input_dim():
    with pytest.raises(SparsityError, match="divide"):
        nm_mask(torch.randn(2, 6), NM(2, 4))


def test_prune_count_rejects_bad_sparsity():
    with pytest.raises(SparsityError):
        prune_count(10, 1.0)
    with pytest.raises(SparsityError):
        prune_count(10, -0.1)


def test_ranks_give_masks_at_every_level():
    torch.manual_seed(0)
    s = torch.randn(6, 20)
    ranks = score_ranks(s, "row")
    for p in (0.1, 0.35, 0.5, 0.9):
        assert torch.equal(mask_from_ranks(ranks, p, "row"), unstructured_mask(s, p, "row"))


def test_split_counts_sum_exactly():
    assert split_counts([128, 128, 64], 100) == [40, 40, 20]
    assert sum(split_counts([7, 7, 7], 10)) == 10


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 6),
    m=st.sampled_from([2, 3, 4, 8]),
    data=st.data(),
)
def test_nm_property_exactly_n_per_group(rows, groups, m, data):
    n = data.draw(st.integers(1, m - 1))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, groups * m, generator=g)
    mask = nm_mask(s, NM(n, m))
    assert is_nm(mask, NM(n, m))
    # kept weights are the n largest of each group
    grouped = s.reshape(rows, groups, m)
    kept_min = torch.where(mask.reshape(rows, groups, m), grouped, torch.inf).amin(-1)
    pruned_max = torch.where(~mask.reshape(rows, groups, m), grouped, -torch.inf).amax(-1)
    assert (kept_min >= pruned_max).all()


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(1, 40), p=st.floats(0.0, 0.99), seed=st.integers(0, 2**16))
def test_unstructured_property_exact_counts(rows, cols, p, seed):
    s = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    row = unstructured_mask(s, p, "row")
    assert ((~row).sum(1) == prune_count(cols, p)).all()
    layer = unstructured_mask(s, p, "layer")
    assert int((~layer).sum()) == prune_count(rows * cols, p)

"""Pipeline on a tiny model: the final model of an MSP run is the searched candidate ("stitched") or a
sequential re-pruning of its map, exactly."""

import copy

import pytest
import torch

from mixsparse.config import load_config
from mixsparse.engine import prune_layerwise
from mixsparse.modeling import param_counts
from mixsparse.data import Calibration
from mixsparse.pipeline import prune
from mixsparse.sparsity import SparsityMap


def _cfg(corpus, final):
    return load_config(None, {
        "data.calibration": str(corpus), "data.validation": str(corpus), "data.calibration_samples": 2,
        "data.seqlen": 32, "model.device": "cpu", "prune.sparsity": 0.5, "prune.allocation": "msp",
        "allocation.msp.samples": 2, "allocation.msp.seqlen": 32,
        "search.generations": 2, "search.population": 2, "search.offspring": 3, "search.stages": [[1, 2], [2, 1]],
        "search.fitness_windows": 2, "search.fitness_seqlen": 32, "search.step": 0.1, "search.max_shift": 0.2,
        "search.final": final})


@pytest.mark.parametrize("final", ["stitched", "sequential"])
def test_final_model_is_the_searched_map_pruned_one_shot_or_sequentially(tiny_llama, word_corpus, final):
    model, tok = tiny_llama
    dense = copy.deepcopy(model)
    cfg = _cfg(word_corpus, final)
    rec = prune(model, tok, cfg, progress=False).record
    smap = SparsityMap(rec.allocation.per_layer, param_counts(model))
    assert smap.average() == pytest.approx(0.5, abs=1e-12)
    # the same map pruned directly: one-shot (dense activations) == stitched, sequential == sequential
    ids = Calibration(tok, cfg).ids(cfg.data.calibration_samples, cfg.data.seqlen)
    prune_layerwise(dense, ids, smap, "wanda", sequential=final == "sequential", progress=False)
    for (n, a), (_, b) in zip(model.named_parameters(), dense.named_parameters()):
        assert torch.equal(a, b), n
    assert (rec.pruning.seconds == 0.0) == (final == "stitched")

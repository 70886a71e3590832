"""Per-layer sensitivity measures (the inputs of sparsity allocation) and their on-disk cache.

- :func:`fisher_trace`: empirical Fisher trace per linear (MSP), computed block by block.
- :func:`hessian_trace`: Hutchinson estimate of the per-layer Hessian trace (Shao et al.).
- :func:`owl_outlier_ratios`: OWL's share of outlier Wanda scores per block.

Scores are expensive (a forward and backward over the calibration set), and allocation methods
are cheap, so :func:`cached_scores` stores scores as JSON keyed by a hash of everything they
depend on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..io import atomic_write_text
from ..names import block_index
from .fisher import fisher_trace
from .hessian import hessian_trace
from .owl import outlier_ratio, owl_outlier_ratios

__all__ = [
    "aggregate_by_block",
    "cached_scores",
    "fisher_trace",
    "hessian_trace",
    "model_fingerprint",
    "outlier_ratio",
    "owl_outlier_ratios",
    "settings_key",
]


def aggregate_by_block(scores: Mapping[str, float], blocks_name: str) -> dict[int, float]:
    """Sum per-layer scores over the linears of each decoder block: ``{block index: score}``."""
    out: dict[int, float] = {}
    for name, value in scores.items():
        b = block_index(name, blocks_name)
        out[b] = out.get(b, 0.0) + float(value)
    return dict(sorted(out.items()))


def model_fingerprint(model: nn.Module) -> str:
    """Short hash identifying a model's architecture and weights, for cache keys.

    Hashes the config and every parameter's name, shape, dtype and bytes: exact, with no copy of a CPU
    tensor (SHA-256 reads ~1.7 GB/s on these CPUs, faster than a float64 sum, which also copied every
    tensor); a device tensor is read in 64 MiB slices.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    from ..streaming import stream_of

    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            if p.is_meta:  # a streamed model's block (hashed below from the checkpoint) or a placeholder
                continue
            flat = p.detach().reshape(-1).view(torch.uint8)
            for chunk in flat.split(64 * 2**20):
                h.update(chunk.cpu().contiguous().numpy())
    stream = stream_of(model)
    if stream is not None:
        stream.fingerprint_into(h)
    return h.hexdigest()[:16]


def settings_key(kind: str, settings: Mapping[str, Any]) -> str:
    """Stable hash of ``kind`` and JSON-serialisable ``settings`` (key order does not matter)."""
    try:
        text = json.dumps({"kind": kind, "settings": settings}, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cache settings for {kind!r} are not JSON-serialisable: {e}") from None
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _normalised(settings: Mapping[str, Any]) -> Any:
    # what the settings look like once written and read back (tuples -> lists, ...)
    return json.loads(json.dumps(settings, sort_keys=True))


def cached_scores(
    kind: str,
    settings: Mapping[str, Any],
    compute: Callable[[], Mapping[Any, float]],
    cache_dir: str | os.PathLike | None,
) -> dict:
    """Return ``compute()``, reusing a previous result stored under ``cache_dir`` when the settings match.

    ``settings`` must hold everything the scores depend on (model fingerprint, calibration seed,
    number of samples, sequence length, method parameters); it is written inside the JSON file,
    whose name is ``<kind>-<hash of settings>.json``. Keys keep their type (OWL uses int block
    indices), because entries are stored as ``[key, value]`` pairs. ``cache_dir=None`` disables
    caching. Writes are atomic, so an interrupted run never leaves a truncated file.
    """
    if cache_dir is None:
        return dict(compute())
    directory = Path(cache_dir)
    path = directory / f"{kind}-{settings_key(kind, settings)}.json"
    expected = _normalised(settings)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("kind") == kind and data.get("settings") == expected:
                return {(k if not isinstance(k, list) else tuple(k)): float(v) for k, v in data["scores"]}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or foreign file: recompute and overwrite it
    scores = dict(compute())
    payload = {"kind": kind, "settings": expected, "scores": [[k, float(v)] for k, v in scores.items()]}
    atomic_write_text(path, json.dumps(payload, indent=1))
    return scores


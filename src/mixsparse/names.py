"""Qualified layer names (``model.layers.3.mlp.up_proj``): the one parser of block index and layer kind.

Torch-free, so the config, the run record and the report can read names without loading a model.
"""

from __future__ import annotations

import re

from .errors import SparsityError

# without the blocks' own name (a run.json read back): the first dotted number is the block index
_LAYER_RE = re.compile(r"^(?:(?P<prefix>.*?)\.)?(?P<block>\d+)\.(?P<kind>.+)$")


def split_layer(name: str, blocks_name: str | None = None) -> tuple[int | None, str]:
    """``model.layers.3.mlp.up_proj`` -> ``(3, "mlp.up_proj")``.

    With ``blocks_name`` (the dotted path of the decoder blocks) the name must lie inside them, else
    :class:`SparsityError`; without it, a name holding no block index gives ``(None, name)``."""
    if blocks_name is None:
        m = _LAYER_RE.match(name)
        return (int(m["block"]), m["kind"]) if m else (None, name)
    index, _, kind = name[len(blocks_name) + 1:].partition(".")
    if not name.startswith(blocks_name + ".") or not index.isdigit():
        raise SparsityError(f"layer {name!r} is not inside the decoder blocks {blocks_name!r}")
    return int(index), kind


def kind_group(kind: str) -> str:
    """A layer kind with the expert index generalised (``mlp.experts.down_proj[5]`` -> ``mlp.experts.down_proj[*]``):
    what plots and tables group by, so a model with 128 experts has one series per matrix, not 128."""
    return re.sub(r"\[\d+\]$", "[*]", kind)


def block_index(name: str, blocks_name: str) -> int:
    """Index of the block a qualified layer name belongs to ('model.layers.3.mlp.up_proj' -> 3)."""
    return split_layer(name, blocks_name)[0]  # type: ignore[return-value]

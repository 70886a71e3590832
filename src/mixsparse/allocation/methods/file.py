"""A per-layer map read from ``prune.allocation_file`` (the YAML ``mixsparse search`` writes), so one
searched map serves any pruner."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

from ...errors import ConfigError
from ...io import yaml_load
from ...sparsity import NM, SparsityMap
from ..registry import Allocation, AllocationContext, AllocationMethod, register_allocation


def read_allocation_file(path: str | PathLike | None) -> dict:
    """The per-layer map of an allocation YAML (as `mixsparse search` writes it), checked for form only."""
    import yaml

    if not path:
        raise ConfigError("prune.allocation 'file' needs prune.allocation_file (a YAML map from `mixsparse search`)")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"allocation file {p} does not exist")
    try:
        data = yaml_load(p.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"allocation file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    layers = data.get("per_layer") if isinstance(data, dict) and "per_layer" in data else data
    if not isinstance(layers, dict) or not layers:
        raise ConfigError(f"allocation file {p} must map layer names to sparsities (or hold a 'per_layer' mapping)")
    return layers



def load_allocation(path: str | PathLike, counts: dict[str, int]) -> SparsityMap:
    """The map of an allocation file; it must name every prunable layer of this model (a layer left out
    would silently stay dense)."""
    layers = read_allocation_file(path)
    missing = [n for n in counts if n not in layers]
    if missing:
        raise ConfigError(f"allocation file {path} has no sparsity for {len(missing)} of {len(counts)} prunable layers "
                          f"(e.g. {missing[0]}); it was made for another model? Regenerate it with `mixsparse search`")
    return SparsityMap(layers, counts)


def file_allocation(cfg, counts: dict[str, int]) -> SparsityMap:
    """``prune.allocation_file``'s map, checked against the model and, when given, ``--sparsity``."""
    sm = load_allocation(cfg.prune.allocation_file, counts)
    avg, target = sm.average(counts), cfg.prune.sparsity
    if cfg.prune.sparsity_given and not isinstance(target, NM) and abs(avg - float(target)) > 5e-4:
        raise ConfigError(f"allocation file {cfg.prune.allocation_file} averages {avg:.4f} but --sparsity is {target}; "
                          "drop --sparsity (the file decides) or search a map for that target")
    return sm


@register_allocation("file")
class FileAllocation(AllocationMethod):
    assigns_patterns = True

    def check(self, cfg, counts: dict[str, int] | None = None) -> None:
        read_allocation_file(cfg.prune.allocation_file)
        if counts is not None:  # its layers and average against the model
            file_allocation(cfg, counts)

    def allocate(self, ctx: AllocationContext) -> Allocation:
        return Allocation(self.name, file_allocation(ctx.cfg, ctx.counts))

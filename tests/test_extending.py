"""Adding an allocation method is one registered class: usable from YAML and the CLI, options typed."""

import json
from dataclasses import dataclass

import pytest

from mixsparse.allocation import (Allocation, AllocationMethod, exact_budget, get_allocation, register_allocation,
                                  unregister_allocation)
from mixsparse.cli import main
from mixsparse.config import load_config
from mixsparse.errors import ConfigError
from mixsparse.sparsity import SparsityMap


@pytest.fixture
def ramp():
    """A new method: sparsity rising linearly through the layers by +- ``spread``, on budget."""

    @register_allocation("ramp")
    class Ramp(AllocationMethod):
        @dataclass
        class Options:
            spread: float = 0.1

        def allocate(self, ctx):
            names = list(ctx.counts)
            raw = {n: ctx.target + self.options.spread * (2 * i / (len(names) - 1) - 1) for i, n in enumerate(names)}
            return Allocation(self.name, SparsityMap(exact_budget(raw, ctx.target, ctx.counts), ctx.counts))

    yield Ramp
    unregister_allocation("ramp")


def test_a_registered_method_is_read_from_yaml_with_typed_options(ramp, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("prune:\n  allocation: ramp\n  sparsity: 0.5\nallocation:\n  ramp:\n    spread: 0.2\n")
    cfg = load_config(path)
    assert get_allocation(cfg.prune.allocation) is ramp
    assert cfg.allocation_options() == ramp.Options(spread=0.2)
    assert cfg.to_dict()["allocation"]["ramp"] == {"spread": 0.2}
    path.write_text("prune:\n  allocation: ramp\nallocation:\n  ramp:\n    sprad: 0.2\n")
    with pytest.raises(ConfigError, match="allocation.ramp.sprad"):
        load_config(path)


def test_a_registered_method_runs_from_the_cli(ramp, quick_cli, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["list"]) == 0
    assert "ramp" in capsys.readouterr().out
    assert main(["prune", *quick_cli(sparsity=0.5), "--allocation", "ramp", "--set", "allocation.ramp.spread=0.2",
                 "--no-export", "--out", str(out)]) == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["allocation"]["method"] == "ramp"
    per_layer = list(rec["allocation"]["per_layer"].values())
    assert per_layer == sorted(per_layer) and per_layer[-1] - per_layer[0] == pytest.approx(0.4)
    assert rec["allocation"]["average_requested"] == pytest.approx(0.5, abs=1e-9)
    assert rec["pruning"]["overall_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_unknown_methods_are_refused_by_name():
    with pytest.raises(ConfigError, match="ramp"):
        load_config(None, {"prune.allocation": "ramp"})
    with pytest.raises(ConfigError, match="allocation.ramp"):
        load_config(None, {"allocation.ramp.spread": 0.2})
    with pytest.raises(ConfigError, match="allocation.owl.lam"):
        load_config(None, {"allocation.owl_lambda": 0.2})  # the flat keys of earlier versions name their new place

"""Typed configs: YAML keys equal field names, unknown keys and bad types named."""

import pytest

from mixsparse.config import RunConfig, load_config, parse_override
from mixsparse.errors import ConfigError, SparsityError
from mixsparse.sparsity import NM


def test_defaults_and_overrides():
    cfg = load_config(None, {"prune.sparsity": 0.7, "search.generations": 5, "prune.allocation": "msp"})
    assert isinstance(cfg, RunConfig)
    assert cfg.prune.sparsity == 0.7 and cfg.search.generations == 5 and cfg.prune.allocation == "msp"
    assert load_config(None, {"prune.sparsity": "2:4"}).prune.sparsity == NM(2, 4)


def test_yaml_file(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("prune:\n  pruner: sparsegpt\n  sparsity: 0.6\n  options: {blocksize: 64}\nsearch:\n  stages: [[1, 2], [3, 1]]\n")
    cfg = load_config(p)
    assert cfg.prune.pruner == "sparsegpt" and cfg.prune.options == {"blocksize": 64}
    assert cfg.search.stages == [[1, 2], [3, 1]]


@pytest.mark.parametrize("overrides, message", [
    ({"search.generatons": 3}, "search.generatons"),
    ({"prnue.sparsity": 0.5}, "prnue"),
    ({"prune.allocation": "magic"}, "prune.allocation"),
    ({"data.seqlen": "long"}, "data.seqlen"),
    ({"data.calibration_samples": 0}, "calibration_samples"),
    ({"search.fitness": "acc"}, "search.fitness"),
    ({"search.fitness_windows": 1, "search.stages": [[1, 1], [4, 1]]}, "fitness_windows"),
    ({"allocation.msp.min_sparsity": 0.9, "allocation.msp.max_sparsity": 0.5}, "min_sparsity"),
    ({"prune.allocation": "file"}, "allocation_file"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("bad", [1.0, -0.2, "3:2", "half"])
def test_bad_sparsity(bad):
    with pytest.raises(SparsityError):
        load_config(None, {"prune.sparsity": bad})


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("prune: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_parse_override():
    assert parse_override("search.stages=[[1,2],[3,1]]") == ("search.stages", [[1, 2], [3, 1]])
    assert parse_override("prune.sparsity=2:4") == ("prune.sparsity", "2:4")
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_to_dict_round_trips():
    cfg = load_config(None, {"prune.sparsity": "2:4", "search.patterns": ["1:4", "2:4", "3:4"]})
    again = load_config(None, {f"{sec}.{k}": v for sec, d in cfg.to_dict().items() for k, v in d.items()})
    assert again == cfg


def test_unquoted_nm_in_yaml_is_a_pattern_not_sexagesimal(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("prune:\n  sparsity: 2:4\nsearch:\n  patterns: [1:4, 2:4, 3:4]\n")
    cfg = load_config(p)
    assert cfg.prune.sparsity == NM(2, 4) and cfg.search.patterns == ["1:4", "2:4", "3:4"]


def test_every_shipped_config_loads():
    from pathlib import Path

    from mixsparse.config import load_config

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        load_config(path)
    recover = load_config(configs[0].parent / "msp70-recover.yaml").recover
    assert recover.mode == "blockwise+lora" and recover.finetune.kl_weight == 1.0


def test_config_and_record_import_no_torch():
    """Validating a config (or reading a run record) must not pay for importing torch."""
    import subprocess
    import sys

    code = ("import sys, mixsparse.config, mixsparse.record, mixsparse.allocation; "
            "mixsparse.config.load_config(None, {'prune.allocation': 'owl', 'allocation.owl.lam': 0.1}); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]")
    subprocess.run([sys.executable, "-c", code], check=True)

"""The typed run record: exact round trip, shape errors naming the field, schema versions."""

import re

import pytest

from mixsparse.errors import ConfigError
from mixsparse.record import SCHEMA, AllocationInfo, Perplexity, RunRecord


def test_round_trip_is_exact(tmp_path):
    rec = RunRecord(config={"prune": {"sparsity": 0.7}}, status="finished",
                    allocation=AllocationInfo(method="msp", target="2:4", per_layer={"a.0.q": "2:4", "a.0.k": 0.6}),
                    perplexity=Perplexity(split="test", tokens=1024, seqlen=512, dense=27.5, pruned=80.0),
                    timings={"prune": 1.5}, zeroshot={"cloze": {"accuracy": 0.3, "stderr": 0.1, "n": 10}})
    assert RunRecord.from_dict(rec.to_dict()) == rec
    rec.save(tmp_path / "run.json")
    loaded = RunRecord.load(tmp_path)
    assert loaded == rec and loaded.schema == SCHEMA and loaded.perplexity.pruned == 80.0


@pytest.mark.parametrize("data,needle", [
    ({"config": {}, "perplexity": {"tokens": 1.5}}, "perplexity.tokens must be a number"),
    ({"config": {}, "model": {"num_params": True}}, "model.num_params"),
    ({"config": {}, "allocation": {"per_layer": [0.5]}}, "allocation.per_layer must be a dict"),
    ({"config": {}, "model": {"nme": "x"}}, "unknown field(s) model.nme"),
    ({"config": {}, "sizes": {"ratio": "big"}}, "sizes.ratio must be a number"),
    ({"config": {}, "schema": SCHEMA + 1}, "upgrade mixsparse"),
    ({"perplexity": {}}, "no 'config' section"),
    ({"config": {}, "recovery": {"mode": "blockwise+lora", "stages": {"mode": "lora"}}}, "recovery.stages must be a list"),
    ({"config": {}, "recovery": {"mode": "blockwise+lora", "stages": ["lora"]}}, "recovery.stages[0] must be an object"),
    ({"config": {}, "recovery": {"stages": [{"mode": "lora", "seconds": "1 s"}]}}, "recovery.stages[0]: recovery.seconds"),
])
def test_malformed_records_name_the_field(data, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        RunRecord.from_dict(data)


def test_a_record_without_schema_is_version_1_and_its_config_is_migrated():
    rec = RunRecord.from_dict({"config": {"allocation": {"owl_lambda": 0.2, "sensitivity_seqlen": 64}}})
    assert rec.schema == 1
    alloc = rec.run_config()["allocation"]
    assert alloc["owl"] == {"lam": 0.2} and alloc["hessian"] == {"seqlen": 64} and alloc["msp"] == {"seqlen": 64}
    new = RunRecord.from_dict({"config": {"allocation": {"owl": {"lam": 0.2}}}, "schema": SCHEMA})
    assert new.run_config() == {"allocation": {"owl": {"lam": 0.2}}}

import math

import pytest

from mixsparse.errors import SparsityError, UnknownNameError
from mixsparse.sparsity import NM, SparsityMap, parse_layer_sparsity


@pytest.mark.parametrize("bad", [1.0, -0.1, math.nan, math.inf, "abc", True, None, "4:2", "0:4", "2:4:8", "a:b"])
def test_bad_layer_sparsity_is_refused(bad):
    with pytest.raises(SparsityError):
        parse_layer_sparsity(bad)


def test_parse_forms():
    assert parse_layer_sparsity("0.7") == 0.7
    assert parse_layer_sparsity("2:4") == NM(2, 4)
    assert NM(1, 4).sparsity == 0.75
    assert str(NM(3, 8)) == "3:8"


def test_weighted_average_and_roundtrip():
    counts = {"a": 100, "b": 300}
    m = SparsityMap({"a": 0.2, "b": "2:4"}, counts)
    assert m.average() == pytest.approx((0.2 * 100 + 0.5 * 300) / 400)
    assert m.to_dict() == {"a": 0.2, "b": "2:4"}
    assert SparsityMap(m.to_dict(), counts).sparsities() == m.sparsities()


def test_unknown_layer_named():
    with pytest.raises(UnknownNameError, match="nope"):
        SparsityMap({"nope": 0.5}, {"a": 10})


def test_nm_divisibility_named():
    m = SparsityMap({"a": "2:4"}, {"a": 12})
    with pytest.raises(SparsityError, match="'a'.*divide"):
        m.check_divisible({"a": 6})

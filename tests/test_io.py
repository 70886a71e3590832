"""Atomic writes: an artifact is complete or absent, never half-written."""

import json
import os
import stat

import pytest

from mixsparse.errors import ConfigError
from mixsparse.io import atomic_dir, atomic_write, atomic_write_json, atomic_write_text, atomic_write_yaml


def _leftovers(d):
    return [p.name for p in d.iterdir() if p.name.startswith(".")]


def test_write_replaces_in_one_step_and_cleans_up(tmp_path):
    p = tmp_path / "a" / "x.json"
    atomic_write_json(p, {"a": 1, "inf": float("inf")})
    assert json.loads(p.read_text().replace("Infinity", "1e999"))["a"] == 1
    atomic_write_text(p, "second")
    assert p.read_text() == "second" and not _leftovers(p.parent)


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("old")

    def boom(tmp):
        tmp.write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(p, boom)
    assert p.read_text() == "old" and not _leftovers(tmp_path)


def test_mode(tmp_path):
    p = atomic_write_text(tmp_path / "m.txt", "x", mode=0o644)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644


def test_yaml_makes_non_finite_floats_readable(tmp_path):
    p = atomic_write_yaml(tmp_path / "y.yaml", {"a": float("inf"), "b": [1.5]})
    assert "inf" in p.read_text() and "1.5" in p.read_text()


def test_atomic_dir_refuses_non_empty_then_overwrites(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "f").write_text("1")
    assert (out / "f").read_text() == "1"
    with pytest.raises(ConfigError, match="not empty"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True, mode=0o755) as d:
        (d / "g").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["g"]
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    assert not _leftovers(tmp_path)


def test_atomic_dir_interrupted_leaves_old_untouched(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "f").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as d:
            (d / "f").write_text("half")
            raise RuntimeError
    assert (out / "f").read_text() == "1" and not _leftovers(tmp_path)


def test_atomic_dir_keeps_a_finished_copy_made_meanwhile(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, overwrite=True, keep_existing=lambda p: (p / "done").exists()) as d:
        (d / "mine").write_text("x")
        out.mkdir()
        (out / "done").write_text("other process")
    assert sorted(p.name for p in out.iterdir()) == ["done"] and not _leftovers(tmp_path)

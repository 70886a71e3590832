"""Atomic writes: an artifact is either complete or absent, never half-written (a crash or Ctrl-C
during a save must not destroy what a user already computed).

Every module writes files and directories through here, so the temp-file-then-``os.replace`` logic
exists once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def atomic_write(path: str | Path, write: Callable[[Path], None], mode: int | None = None) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then rename it into place.

    The temp file is created private (0600, as ``mkstemp`` does); ``mode`` (e.g. ``0o644`` for a
    cache other users share) is applied to it before the rename, so ``path`` never has the wrong mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), mode)


@contextlib.contextmanager
def atomic_dir(
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    mode: int | None = None,
    keep_existing: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Yield a temp dir beside ``out_dir``; on success it replaces ``out_dir`` in one rename.

    A non-empty ``out_dir`` is refused unless ``overwrite``; then the old one is moved aside first
    (``os.replace`` cannot replace a non-empty directory) and deleted only once the new one is in place.
    The temp dir is created private (0700, as ``mkdtemp`` does); ``mode`` (e.g. ``0o755``) is applied
    to it (not to the files in it) before the rename. ``keep_existing(out_dir)`` is asked at commit
    time when ``out_dir`` exists: if it says True (another process finished the same work first), the
    new directory is discarded and the existing one left alone. On an exception the temp dir is
    removed and ``out_dir`` is untouched.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {str(out)!r} is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if keep_existing is not None and out.exists() and keep_existing(out):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if mode is not None:
            os.chmod(tmp, mode)
        old = None
        if out.is_dir() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "d")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def to_plain(value: Any, where: str = "value", strict: bool = False) -> Any:
    """JSON/YAML types from what records and checkpoint metadata hold: sparsity maps and N:M patterns as
    their strings, 0-d tensors and numpy scalars as numbers, paths as strings, infinities as "inf"/"-inf"
    and NaN as null (strict JSON that other tools read). Anything else is ``str()``-ed, or with ``strict``
    refused (a checkpoint's config must not hold an unreadable repr)."""
    from .sparsity import NM, SparsityMap

    if isinstance(value, SparsityMap):
        return value.to_dict()
    if isinstance(value, NM):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, f"{where}.{k}", strict) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v, where, strict) for v in value]
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # torch/numpy scalars, without importing torch
        return to_plain(value.item(), where, strict)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if strict:
        raise ConfigError(f"{where}: cannot store a {type(value).__name__} as JSON")
    return str(value)


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Strict JSON that other tools read: infinities are written as the strings "inf"/"-inf", NaN as null."""
    return atomic_write_text(path, json.dumps(to_plain(data), indent=1, default=str, allow_nan=False) + "\n")


def atomic_write_yaml(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, yaml.safe_dump(to_plain(data), sort_keys=False))


def fingerprint(payload: Any) -> str:
    """Short stable hash of JSON-able settings: the key of a cache entry or a resumable state."""
    import hashlib

    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_json(path: str | Path, error: type[Exception] = ConfigError) -> Any:
    """The JSON in ``path``; a file that cannot be read or parsed is ``error`` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{str(path)!r} is not valid JSON (corrupt or truncated?): {e}") from None


class _Loader(yaml.SafeLoader):
    """YAML without YAML 1.1 sexagesimal numbers: ``sparsity: 2:4`` must stay the string '2:4'
    (PyYAML's default would read it as the integer 124)."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"
               r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)

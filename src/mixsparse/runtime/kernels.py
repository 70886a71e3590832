"""The sparse CPU kernels (``csrc/sparse_kernels.cpp``), built once with ``torch.utils.cpp_extension``.

:func:`build` compiles them into the user's cache (``scripts/install.sh`` runs it when a C++ compiler is
present); :func:`get` loads the built module, or returns None with the reason (no compiler, build failed),
in which case :class:`~mixsparse.runtime.SparseLinear` uses its pure-torch path: correct, and slower (it
expands each layer to a dense scratch matrix for every call)."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "sparse_kernels.cpp"
ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512"}


def build_dir() -> Path:
    """Per torch version and source: a changed kernel or torch is built afresh, never mixed."""
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mixsparse" / "kernels" / key
    root.mkdir(parents=True, exist_ok=True)
    return root


def build(verbose: bool = False):
    """Compile (or load, when already built) the extension; raises on failure."""
    from torch.utils.cpp_extension import load

    # -fopenmp: at::parallel_for is inlined from torch's headers and uses OpenMP pragmas
    return load(name="mixsparse_kernels", sources=[str(SOURCE)], build_directory=str(build_dir()),
                extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=verbose)


@functools.lru_cache(maxsize=1)
def _loaded():
    try:
        return build(), None
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: the torch path still works
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"


def get():
    """The kernels module, or None (see :func:`reason`)."""
    return _loaded()[0]


def reason() -> str | None:
    """Why the kernels are unavailable (None when they are)."""
    return _loaded()[1]


def isa(wanted: int = -1) -> str:
    """The instruction set the kernels use on this CPU (``wanted`` caps it: 0 scalar, 1 AVX2, 2 AVX-512)."""
    k = get()
    return "torch" if k is None else ISA_NAMES[int(k.isa_level(wanted))]

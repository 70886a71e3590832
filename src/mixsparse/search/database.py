"""Level database: every prunable layer pruned once at every level of the search space, on dense
activations, so that no candidate is ever pruned again: a candidate is assembled from entries.

The model itself stays dense during the whole search; a candidate's weights exist only where the
fitness needs them (one block at a time on the device, or a device replica, see ``fitness.py``).

Memory, per prunable parameter, whatever the number of levels L:

* mask-only pruners (magnitude, Wanda): the masks of one layer are nested (a weight pruned at a level
  stays pruned at every sparser level, since all come from one ranking), so one byte per weight
  holds them all: ``kept_levels[w]`` = number of levels at which ``w`` is kept; the mask at level j
  is ``kept_levels > j``. **1 byte/parameter in RAM**, plus the model's own dense weights (no copy).
* reconstructing pruners (SparseGPT): the kept weights change per level, so each level's weight is
  stored: one safetensors file per layer in a directory on disk (memory-mapped when read), reusable
  by later runs with the same settings (a ``complete.json`` marker names them). **L x bytes-per-weight
  on disk**, in ``store_dtype`` (the pipeline uses the model's dtype under ``search.final: stitched``, the
  default, because the final model is stitched from these levels and must lose no precision; with
  ``sequential`` it uses the fitness dtype, which bf16 halves for an fp32 model);
  free disk space is checked before building. RAM holds the most recently used entries up to
  ``ram_bytes`` (default 0: read from the page cache each time) plus, while building, one layer's levels.

A model streamed from its checkpoint (larger than RAM, :mod:`mixsparse.streaming`) keeps a mask-only
pruner's ``kept_levels`` on disk too (one file per layer, read when its block is evaluated), so RAM holds
no per-parameter state; :meth:`LevelDatabase.write` stitches the final model block by block.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine import min_tokens, observe_layerwise
from ..errors import ConfigError, SparsityError
from ..io import atomic_write_json
from ..modeling import prunable_linears
from ..pruners import get_pruner
from ..streaming import stream_of
from .space import LevelSpace, Offsets

log = logging.getLogger(__name__)


def _check_disk(store: Path, layers: dict, n_levels: int, dtype: torch.dtype | None) -> None:
    need = sum(lin.weight.numel() * (torch.empty((), dtype=dtype or lin.weight.dtype).element_size())
               for lin in layers.values()) * n_levels
    free = shutil.disk_usage(store).free
    if need > 0.95 * free:
        raise ConfigError(f"the level database of a reconstructing pruner needs {need / 2**30:.1f} GiB in {store}, "
                          f"{free / 2**30:.1f} GiB are free; use fewer levels (search.step, search.max_shift), "
                          "another run directory, or search with a mask-only pruner (wanda) and prune with this one")


def _safe_name(layer: str) -> str:
    return layer.replace("/", "_")


class LevelDatabase:
    """Pruned weight of every (layer, level); see the module docstring for its memory."""

    def __init__(self, model: nn.Module, space: LevelSpace, masks_only: bool, store_dir: Path | None = None,
                 ram_bytes: int = 0, owns_store: bool = False):
        self.model = model
        self.space = space
        self.layers = prunable_linears(model)
        self.masks_only = masks_only
        self.stream = stream_of(model)
        self.kept_levels: dict[str, torch.Tensor] = {}  # mask-only pruners
        self.store_dir = store_dir  # reconstructing pruners
        self.ram_bytes = ram_bytes
        self._owns_store = owns_store
        self._lru: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._lru_bytes = 0
        self.seconds = 0.0
        self.reused = False
        self.fallbacks: dict[str, dict] = {}  # starved layers (see LayerPruner.starved): pruned by magnitude

    # --- building -------------------------------------------------------------------------
    @classmethod
    def build(cls, model: nn.Module, space: LevelSpace, calib_ids: torch.Tensor | None, pruner: str,
              pruner_options: dict | None = None, *, device=None, store_dir: str | Path | None = None,
              fingerprint: str | None = None, ram_bytes: int = 0, store_dtype: torch.dtype | None = None,
              progress: bool = True, min_token_share: float = 0.005) -> "LevelDatabase":
        """Prune every layer at every level once (one-shot, dense activations). ``store_dir``: where a
        reconstructing pruner's levels go (a temporary directory when None, deleted by :meth:`free`);
        with a ``fingerprint`` an existing complete store of the same settings is reused as is."""
        pcls = get_pruner(pruner)
        masks_only = not getattr(pcls, "reconstructs", False)
        owns = False
        on_disk = not masks_only or stream_of(model) is not None  # a streamed model's masks go to disk too
        if on_disk:
            if store_dir is None:
                store_dir, owns = Path(tempfile.mkdtemp(prefix="mixsparse-levels-")), True
            store_dir = Path(store_dir)
        else:
            store_dir = None
        db = cls(model, space, masks_only, store_dir, ram_bytes, owns)
        if on_disk and fingerprint and db._complete(fingerprint):
            db.reused = True
            db.fallbacks = json.loads((store_dir / "complete.json").read_text()).get("fallbacks", {})
            log.info("reusing the level database in %s", store_dir)
            return db
        levels = list(space.offsets)
        if store_dir is not None:
            if store_dir.exists() and not owns:
                shutil.rmtree(store_dir)
            store_dir.mkdir(parents=True, exist_ok=True)
        try:
            if store_dir is not None:
                _check_disk(store_dir, db.layers, 1 if masks_only else len(levels),
                            torch.uint8 if masks_only else store_dtype)
            db._fill(model, space, calib_ids, pruner, pruner_options, device, store_dtype, progress, min_token_share)
        except BaseException:
            db.free()  # a temporary store goes; a named one stays incomplete (no marker) and is rebuilt next time
            raise
        if on_disk and fingerprint:
            atomic_write_json(store_dir / "complete.json", {"fingerprint": fingerprint, "layers": len(db.layers),
                                                            "levels": levels, "fallbacks": db.fallbacks})
        return db

    def _fill(self, model, space, calib_ids, pruner, pruner_options, device, store_dtype, progress,
              min_token_share) -> None:
        db, masks_only = self, self.masks_only
        t0 = time.perf_counter()
        bar = tqdm(total=len(db.layers), desc=f"level database[{pruner}]", disable=not progress)
        levels = list(space.offsets)

        def on_layer(name: str, p) -> None:
            if masks_only:
                count, prev = None, None
                for k in levels:
                    mask = p.prune(space.level(k)).mask
                    if prev is not None and bool((mask & ~prev).any()):
                        raise SparsityError(
                            f"pruner {pruner!r}: the mask of {name} at {space.level(k)} keeps weights pruned at a "
                            "lower level; the level database needs nested masks (one ranking per layer)")
                    count = mask.to(torch.uint8) if count is None else count + mask.to(torch.uint8)
                    prev = mask
                if db.stream is not None:
                    from safetensors.torch import save_file

                    save_file({"kept_levels": count.cpu().contiguous()}, str(db._path(name)))
                else:
                    db.kept_levels[name] = count.cpu()
            else:
                from safetensors.torch import save_file

                tensors = {f"level_{j}": p.prune(space.level(k)).weight.detach().to("cpu", store_dtype).contiguous()
                           for j, k in enumerate(levels)}
                path = db._path(name)
                tmp = path.with_name(path.name + ".tmp")
                save_file(tensors, str(tmp))
                os.replace(tmp, path)
            if p.starved:
                db.fallbacks[name] = {"tokens": p.nsamples, "min_tokens": p.min_tokens, "fallback": "magnitude per row"}
            p.free()
            bar.update(1)

        if len(levels) > 255:
            raise ConfigError(f"the level database holds at most 255 levels per layer, the space has {len(levels)}")
        make = get_pruner(pruner).factory(pruner_options, min_tokens(calib_ids, min_token_share))
        observe_layerwise(model, calib_ids, make, on_layer, layers=db.layers, device=device)
        bar.close()
        db.seconds = time.perf_counter() - t0

    def _path(self, name: str) -> Path:
        assert self.store_dir is not None
        return self.store_dir / f"{_safe_name(name)}.safetensors"

    def _complete(self, fingerprint: str) -> bool:
        marker = self.store_dir / "complete.json" if self.store_dir else None
        if marker is None or not marker.is_file():
            return False
        try:
            ok = json.loads(marker.read_text()).get("fingerprint") == fingerprint
        except (OSError, json.JSONDecodeError):
            return False
        return ok and all(self._path(n).is_file() for n in self.layers)

    # --- reading --------------------------------------------------------------------------
    def _level_index(self, k: int) -> int:
        if not self.space.min_offset <= k <= self.space.max_offset:
            raise SparsityError(f"level offset {k} is outside [{self.space.min_offset}, {self.space.max_offset}]")
        return k - self.space.min_offset

    def keep_mask(self, name: str, k: int, device: torch.device | str | None = None) -> torch.Tensor:
        j = self._level_index(k)
        if self.masks_only:
            return self._kept(name).to(device or "cpu") > j
        return self._stored(name, j).to(device or "cpu") != 0

    def _kept(self, name: str) -> torch.Tensor:
        if name in self.kept_levels:
            return self.kept_levels[name]
        from safetensors import safe_open

        with safe_open(str(self._path(name)), framework="pt", device="cpu") as f:  # a streamed model's, on disk
            return f.get_tensor("kept_levels")

    def weight(self, name: str, k: int, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """Weight of layer ``name`` at level offset ``k``, on ``device`` in ``dtype`` (default: the
        layer's own). Masking happens on the device: only the dense weight and one byte per weight travel."""
        j = self._level_index(k)
        dense = self.layers[name].weight.detach()
        device = torch.device(device) if device is not None else dense.device
        dtype = dtype or dense.dtype
        if self.masks_only:
            keep = self._kept(name).to(device) > j
            w = dense.to(device=device, dtype=dtype)
            return torch.where(keep, w, torch.zeros((), dtype=dtype, device=device))
        return self._stored(name, j).to(device=device, dtype=dtype)

    def _stored(self, name: str, j: int) -> torch.Tensor:
        key = (name, j)
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        t = self._read(name, j)
        size = t.numel() * t.element_size()
        if self.ram_bytes and size <= self.ram_bytes:
            self._lru[key] = t
            self._lru_bytes += size
            while self._lru_bytes > self.ram_bytes:
                _, old = self._lru.popitem(last=False)
                self._lru_bytes -= old.numel() * old.element_size()
        return t

    def _read(self, name: str, j: int) -> torch.Tensor:
        """Level ``j`` of ``name`` from its file (what :meth:`_stored` caches)."""
        from safetensors import safe_open

        # opened per read: a mapping kept open would keep every page read so far in this process's RSS
        with safe_open(str(self._path(name)), framework="pt", device="cpu") as f:
            return f.get_tensor(f"level_{j}")

    @torch.no_grad()
    def write(self, offsets: Offsets) -> None:
        """Put a candidate's weights into the model itself (the final stitched model); a streamed model's blocks
        are read, written and dropped one at a time."""
        for names in [list(offsets)] if self.stream is None else self.stream.editing(offsets):
            for name in names:
                w = self.layers[name].weight
                w.copy_(self.weight(name, offsets[name], w.device, w.dtype))

    # --- accounting -----------------------------------------------------------------------
    def ram_bytes_used(self) -> int:
        return sum(t.numel() for t in self.kept_levels.values()) + self._lru_bytes

    def disk_bytes(self) -> int:
        if self.store_dir is None or not self.store_dir.exists():
            return 0
        return sum(p.stat().st_size for p in self.store_dir.glob("*.safetensors"))

    def __enter__(self) -> "LevelDatabase":
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def free(self) -> None:
        """Drop every entry (before evaluation/export); a temporary store is deleted, a reusable one kept."""
        self.kept_levels.clear()
        self._lru.clear()
        self._lru_bytes = 0
        if self._owns_store and self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)

"""Joint search over per-layer (sparsity, bits) under a bytes budget: which layers to prune, which to quantize,
and how hard, in one search.

A layer's stored size per weight, in mixsparse's compressed format (``export.py``), with ``o`` the bits of its
quantization scales (16 per group, plus 8 for an asymmetric zero point):

* quantized, dense (no bitmask): ``b + o``
* pruned to sparsity ``s`` and quantized: ``1 + (1 - s) * b + o`` (one mask bit per weight)

The genotype stays one integer per layer, as in MSP's search: the *cost level* ``k``, i.e. ``target + k * step``
bits per weight, with ``sum(count * k) == 0`` kept exact by the same operators (:mod:`.space`); so the bytes of the
prunable layers are exactly the budget's (at most: a pruned count is rounded up). At each cost level a layer has
several ways to spend its bits (dense 3-bit, 1/3 pruned + 3-bit, 50% + 4-bit, 75% + 8-bit, ... at 3.25 bits): the
level database runs the joint SparseGPT sweep (prune + quantize in one OBS pass) for each, on dense activations, and
keeps the one with the least output error on the calibration inputs, ``tr(dW H dW^T)`` (the quantity the sweep
itself minimises, so comparable across variants). The search then decides how many bits each layer gets, scored by
KL to the dense model on held-out windows like MSP.

Stored per (layer, level): the chosen variant's integer codes (one byte each), scales and zero points; the weight
the fitness and the final model see is their exact dequantization, and the codes go into the packed checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine import min_tokens, observe_layerwise
from ..errors import ConfigError
from ..io import atomic_write_json
from ..quant.grid import QuantizedWeight, QuantSpec
from ..sparsity import SparsityMap
from .database import LevelDatabase, _check_disk
from .space import LevelSpace, Offsets

log = logging.getLogger(__name__)

SCALE_BITS = 16  # float16 / bfloat16 scales
ZERO_BITS = 8  # uint8 zero points (asymmetric grids)
# snap_to_grid works on fractions in [0, 1): costs are divided by this many bits
_COST_SCALE = 32.0


@dataclass(frozen=True)
class Variant:
    """One way to store a layer: prune a share ``sparsity`` of its weights (0: dense, no bitmask), quantize the
    rest to ``bits``."""

    sparsity: float
    bits: int

    def label(self) -> str:
        return f"int{self.bits}" if self.sparsity == 0 else f"{self.sparsity:.4g}+int{self.bits}"


def layer_bits(v: Variant, numel: int, groups: int, symmetric: bool) -> int:
    """Stored bits of a layer of ``numel`` weights in ``groups`` scale groups, each part in whole bytes as
    ``export.save_compressed`` writes it: packed codes, the bitmask when pruned, scales and zero points. At most
    this: a kept weight whose code is zero is dropped from the bitmask encoding."""
    kept = numel - round(numel * v.sparsity)
    mask = math.ceil(numel / 8) if v.sparsity > 0 else 0
    scales = groups * (SCALE_BITS + (0 if symmetric else ZERO_BITS)) // 8
    return 8 * (mask + math.ceil(kept * v.bits / 8) + scales)


@dataclass(frozen=True)
class JointSpace(LevelSpace):
    """Cost levels ``target + k * step`` bits per weight (``target``: the budget) over layers of shapes
    ``shapes`` (rows, cols). ``chosen[layer][k]``, filled by :class:`JointDatabase`, is the variant each level
    holds."""

    shapes: dict = field(default_factory=dict)
    bits: tuple = (2, 3, 4, 8)
    group_size: int = 64  # input columns per scale, 0 = one per row
    symmetric: bool = True
    max_sparsity: float = 0.9
    chosen: dict = field(default_factory=dict, compare=False)

    @classmethod
    def build(cls, target_bits: float, shapes: dict[str, tuple[int, int]], *, step: float = 0.25,
              max_shift: float = 1.0, bits=(2, 3, 4, 8), group_size: int = 64, symmetric: bool = True,
              max_sparsity: float = 0.9) -> "JointSpace":
        bits = tuple(sorted({int(b) for b in bits}))
        if not bits or any(b not in (2, 3, 4, 8) for b in bits):
            raise ConfigError(f"search.bits must be a list of 2, 3, 4 or 8, got {list(bits)}")
        if not 0 < step <= max_shift:
            raise ConfigError(f"search.bits_step must be in (0, bits_shift], got {step} and {max_shift}")
        for name, (_, cols) in shapes.items():
            QuantSpec(bits[0], group_size, symmetric).groups(cols, name)
        shift = int(math.floor(max_shift / step + 1e-9))
        counts = {n: r * c for n, (r, c) in shapes.items()}
        space = cls(float(target_bits), float(step), -shift, shift, counts, dict(shapes), bits, group_size, symmetric,
                    max_sparsity)
        for name in shapes:  # every layer needs a variant at every level, else the search has holes
            for k in space.offsets:
                if not space.variants(name, k):
                    fix = ("raise search.bits_per_weight" if k < 0 else
                           "lower search.bits_per_weight, allow wider widths in search.bits")
                    raise ConfigError(
                        f"no (sparsity, bits) of {name} costs {space.level(k)} bits per weight (bits {list(bits)}, "
                        f"sparsity <= {max_sparsity}); {fix} or narrow search.bits_shift")
        return space

    def overhead(self, name: str) -> float:
        cols = self.shapes[name][1]
        return (SCALE_BITS + (0 if self.symmetric else ZERO_BITS)) / (self.group_size or cols)

    def groups(self, name: str) -> int:
        rows, cols = self.shapes[name]
        return rows * (cols // (self.group_size or cols))

    def variants(self, name: str, k: int) -> list[Variant]:
        """The ways ``name`` can be stored within level ``k``'s bytes: dense at a bit width whose cost falls in
        ``(level - step, level]``, or pruned (whole weights per row, so that the row-wise fallback of a starved layer
        prunes the same count) just enough that mask + codes + scales fit."""
        cost, o = self.level(k), self.overhead(name)
        rows, cols = self.shapes[name]
        numel, groups = rows * cols, self.groups(name)
        budget = cost * numel + 1e-6

        def fits(v: Variant) -> bool:
            return layer_bits(v, numel, groups, self.symmetric) <= budget

        out = []
        for b in self.bits:
            if cost - self.step + 1e-9 < b + o <= cost + 1e-9 and fits(Variant(0.0, b)):
                out.append(Variant(0.0, b))
            s = 1 - (cost - 1 - o) / b
            if s <= 1e-9:
                continue
            per_row = math.ceil(cols * s - 1e-9)
            while per_row < cols and not fits(Variant(per_row / cols, b)):  # byte rounding of the parts
                per_row += 1
            if per_row / cols <= self.max_sparsity + 1e-9:
                out.append(Variant(per_row / cols, b))
        return out

    def level_bits(self, name: str, k: int) -> int:
        """Exact stored bits of the variant ``name`` holds at level ``k``."""
        rows, cols = self.shapes[name]
        return layer_bits(self.chosen[name][k], rows * cols, self.groups(name), self.symmetric)

    def plan(self, offsets: Offsets) -> dict[str, Variant]:
        return {n: self.chosen[n][k] for n, k in offsets.items()}

    def to_map(self, offsets: Offsets) -> SparsityMap:
        return SparsityMap({n: v.sparsity for n, v in self.plan(offsets).items()}, self.param_counts)

    def bits_per_weight(self, offsets: Offsets) -> float:
        return sum(self.level_bits(n, k) for n, k in offsets.items()) / sum(self.param_counts.values())

    def target_sparsity(self) -> float:
        return float(self.target)

    def snap(self, costs) -> Offsets:
        """Nearest exact-budget cost levels for continuous per-layer costs (bits per weight)."""
        from ..allocation.budget import snap_to_grid

        return snap_to_grid({n: c / _COST_SCALE for n, c in costs.items()}, float(self.target) / _COST_SCALE,
                            self.step / _COST_SCALE, dict(self.param_counts), self.min_offset, self.max_offset)

    def seed(self, sparsities: dict[str, float]) -> Offsets:
        """A sensitivity allocation as cost levels: a layer kept denser by it gets proportionally more bits."""
        counts = self.param_counts
        mean = sum(counts[n] * s for n, s in sparsities.items()) / sum(counts[n] for n in sparsities)
        return self.snap({n: float(self.target) * (1 - s) / (1 - mean) for n, s in sparsities.items()})


def output_error(w0: torch.Tensor, w: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(dW H dW^T)``: the layer's squared output error on its calibration inputs (H = 2/n X^T X)."""
    d = (w0.float() - w.float())
    return float(((d @ hessian) * d).sum())


class JointDatabase(LevelDatabase):
    """Per (layer, cost level) the best variant's codes; a :class:`LevelDatabase` for the fitness (``weight``,
    ``write``), plus :meth:`quantized` for the packed checkpoint."""

    @classmethod
    def build_joint(cls, model: nn.Module, space: JointSpace, calib_ids: torch.Tensor, pruner_options: dict | None,
                    *, device=None, store_dir: str | Path | None = None, fingerprint: str | None = None,
                    ram_bytes: int = 0, progress: bool = True, min_token_share: float = 0.005) -> "JointDatabase":
        import shutil
        import tempfile

        from ..streaming import stream_of

        if stream_of(model) is not None:
            raise ConfigError("the joint (sparsity, bits) search does not stream a model from disk yet; load it in "
                              "memory (model.stream: never) or use allocation msp")
        owns = store_dir is None
        store = Path(tempfile.mkdtemp(prefix="mixsparse-joint-")) if owns else Path(store_dir)
        db = cls(model, space, False, store, ram_bytes, owns)
        if fingerprint and db._complete(fingerprint):
            done = json.loads((store / "complete.json").read_text())
            db._restore(done)
            db.reused = True
            log.info("reusing the joint level database in %s", store)
            return db
        if store.exists() and not owns:
            shutil.rmtree(store)
        store.mkdir(parents=True, exist_ok=True)
        try:
            _check_disk(store, db.layers, len(space.offsets), torch.uint8)
            db._fill_joint(calib_ids, pruner_options, device, progress, min_token_share)
        except BaseException:
            db.free()
            raise
        if fingerprint:
            atomic_write_json(store / "complete.json", {"fingerprint": fingerprint, **db._summary()})
        return db

    def _fill_joint(self, calib_ids, pruner_options, device, progress, min_token_share) -> None:
        from safetensors.torch import save_file

        from ..pruners.sparsegpt import SparseGPTPruner

        space: JointSpace = self.space
        t0 = time.perf_counter()
        self.errors: dict[str, dict[int, dict[str, float]]] = {}
        bar = tqdm(total=len(self.layers), desc="joint level database", disable=not progress)
        base = SparseGPTPruner.make_options(pruner_options)  # the run config keeps the grid out of prune.options

        def on_layer(name: str, p) -> None:
            tensors, chosen, errs = {}, {}, {}
            w0 = p.weight.float()
            for j, k in enumerate(space.offsets):
                best = None
                errs[k] = {}
                for v in space.variants(name, k):
                    p.options = replace(base, bits=v.bits, group_size=space.group_size, symmetric=space.symmetric)
                    res = p.prune(v.sparsity)
                    err = output_error(w0, res.quantized.dequantize(), p.H) if not p.starved else \
                        float(((w0 - res.quantized.dequantize()) ** 2).sum())  # no inputs seen: weight error
                    errs[k][v.label()] = err
                    if best is None or err < best[0]:
                        best = (err, v, res.quantized)
                _, v, qw = best
                chosen[k] = v
                tensors[f"level_{j}.codes"] = qw.codes.cpu().contiguous()
                tensors[f"level_{j}.scale"] = qw.scale.cpu().contiguous()
                tensors[f"level_{j}.zero"] = qw.zero.to(torch.uint8).cpu().contiguous()
            path = self._path(name)
            tmp = path.with_name(path.name + ".tmp")
            save_file(tensors, str(tmp), metadata={"scale_dtype": str(qw.scale_dtype)})
            os.replace(tmp, path)
            space.chosen[name] = chosen
            self.errors[name] = errs
            if p.starved:
                self.fallbacks[name] = {"tokens": p.nsamples, "min_tokens": p.min_tokens,
                                        "fallback": "magnitude per row + round to nearest"}
            p.free()
            bar.update(1)

        make = SparseGPTPruner.factory(pruner_options, min_tokens(calib_ids, min_token_share))
        observe_layerwise(self.model, calib_ids, make, on_layer, layers=self.layers, device=device)
        bar.close()
        self.seconds = time.perf_counter() - t0

    def _summary(self) -> dict:
        return {"layers": len(self.layers), "levels": list(self.space.offsets), "fallbacks": self.fallbacks,
                "chosen": {n: {str(k): [v.sparsity, v.bits] for k, v in c.items()} for n, c in self.space.chosen.items()},
                "errors": getattr(self, "errors", {})}

    def _restore(self, done: dict) -> None:
        self.fallbacks = done.get("fallbacks", {})
        self.errors = done.get("errors", {})
        for n, c in done["chosen"].items():
            self.space.chosen[n] = {int(k): Variant(float(s), int(b)) for k, (s, b) in c.items()}

    def _complete(self, fingerprint: str) -> bool:
        if not super()._complete(fingerprint):
            return False
        try:
            chosen = json.loads((self.store_dir / "complete.json").read_text()).get("chosen", {})
        except (OSError, json.JSONDecodeError):
            return False
        return set(chosen) == set(self.layers)

    def _codes(self, name: str, j: int) -> QuantizedWeight:
        from safetensors import safe_open

        v = self.space.chosen[name][self.space.min_offset + j]
        spec = QuantSpec(v.bits, self.space.group_size, self.space.symmetric)
        with safe_open(str(self._path(name)), framework="pt", device="cpu") as f:
            scale_dtype = getattr(torch, f.metadata()["scale_dtype"].replace("torch.", ""))
            codes, scale, zero = (f.get_tensor(f"level_{j}.{p}") for p in ("codes", "scale", "zero"))
        return QuantizedWeight(codes, scale, zero.float(), spec, scale_dtype)

    def _read(self, name: str, j: int) -> torch.Tensor:
        # exact: a small integer times a float16/bfloat16 scale is exact in float32, as in quant.grid
        return self._codes(name, j).dequantize().to(self.layers[name].weight.dtype)

    def quantized(self, offsets: Offsets) -> dict[str, QuantizedWeight]:
        """Codes of a candidate's layers (what the packed checkpoint stores)."""
        return {n: self._codes(n, self._level_index(k)) for n, k in offsets.items()}

"""Write pruned models to disk: a plain Hugging Face checkpoint and a compressed one.

* :func:`save_hf` writes an ordinary ``save_pretrained`` checkpoint (safetensors, dense weights with
  their zeros) that any HF tool loads. The run's metadata (pruner, allocation, target, per-layer map)
  travels in ``config.json`` as ``config.mixsparse``, so a later fine-tune can rebuild each mask from
  the zeros plus this map.
* :func:`save_compressed` / :func:`load_compressed` store the sparse weights compactly, in one
  ``model.compressed.safetensors`` described by ``compression.json`` (format version 1), or, past
  ``max_shard_bytes``, in shards ``model.compressed-00001.safetensors``... each with its own SHA-256 and
  each tensor's shard named in the index (version 2). Encodings, per tensor:

  ``dense``
      The tensor as is (at the checkpoint dtype), under its own name. Used for everything that is
      not a prunable linear weight (embeddings, norms, an untied ``lm_head``) and for prunable
      weights with so few zeros that a bitmask would not save space.
  ``bitmask``
      ``NAME::bitmask``: one bit per weight, row-major, ``1`` = non-zero, packed 8 per byte with the
      first weight in the most significant bit (``numpy.packbits``, ``bitorder="big"``), the last byte
      padded with zero bits. ``NAME::values``: the non-zero values in the same row-major order.
  ``nm``
      For a layer whose map entry is ``N:M`` and whose weight has at most N non-zeros in every group of
      M consecutive inputs. ``NAME::values``: N values per group, groups in row-major order.
      ``NAME::nm_indices``: each value's position inside its group (ascending within a group),
      written as ``ceil(log2 M)`` bits, most significant bit first, all concatenated and packed like
      the bitmask. A group with fewer than N non-zeros is padded with its first zero positions (value 0).

  ``quantized``
      A layer quantized by :mod:`mixsparse.quant` (``bits``, ``group_size``, ``symmetric`` in the entry).
      ``NAME::bitmask``: as above, the non-zero positions. ``NAME::codes``: their unsigned integer codes,
      ``bits`` bits each, most significant bit first, concatenated and packed like the bitmask.
      ``NAME::scale``: float16 (bfloat16 for a bfloat16 model) ``(rows, groups)``; ``NAME::zero``: uint8 ``(rows, groups)`` unsigned zero
      points (asymmetric only; symmetric grids have ``2**(bits-1)``). The weight is
      ``(code - zero) * scale``, computed in float32 (exact there: a float16 scale times a small integer),
      then cast to the entry's dtype: bit-exactly the dequantized weight mixsparse held in memory.
  ``quantized_dense``
      As ``quantized`` without the bitmask: ``NAME::codes`` holds the code of every weight, row-major. Used
      when that is smaller, i.e. when fewer than one weight in ``bits`` is zero (a layer quantized, not pruned).

  Zeros are restored as ``+0.0`` (a pruner that multiplied by the mask may have left ``-0.0``; the
  two compare equal and give identical results in a linear layer); every other value is bit-exact
  at the checkpoint dtype. Tensors shared by several names (tied embeddings) are stored once and
  listed under ``aliases``. A SHA-256 of each tensor file in ``compression.json`` catches corruption
  that safetensors itself would not notice (it has no checksum).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ModelLoadError, NumericalError
from .io import atomic_dir, atomic_write_text, read_json, to_plain
from .experts import weight_owner
from .modeling import prunable_linears, stream_of
from .names import block_index
from .sparsity import NM, parse_layer_sparsity

log = logging.getLogger(__name__)

FORMAT_NAME = "mixsparse-compressed"
FORMAT_VERSION = 2  # 2: sharded tensor files (a single-file checkpoint is still written as version 1)
TENSOR_FILE = "model.compressed.safetensors"
INDEX_FILE = "compression.json"

# --------------------------------------------------------------------------------------------
# Pure packing math (hand-checkable on small tensors)
# --------------------------------------------------------------------------------------------


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (flattened row-major) 8 per byte, first bit most significant."""
    arr = bits.detach().to("cpu", torch.bool).reshape(-1).numpy()
    return torch.from_numpy(np.packbits(arr, bitorder="big").copy())


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as a flat bool tensor."""
    arr = packed.detach().to("cpu", torch.uint8).reshape(-1).numpy()
    if arr.size * 8 < count:
        raise ValueError(f"packed bit buffer holds {arr.size * 8} bits, {count} needed")
    return torch.from_numpy(np.unpackbits(arr, count=count, bitorder="big").astype(bool))


def bitmask_encode(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed keep-bits, non-zero values)`` of a tensor; see the module docstring."""
    keep = weight != 0
    return pack_bits(keep), weight[keep].contiguous()


def bitmask_decode(packed: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    numel = math.prod(shape)
    keep = unpack_bits(packed, numel)
    nnz = int(torch.count_nonzero(keep))
    if values.dim() != 1 or values.numel() != nnz:
        raise ValueError(f"bitmask has {nnz} set bits but {values.numel()} values are stored")
    # masked_scatter_ fills the set positions in row-major order, like boolean indexing, but faster
    return torch.zeros(numel, dtype=values.dtype).masked_scatter_(keep, values).reshape(shape)


def codes_encode(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (< 2**bits), ``bits`` bits each, most significant first, packed 8 per byte."""
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.int32)
    return pack_bits(((codes.reshape(-1, 1).to(torch.int32) >> shifts) & 1).bool())


def codes_decode(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    b = unpack_bits(packed, count * bits).reshape(count, bits).to(torch.int32)
    return (b << torch.arange(bits - 1, -1, -1, dtype=torch.int32)).sum(dim=1).to(torch.uint8)


def quantized_encode(qw) -> tuple[str, dict[str, torch.Tensor]]:
    """``(encoding, parts)`` of a QuantizedWeight: ``quantized`` (bitmask + the non-zero codes) or, when smaller,
    ``quantized_dense`` (every code); see the module docstring."""
    keep = qw.codes.float() != qw.zero.repeat_interleave(qw.codes.shape[1] // qw.zero.shape[1], dim=1)
    nnz, numel = int(keep.sum()), keep.numel()
    if numel + nnz * qw.spec.bits < numel * qw.spec.bits:
        enc, parts = "quantized", {"bitmask": pack_bits(keep), "codes": codes_encode(qw.codes[keep], qw.spec.bits)}
    else:
        enc, parts = "quantized_dense", {"codes": codes_encode(qw.codes.reshape(-1), qw.spec.bits)}
    parts["scale"] = qw.scale.to(qw.scale_dtype).contiguous()
    if not qw.spec.symmetric:
        parts["zero"] = qw.zero.to(torch.uint8).contiguous()
    return enc, parts


def quantized_decode(stored: Mapping[str, torch.Tensor], name: str, entry: dict, shape: tuple[int, ...]) -> torch.Tensor:
    rows, cols = shape
    bits, sym = int(entry["bits"]), bool(entry["symmetric"])
    if entry.get("encoding") == "quantized_dense":
        keep = torch.ones(rows, cols, dtype=torch.bool)
    else:
        keep = unpack_bits(stored[f"{name}::bitmask"], rows * cols).reshape(rows, cols)
    scale = stored[f"{name}::scale"].float()
    groups = scale.shape[1]
    zero = torch.full_like(scale, 2.0 ** (bits - 1)) if sym else stored[f"{name}::zero"].float()
    scale, zero = scale.repeat_interleave(cols // groups, dim=1), zero.repeat_interleave(cols // groups, dim=1)
    codes = codes_decode(stored[f"{name}::codes"], int(keep.sum()), bits).float()
    w = torch.zeros(rows, cols)
    w[keep] = (codes - zero[keep]) * scale[keep]
    return w


def index_bits(m: int) -> int:
    """Bits needed for a position inside a group of ``m`` (2:4 -> 2, 4:8 -> 3)."""
    return max(1, math.ceil(math.log2(m)))


def fits_nm(weight: torch.Tensor, pattern: NM) -> bool:
    """True when every group of M consecutive inputs holds at most N non-zeros (so it packs as N:M)."""
    # groups run along the last dimension: a linear's or a fused [E, out, in] experts tensor's inputs (a
    # transposed [E, in, out] one, GPT-OSS, seldom fits and is stored with a bitmask: lossless either way)
    if weight.dim() < 2 or weight.shape[-1] % pattern.m:
        return False
    return bool(((weight != 0).reshape(-1, pattern.m).sum(-1) <= pattern.n).all())


def nm_positions(weight: torch.Tensor, pattern: NM) -> torch.Tensor:
    """(groups, N) ascending in-group positions: every non-zero, padded with the first zero positions."""
    nonzero_first = torch.sort((weight == 0).reshape(-1, pattern.m).to(torch.int8), dim=-1, stable=True).indices
    return nonzero_first[:, : pattern.n].sort(dim=-1).values


def nm_encode(weight: torch.Tensor, pattern: NM) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, packed indices)`` of a weight that :func:`fits_nm`; see the module docstring."""
    if not fits_nm(weight, pattern):
        raise ValueError(f"weight of shape {tuple(weight.shape)} is not {pattern} sparse")
    pos = nm_positions(weight, pattern)
    values = torch.gather(weight.reshape(-1, pattern.m), 1, pos).reshape(-1).contiguous()
    b = index_bits(pattern.m)
    shifts = torch.arange(b - 1, -1, -1)
    bits = (pos.reshape(-1, 1).to(torch.int64) >> shifts) & 1
    return values, pack_bits(bits.bool())


def nm_decode(values: torch.Tensor, packed: torch.Tensor, shape: tuple[int, ...], pattern: NM) -> torch.Tensor:
    numel = math.prod(shape)
    groups = numel // pattern.m
    count = groups * pattern.n
    if values.dim() != 1 or values.numel() != count:
        raise ValueError(f"N:M tensor needs {count} values, {values.numel()} are stored")
    b = index_bits(pattern.m)
    bits = unpack_bits(packed, count * b).reshape(count, b).to(torch.int64)
    pos = (bits << torch.arange(b - 1, -1, -1)).sum(-1).reshape(groups, pattern.n)
    if bool((pos >= pattern.m).any()):
        raise ValueError(f"N:M index out of range for M={pattern.m}")
    out = torch.zeros(groups, pattern.m, dtype=values.dtype)
    out.scatter_(1, pos, values.reshape(groups, pattern.n))
    return out.reshape(shape)


# --------------------------------------------------------------------------------------------
# Metadata and tokenizer
# --------------------------------------------------------------------------------------------


def _clean_config(model: nn.Module, metadata: dict | None) -> Any:
    """A copy of the model's config without GGUF quantisation info, with ``mixsparse`` metadata."""
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    if metadata is not None:
        cfg.mixsparse = to_plain(metadata, "metadata", strict=True)
    return cfg


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------------------------
# Hugging Face checkpoint
# --------------------------------------------------------------------------------------------


def save_hf(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, metadata: dict | None, *, overwrite: bool = False) -> Path:
    """Write a standard HF checkpoint (safetensors, dense weights with zeros, tokenizer if given).

    ``metadata`` ends up as ``config.mixsparse``. GGUF-loaded models are saved like plain ones: the
    save sees a cleaned copy of the config and no quantizer; the caller's model is left as it was.
    """
    from .streaming import save_streamed, stream_of

    cfg = _clean_config(model, metadata)
    if stream_of(model) is not None:  # block by block, one shard each
        return save_streamed(model, out_dir, tokenizer, overwrite, config=cfg)
    with atomic_dir(out_dir, overwrite) as tmp:
        saved_config, saved_quantizer = model.config, getattr(model, "hf_quantizer", None)
        try:
            # save_pretrained reads (and writes dtype/architectures into) self.config; swap in our copy
            model.config = cfg
            if hasattr(model, "hf_quantizer"):
                model.hf_quantizer = None
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            model.config = saved_config
            if hasattr(model, "hf_quantizer"):
                model.hf_quantizer = saved_quantizer
        _save_tokenizer(tokenizer, tmp)
    return Path(out_dir)


# --------------------------------------------------------------------------------------------
# Compressed checkpoint
# --------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ModelLoadError(f"compressed checkpoint names an unknown dtype {name!r}")
    return dtype


def _unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without duplicates: tensors sharing memory (tied weights) kept under their first name."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and not t.is_meta and key in seen:  # a streamed model's blocks are all on meta: never aliases
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t
    return tensors, aliases


def _cast(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach().to("cpu")
    if dtype is None or not t.is_floating_point() or t.dtype == dtype:
        return t.contiguous()
    out = t.to(dtype)
    if t.numel() == 0:
        return out.contiguous()
    # a cheap range test first; the exact (slower) check only when something may have overflowed
    lo, hi = torch.aminmax(t)
    limit = torch.finfo(dtype).max
    if (lo < -limit or hi > limit) and bool((torch.isfinite(t) & torch.isinf(out)).any()):
        raise NumericalError(f"tensor {name!r} overflows {_dtype_name(dtype)}; save with a wider dtype")
    return out.contiguous()


def _layer_targets(sparsity_map: Mapping[str, object] | None) -> dict[str, object]:
    if sparsity_map is None:
        return {}
    return {str(k): parse_layer_sparsity(v, where=f"layer {k!r}") for k, v in sparsity_map.items()}


def save_compressed(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.float16,
    sparsity_map: Mapping[str, object] | None = None,
    tokenizer: Any = None,
    metadata: dict | None = None,
    overwrite: bool = False,
    quantized: Mapping[str, Any] | None = None,
    max_shard_bytes: int = 4 * 2**30,
) -> dict[str, float | int]:
    """Write the compressed checkpoint (see module docstring); return its sizes.

    Encoded tensors are written in shards of at most ``max_shard_bytes`` as they are encoded (a 70B model never
    holds a second, encoded copy in memory); a checkpoint that fits in one shard is the single file
    ``model.compressed.safetensors``, else ``model.compressed-00001.safetensors``... with the index naming
    each tensor's shard.

    ``quantized``: layer name -> :class:`~mixsparse.quant.grid.QuantizedWeight` of the layers the run
    quantized (stored as packed codes; each must still dequantize to the layer's current weight).

    ``dtype`` is the dtype of every floating tensor on disk (``None`` keeps each tensor's own).
    ``sparsity_map`` (layer -> float | NM | "N:M") selects the N:M encoding for layers it marks N:M.
    Returns ``dense_bytes`` (every stored tensor dense at that dtype), ``compressed_bytes`` (tensor
    file size), ``ratio``, and the same for the prunable weights alone (``prunable_*``).
    """
    from safetensors.torch import save_file

    targets = _layer_targets(sparsity_map)
    linears = prunable_linears(model)
    # tensor name -> the prunable layers it holds (one for a linear's weight, every expert for a fused tensor)
    owner_name = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    units: dict[str, list[str]] = {}
    for layer_name, lin in linears.items():
        units.setdefault(owner_name[id(weight_owner(lin))], []).append(layer_name)
    prunable = set(units)
    single = {n for n, us in units.items() if isinstance(linears[us[0]], nn.Linear)}  # not a fused tensor
    codes_lost = [n for n, us in units.items() if n not in single and any(u in (quantized or {}) for u in us)]
    if codes_lost:
        log.warning("%d fused experts tensor(s) (e.g. %s) are stored as their quantized values (bitmask), not as "
                    "packed codes: the compact quantized encoding covers linear layers only", len(codes_lost), codes_lost[0])
    tensors, aliases = _unique_tensors(model)
    stream = stream_of(model)
    current: tuple[int | None, dict] = (None, {})

    def value(name: str, t: torch.Tensor) -> torch.Tensor:
        """``t``, or for a streamed model's block tensor its data at rest (the block read once, in order)."""
        nonlocal current
        if not t.is_meta or stream is None:
            return t
        i = block_index(name, stream.blocks_name)
        if current[0] != i:
            current = (None, {})  # the previous block goes before the next is read
            current = (i, stream.read(i))
        return current[1][name[len(f"{stream.blocks_name}.{i}."):]]

    out_tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    shards: list[tuple[Path, list[str]]] = []  # (temporary file, tensor names) in writing order
    pending: list[str] = []  # tensors of the shard being filled
    dense_bytes = prunable_dense = prunable_stored = shard_bytes = 0
    out_path = Path(out_dir).expanduser()
    out_path.parent.mkdir(parents=True, exist_ok=True)  # shards are written next to the output: one file system
    work = Path(tempfile.mkdtemp(prefix=".mixsparse-shards-", dir=out_path.parent))

    def flush() -> None:
        nonlocal out_tensors, shard_bytes, pending
        if out_tensors:
            path = work / f"shard-{len(shards) + 1:05d}.safetensors"
            save_file(out_tensors, str(path), metadata={"format": "pt", "mixsparse_format_version": str(FORMAT_VERSION)})
            shards.append((path, pending))
        out_tensors, shard_bytes, pending = {}, 0, []

    try:
        for name, t in tensors.items():
            t = _cast(name, value(name, t), dtype)
            dense_size = t.numel() * t.element_size()
            dense_bytes += dense_size
            entry: dict[str, Any] = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
            parts: dict[str, torch.Tensor]
            layer = units[name][0] if name in single else None
            held = {str(targets.get(u)) for u in units.get(name, [])}  # an N:M encoding needs one pattern for all
            target = targets.get(units[name][0]) if name in prunable and len(held) == 1 else None
            qw = (quantized or {}).get(layer) if layer is not None else None
            if qw is not None:
                weight = value(name, tensors[name]).detach().cpu()
                deq = qw.dequantize().to(weight.dtype)
                if not torch.equal(deq, weight):
                    raise NumericalError(f"layer {layer!r} no longer equals its quantized codes (changed after "
                                         "quantization?); quantize again before saving")
                enc, encoded = quantized_encode(qw)
                parts = {f"{name}::{k}": v for k, v in encoded.items()}
                entry.update(encoding=enc, bits=qw.spec.bits, group_size=qw.spec.group_size,
                             symmetric=qw.spec.symmetric, dtype=_dtype_name(weight.dtype))
            elif name in prunable and isinstance(target, NM) and fits_nm(t, target):
                values, idx = nm_encode(t, target)
                parts = {f"{name}::values": values, f"{name}::nm_indices": idx}
                entry.update(encoding="nm", n=target.n, m=target.m, index_bits=index_bits(target.m))
            elif name in prunable and t.dim() >= 2:
                nnz = int(torch.count_nonzero(t))
                if math.ceil(t.numel() / 8) + nnz * t.element_size() < dense_size:
                    packed, values = bitmask_encode(t)
                    parts = {f"{name}::bitmask": packed, f"{name}::values": values}
                    entry.update(encoding="bitmask", nnz=nnz)
                else:
                    parts = {name: t}
                    entry.update(encoding="dense")
            else:
                parts = {name: t}
                entry.update(encoding="dense")
            stored = sum(p.numel() * p.element_size() for p in parts.values())
            if name in prunable:
                prunable_dense += dense_size
                prunable_stored += stored
            if shard_bytes and shard_bytes + stored > max_shard_bytes:
                flush()
            out_tensors.update(parts)
            shard_bytes += stored
            entries[name] = entry
            pending.append(name)
        flush()
        with atomic_dir(out_dir, overwrite) as tmp:
            files: dict[str, str] = {}
            for k, (path, names) in enumerate(shards):
                fname = (TENSOR_FILE if len(shards) == 1
                         else TENSOR_FILE.replace(".safetensors", f"-{k + 1:05d}.safetensors"))
                shutil.move(str(path), tmp / fname)
                files[fname] = _sha256(tmp / fname)
                for n in names:
                    entries[n]["file"] = fname
            compressed_bytes = sum((tmp / f).stat().st_size for f in files)
            sizes = {
                "dense_bytes": dense_bytes,
                "compressed_bytes": compressed_bytes,
                "ratio": compressed_bytes / dense_bytes if dense_bytes else 0.0,
                "prunable_dense_bytes": prunable_dense,
                "prunable_compressed_bytes": prunable_stored,
                "prunable_ratio": prunable_stored / prunable_dense if prunable_dense else 0.0,
                "prunable_params": sum(lin.weight.numel() for lin in linears.values()),
            }
            sizes["bits_per_weight"] = 8 * prunable_stored / sizes["prunable_params"] if sizes["prunable_params"] else 0.0
            cfg = _clean_config(model, metadata)
            if dtype is not None:
                cfg.dtype = _dtype_name(dtype)
            cfg.architectures = [type(model).__name__]
            cfg.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                with contextlib.suppress(Exception):  # optional; an invalid generation config must not stop the save
                    model.generation_config.save_pretrained(tmp)
            _save_tokenizer(tokenizer, tmp)
            index = {
                "format": FORMAT_NAME,
                "format_version": 1,
                "dtype": _dtype_name(dtype) if dtype is not None else None,
                # one file: the layout of format version 1, which older readers read; shards: version 2
                **({"file": TENSOR_FILE, "sha256": files[TENSOR_FILE]} if len(files) == 1
                   else {"format_version": 2, "files": files}),
                "bitorder": "big",
                "tensors": entries,
                "aliases": aliases,
                "sizes": sizes,
            }
            # 0644: what a plain write would give under the usual umask (the temp file starts private)
            atomic_write_text(tmp / INDEX_FILE, json.dumps(index, indent=2, sort_keys=False) + "\n", mode=0o644)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sizes


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_index(d: Path) -> dict:
    index_path = d / INDEX_FILE
    if not d.is_dir():
        raise ModelLoadError(f"compressed checkpoint directory {str(d)!r} does not exist")
    if not index_path.is_file():
        raise ModelLoadError(f"{str(d)!r} is not a compressed checkpoint: {INDEX_FILE} is missing")
    index = read_json(index_path, ModelLoadError)
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise ModelLoadError(f"{str(index_path)!r} is not a {FORMAT_NAME} index")
    if index.get("format_version") not in (1, FORMAT_VERSION):
        raise ModelLoadError(
            f"{str(index_path)!r} has format version {index.get('format_version')!r}; this mixsparse reads versions 1 to {FORMAT_VERSION}"
        )
    return index


def _decode(name: str, entry: dict, stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
    shape = tuple(int(s) for s in entry["shape"])
    dtype = _parse_dtype(entry["dtype"])
    enc = entry["encoding"]
    if enc == "dense":
        t = stored[name]
    elif enc == "bitmask":
        t = bitmask_decode(stored[f"{name}::bitmask"], stored[f"{name}::values"], shape)
    elif enc == "nm":
        pattern = NM(int(entry["n"]), int(entry["m"]))
        t = nm_decode(stored[f"{name}::values"], stored[f"{name}::nm_indices"], shape, pattern)
    elif enc in ("quantized", "quantized_dense"):
        t = quantized_decode(stored, name, entry, shape).to(dtype)
    else:
        raise ModelLoadError(f"tensor {name!r} has an unknown encoding {enc!r}")
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise ModelLoadError(f"tensor {name!r}: stored as {tuple(t.shape)} {t.dtype}, index says {shape} {dtype}")
    return t


def load_compressed(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild the model written by :func:`save_compressed` (eval mode, weights re-tied).

    Tensors come back bit-exact at the stored dtype; ``dtype`` builds the model in that dtype instead
    (quantized layers, dequantized exactly in float32, keep every bit with ``dtype=torch.float32``).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    d = Path(path).expanduser()
    index = _read_index(d)
    # one tensor file (and its hash) in checkpoints written before sharding, else every shard's
    files = index.get("files") or {str(index.get("file", TENSOR_FILE)): index.get("sha256")}
    stored: dict[str, torch.Tensor] = {}
    for fname, sha in files.items():
        tensor_path = d / str(fname)
        if not tensor_path.is_file():
            raise ModelLoadError(f"compressed checkpoint {str(d)!r} lacks its tensor file {tensor_path.name}")
        if sha and _sha256(tensor_path) != sha:
            raise ModelLoadError(f"{str(tensor_path)!r} is corrupt (SHA-256 differs from {INDEX_FILE})")
        try:
            stored.update(load_file(str(tensor_path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read {str(tensor_path)!r}: {e}") from None

    try:
        state = {name: _decode(name, entry, stored) for name, entry in index["tensors"].items()}
        for alias, target in index.get("aliases", {}).items():
            state[alias] = state[target]
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"compressed checkpoint {str(d)!r} is inconsistent: {type(e).__name__}: {e}") from None

    try:
        config = AutoConfig.from_pretrained(d)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the config of {str(d)!r}: {e}") from None
    build_dtype = dtype or (_parse_dtype(index["dtype"]) if index.get("dtype") else None)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    from accelerate import init_empty_weights

    # parameters on the meta device (no random init, no second copy: a 70B model would need twice its RAM
    # and minutes of initialisation); buffers such as rotary frequencies are computed for real
    with init_empty_weights(include_buffers=False):
        model = (AutoModelForCausalLM.from_config(config, dtype=build_dtype) if build_dtype
                 else AutoModelForCausalLM.from_config(config))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(f"compressed checkpoint {str(d)!r} does not fit its config: {e}") from None
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelLoadError(f"compressed checkpoint {str(d)!r} lacks {len(left)} tensor(s) its model needs, e.g. {left[0]}")
    return model.eval()

"""A standard quantized checkpoint: the compressed-tensors ``pack-quantized`` format, which
``transformers.AutoModelForCausalLM.from_pretrained`` (and vLLM) read with the ``compressed-tensors``
package installed. Chosen after reading compressed-tensors 0.20 (the current release):

* weight-only int4/int8, group-wise or per channel, symmetric or asymmetric, is supported; the loader
  computes ``(q - zero_point) * scale`` in the scale's dtype, which is the model's dtype, so scales are
  stored in it and the reloaded weights equal mixsparse's dequantized weights bit for bit;
* it has no sparsity compressor any more (``sparsity_config`` is always written empty), so the zeros live
  inside the quantized weights (code = zero point): the file is as large as a dense int4 one; the
  compact sparse file is mixsparse's own ``compressed/`` checkpoint;
* asymmetric pack-quantized checkpoints load only with ``CompressedTensorsConfig(dequantize=True)`` (its
  loader never packs the zero points on the default path; llm-compressor issue #1618): the run records it.

The codes are packed with compressed-tensors' own ``pack_to_int32``; the config is written by its
``ModelCompressor.update_config``. Nothing is re-quantized and the model is not modified.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..io import atomic_dir
from .grid import QuantizedWeight


def available() -> bool:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return False
    return True


def unsupported(model: nn.Module) -> str | None:
    """Why this model cannot be written in the compressed-tensors format, or None."""
    from ..experts import is_fused_experts

    if any(is_fused_experts(m) for m in model.modules()):
        # measured with transformers 5.25 + compressed-tensors 0.20.1: a Mixtral saved this way reloads with its experts
        # MISSING (the checkpoint conversion that fuses per-expert weights does not run under the quantizer)
        return ("the compressed-tensors export does not cover fused MoE experts (transformers cannot reload them "
                "from a pack-quantized checkpoint); the compressed/ checkpoint holds the quantized model")
    return None


def save_compressed_tensors(model: nn.Module, quantized: Mapping[str, QuantizedWeight], out_dir: str | os.PathLike,
                            tokenizer: Any = None, *, overwrite: bool = False) -> dict:
    """Write ``out_dir`` (config.json with ``quantization_config``, safetensors, tokenizer)."""
    if not available():
        raise ConfigError("the standard quantized export needs compressed-tensors: pip install 'mixsparse[quant]' "
                          "(or set export.quantized_hf: false)")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    by_spec: dict = {}  # a joint search's layers have several bit widths: one config group per grid
    for name, qw in quantized.items():
        by_spec.setdefault(qw.spec, []).append(name)
    dtype = next(model.parameters()).dtype
    reason = unsupported(model)
    if reason:
        raise ConfigError(reason)
    state = dict(model.state_dict())
    for name, qw in quantized.items():
        spec = qw.spec
        weight = state.pop(f"{name}.weight")
        if not torch.equal(qw.dequantize().to(weight.dtype), weight.detach().cpu()):
            raise ConfigError(f"layer {name!r} no longer equals its quantized codes; quantize again before exporting")
        offset = 2 ** (spec.bits - 1)  # compressed-tensors codes are signed
        state[f"{name}.weight_packed"] = pack_to_int32((qw.codes.to(torch.int16) - offset).to(torch.int8), spec.bits)
        state[f"{name}.weight_scale"] = qw.scale.to(dtype).contiguous()
        state[f"{name}.weight_shape"] = torch.tensor(list(qw.codes.shape), dtype=torch.int64)
        if not spec.symmetric:
            zp = (qw.zero - offset).to(torch.int8)
            state[f"{name}.weight_zero_point"] = pack_to_int32(zp, spec.bits, packed_dim=0)

    def args(spec) -> QuantizationArgs:
        strategy = {"strategy": "group", "group_size": spec.group_size} if spec.group_size else {"strategy": "channel"}
        return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, **strategy)

    groups = {f"group_{i}": QuantizationScheme(targets=names if len(by_spec) > 1 else ["Linear"], weights=args(spec))
              for i, (spec, names) in enumerate(sorted(by_spec.items(), key=lambda kv: kv[0].label()))}
    others = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    qcfg = QuantizationConfig(config_groups=groups, ignore=others, format="pack-quantized",
                              quantization_status="compressed")
    with atomic_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, state_dict=state)
        ModelCompressor(quantization_config=qcfg).update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    size = sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors"))
    symmetric = all(spec.symmetric for spec in by_spec)
    return {"format": "compressed-tensors pack-quantized", "scheme": ", ".join(sorted(s.label() for s in by_spec)),
            "bytes": size,
            "load": "AutoModelForCausalLM.from_pretrained(path)" if symmetric else
            "AutoModelForCausalLM.from_pretrained(path, quantization_config=CompressedTensorsConfig(dequantize=True))"}

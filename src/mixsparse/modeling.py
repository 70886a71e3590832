"""Find decoder blocks and prunable linear layers of any Hugging Face decoder-only model.

Blocks are found generically: the ``nn.ModuleList`` whose children are of a class named in the
model's ``_no_split_modules`` (every HF model that supports ``device_map`` declares it). Architectures
that need something else get one row in :data:`ARCHITECTURES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import UnknownNameError
from .experts import ExpertMatrix, bias_owner, expert_matrices, is_fused_experts, owners, weight_owner
from .sparsity import weighted_average


@dataclass(frozen=True)
class ArchSpec:
    """Override for one ``config.model_type``: dotted path of the block list, linears to skip."""

    blocks: str | None = None
    skip: tuple[str, ...] = ()


#: model_type -> override. Llama, Qwen2, Mistral, OPT, ... need none: ``_no_split_modules`` finds them.
ARCHITECTURES: dict[str, ArchSpec] = {
    # GPT-2 style models use Conv1D, not nn.Linear; not prunable here yet, listed to fail clearly.
    "gpt2": ArchSpec(blocks="transformer.h"),
}


def _get_path(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified name, ModuleList)`` of the decoder blocks."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type or "")
    if spec is not None and spec.blocks:
        return spec.blocks, _get_path(model, spec.blocks)
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    # a multimodal model also has a vision tower's layer list: only lists inside the text decoder count
    decoder = None
    if hasattr(model, "get_decoder"):
        try:
            decoder = model.get_decoder()
        except (AttributeError, NotImplementedError, TypeError):
            decoder = None
    inside = {id(m) for m in decoder.modules()} if isinstance(decoder, nn.Module) else None
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, mod in model.named_modules():
        if inside is not None and id(mod) not in inside:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            kinds = {type(c).__name__ for c in mod}
            if block_classes and kinds <= block_classes:
                return name, mod
            if len(kinds) == 1:
                candidates.append((name, mod))
    if candidates:  # no _no_split_modules: the longest list of identical blocks
        return max(candidates, key=lambda c: len(c[1]))
    raise UnknownNameError(
        f"cannot find the decoder blocks of {type(model).__name__} (model_type={model_type!r}); "
        "add a row for it to mixsparse.modeling.ARCHITECTURES"
    )


#: last name parts of routing layers (a MoE router, Qwen2-MoE's ``shared_expert_gate``): never pruned, since
#: they are tiny and a pruned router sends tokens to other experts
ROUTERS = ("gate", "router", "shared_expert_gate")


def _num_experts(config) -> int:
    configs = [config]
    if hasattr(config, "get_text_config"):  # a multimodal model keeps the expert count in its text config
        configs.append(config.get_text_config())
    return max(int(getattr(c, k, 0) or 0) for c in configs
               for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"))


def _is_router(name: str, lin: nn.Linear, experts: int) -> bool:
    return name.rsplit(".", 1)[-1] in ROUTERS and (lin.out_features == 1 or 0 < lin.out_features <= experts)


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear | ExpertMatrix]:
    """The prunable layers, by qualified name, in forward order: every ``nn.Linear`` inside the decoder blocks
    but routers, and every matrix of every expert of fused MoE experts (:class:`~mixsparse.experts.ExpertMatrix`,
    named ``<experts>.<param>[e]``), which every stage takes like a linear layer."""
    blocks_name, blocks = find_decoder_blocks(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    skip = ARCHITECTURES.get(model_type or "", ArchSpec()).skip
    experts = _num_experts(config)
    out: dict[str, nn.Linear] = {}
    for i, block in enumerate(blocks):
        for name, mod in block_linears(block).items():
            if not any(name.endswith(s) for s in skip) and not _is_router(name, mod, experts):
                out[f"{blocks_name}.{i}.{name}"] = mod
    if not out:
        raise UnknownNameError(f"{type(model).__name__} has no nn.Linear layers inside its decoder blocks")
    return out


def block_linears(block: nn.Module) -> dict[str, nn.Linear | ExpertMatrix]:
    """The block's linear layers and expert matrices by local name, in module order."""
    out: dict[str, nn.Linear | ExpertMatrix] = {}
    for name, m in block.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = m
        elif is_fused_experts(m):
            out.update({f"{name}.{k}": v for k, v in expert_matrices(m).items()})
    return out


def prunable_params(model: nn.Module, biases: bool = False) -> set[str]:
    """Qualified names of the parameters that hold prunable weights (``….q_proj.weight``, the fused
    ``….experts.down_proj``), with ``biases`` also their biases (which recovery tunes): every other parameter
    is left untouched by pruning and recovery."""
    layers = prunable_linears(model).values()
    held = {id(weight_owner(lin)) for lin in layers}
    if biases:
        held |= {id(b) for b in map(bias_owner, layers) if b is not None}
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in held}


def param_counts(model: nn.Module) -> dict[str, int]:
    return {name: lin.weight.numel() for name, lin in prunable_linears(model).items()}


def zero_fraction(weight) -> float:
    """Share of exact zeros in a weight: a layer's measured sparsity."""
    return float((weight == 0).sum().item()) / weight.numel()


def stream_of(model: nn.Module):
    """The :class:`mixsparse.streaming.BlockStream` a streamed model's blocks are read from, or None."""
    return getattr(model, "_mixsparse_stream", None)


def measured_sparsity(model: nn.Module) -> tuple[dict[str, float], float]:
    """Share of exact zeros in every prunable layer, and their parameter-weighted average."""
    stream = stream_of(model)
    if stream is not None:  # its blocks are on disk: read one at a time
        return stream.measured_sparsity(model)
    linears = prunable_linears(model)
    per_layer = {n: zero_fraction(lin.weight) for n, lin in linears.items()}
    return per_layer, weighted_average(per_layer, {n: lin.weight.numel() for n, lin in linears.items()})


def take_placement(model: nn.Module) -> None:
    """Make a model dispatched by accelerate (``device_map=...``) safe for the layer-wise engine,
    which places blocks itself (one on the device at a time).

    accelerate's hooks move each block's inputs to the device the map gave it, which would fight the
    engine's placement; they are removed and the model is gathered on the CPU. Weights offloaded to
    disk or CPU maps (parameters on the ``meta`` device) cannot be pruned in place: that is a clear
    error, not a device-mismatch traceback from inside a forward pass.
    """
    if not hasattr(model, "hf_device_map") and not any(hasattr(m, "_hf_hook") for m in model.modules()):
        return
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        from .errors import ConfigError

        raise ConfigError(
            f"{len(meta)} parameters (e.g. {meta[0]}) are offloaded by accelerate's device_map (meta tensors); "
            "load the model on the CPU instead (mixsparse.load_model, or from_pretrained without device_map): "
            "the engine moves one decoder block at a time to the device itself")
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(model, recurse=True)
    model.to("cpu")
    if hasattr(model, "hf_device_map"):
        del model.hf_device_map


KINDS = ("attention", "mlp", "experts", "routers", "embeddings/head", "norms", "other")


def module_kind(name: str, blocks_name: str) -> str:
    """What a parameter belongs to, by its qualified name: attention, mlp, experts, routers, embeddings/head,
    norms or other."""
    parts = name.split(".")
    if not name.startswith(blocks_name + "."):
        return "norms" if any("norm" in p for p in parts) else "embeddings/head"
    if any(p.startswith("experts") for p in parts):
        return "experts"
    if len(parts) >= 2 and parts[-2] in ROUTERS:
        return "routers"
    if any("norm" in p for p in parts[:-1]):
        return "norms"
    if any(k in p for p in parts for k in ("attn", "attention")):
        return "attention"
    if any(k in p for p in parts for k in ("mlp", "feed_forward", "ffn", "fc1", "fc2", "moe")):
        return "mlp"
    return "other"


def coverage(model: nn.Module) -> dict:
    """What pruning could reach and did: the share of the model's parameters in prunable layers, zeros per
    module kind, and the large tensors inside the blocks that no prunable layer holds (e.g. fused MoE experts:
    3-D parameters, not ``nn.Linear``), which a run names in a warning instead of reporting a sparsity
    'of prunable weights' that silently covers a small part of the model."""
    blocks_name, _ = find_decoder_blocks(model)
    layers = list(prunable_linears(model).values())
    prunable = {id(p) for p in owners(layers)[0]}
    large = 0.5 * sum(lin.weight.numel() for lin in layers) / len(layers)  # half a mean prunable layer
    kinds: dict[str, dict] = {}
    total = pruned_params = 0
    missed = []
    seen = set()
    stream = stream_of(model)
    at_rest = stream.zeros_at_rest() if stream is not None else {}
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied embeddings count once
            continue
        seen.add(id(p))
        kind = module_kind(name, blocks_name)
        k = kinds.setdefault(kind, {"params": 0, "zeros": 0, "prunable_params": 0})
        zeros = at_rest[name] if p.is_meta and name in at_rest else int((p.detach() == 0).sum())
        k["params"] += p.numel()
        k["zeros"] += zeros
        total += p.numel()
        if id(p) in prunable:
            k["prunable_params"] += p.numel()
            pruned_params += p.numel()
        elif name.startswith(blocks_name + ".") and p.numel() >= large:
            missed.append({"name": name, "shape": list(p.shape), "params": p.numel()})
    for k in kinds.values():
        k["sparsity"] = k["zeros"] / k["params"] if k["params"] else 0.0
    return {"total_params": total, "prunable_params": pruned_params, "prunable_fraction": pruned_params / total,
            "by_kind": {k: kinds[k] for k in KINDS if k in kinds}, "unprunable_large": missed}


def coverage_warning(cov: dict) -> str | None:
    """One line naming the large tensors pruning could not reach, or None."""
    missed = cov["unprunable_large"]
    if not missed:
        return None
    share = sum(m["params"] for m in missed) / cov["total_params"]
    names = ", ".join(m["name"] for m in missed[:3]) + (f" and {len(missed) - 3} more" if len(missed) > 3 else "")
    return (f"{len(missed)} large tensor(s) inside the decoder blocks are not prunable layers and stay dense "
            f"({share:.1%} of the model's parameters): {names}; the sparsity reported is of the prunable layers "
            f"only ({cov['prunable_fraction']:.1%} of the parameters)")

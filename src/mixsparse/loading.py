"""Load a causal LM and its tokenizer from the embedded copy, a local directory or the hub.

``load_model("embedded")`` is SmolLM2-135M-Instruct from :mod:`mixsparse.assets` (works offline).
A local directory must hold ``config.json`` and safetensors weights; directories with only pickle
checkpoints (``pytorch_model*.bin``, ``*.pt``) are refused unless ``allow_pickle=True``, because
unpickling a file can execute arbitrary code. Anything shaped like ``org/name`` that is not a local
directory is passed to ``from_pretrained`` as a hub id (needs internet).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .errors import ConfigError, MixsparseError, ModelLoadError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """``"float32" | "bfloat16" | "float16" | "auto"`` (or a ``torch.dtype``) -> what ``from_pretrained`` takes."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ConfigError(f"unsupported dtype {dtype}; use float32, bfloat16, float16 or auto")
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key == "auto":
        return "auto"
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")
    return _DTYPES[key]


def _parse_device(device: str | torch.device | None) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"invalid device {device!r}: {e}") from e


def looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "~"))


def check_model_dir(path: Path, allow_pickle: bool = False) -> bool:
    """Validate a local model directory before handing it to transformers.

    Returns whether it holds safetensors weights (else it holds pickle ones, allowed by the caller).
    """
    if not path.exists():
        raise ModelLoadError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a directory (expected a Hugging Face model directory)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {path} has no config.json; is it a Hugging Face model directory?")
    safetensors = sorted(path.glob("*.safetensors"))
    pickles = sorted({p for pat in _PICKLE_PATTERNS for p in path.glob(pat)})
    if safetensors:
        _check_safetensors(safetensors)
        return True
    if pickles and not allow_pickle:
        names = ", ".join(p.name for p in pickles[:3])
        raise ModelLoadError(
            f"model directory {path} has only pickle checkpoints ({names}); loading them can execute "
            "arbitrary code. Convert them to safetensors, or pass allow_pickle=True (--allow-pickle) "
            "if you trust their source"
        )
    if not pickles:
        raise ModelLoadError(f"model directory {path} has no weights (*.safetensors)")
    return False


def _check_safetensors(files: list[Path]) -> None:
    from safetensors import safe_open

    for f in files:
        try:  # reads the header only; catches truncated or garbage files before transformers does
            with safe_open(str(f), framework="pt") as h:
                h.keys()
        except Exception as e:  # SafetensorError and OSError; the message names the file
            raise ModelLoadError(f"weights file {f} is corrupt or truncated: {e}") from e


def _truly_missing(model, missing_keys: list[str]) -> list[str]:
    """Missing keys that are not tied to a loaded tensor (a tied head shares the embedding's storage)."""
    if not missing_keys:
        return []
    params = dict(model.named_parameters(remove_duplicate=False))
    owners: dict[int, list[str]] = {}
    for name, p in params.items():
        owners.setdefault(id(p), []).append(name)
    missing = set(missing_keys)
    out = []
    for key in missing_keys:
        p = params.get(key)
        if p is not None and any(other not in missing for other in owners[id(p)]):
            continue  # tied to a tensor that was loaded
        if p is None and key not in dict(model.named_buffers()):
            continue
        out.append(key)
    return out


def load_tokenizer(spec: str | os.PathLike = "embedded", *, trust_remote_code: bool = False,
                   cache_dir: str | os.PathLike | None = None):
    """The tokenizer of ``spec`` alone (a second, not the model's minutes): for checks before loading."""
    from transformers import AutoTokenizer

    text = str(spec).strip()
    if text == "embedded":
        from .assets import embedded_model_dir

        source: str | Path = embedded_model_dir(cache_dir)
    else:
        source = Path(text).expanduser() if Path(text).expanduser().exists() else text
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load the tokenizer of {text!r}: {first}") from e


def load_model(
    spec: str | os.PathLike = "embedded",
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
    stream: str = "never",
):
    """``(model, tokenizer)`` in eval mode with ``use_cache`` off.

    ``spec``: ``"embedded"``, a local model directory, or a hub id ``org/name``.
    ``cache_dir`` only matters for ``"embedded"`` (see :func:`mixsparse.assets.cache_root`).
    ``stream``: ``"always"`` leaves the decoder blocks on the safetensors checkpoint (:mod:`mixsparse.streaming`),
    ``"auto"`` does so when the model would not fit in 80% of the available RAM, ``"never"`` loads it whole.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    dev = _parse_device(device)
    text = str(spec).strip()
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if text == "embedded":
        from .assets import embedded_model_dir

        try:
            source: str | Path = embedded_model_dir(cache_dir)
        except MixsparseError as e:
            raise ModelLoadError(f"the embedded model is not available: {e}") from e
        kwargs["use_safetensors"] = check_model_dir(source)
        on_hub = False
    elif Path(text).expanduser().exists() or not looks_like_hub_id(text):
        source = Path(text).expanduser()
        kwargs["use_safetensors"] = check_model_dir(source, allow_pickle)
        on_hub = False
    else:
        source, on_hub = text, True
        if not allow_pickle:
            kwargs["use_safetensors"] = True

    if stream != "never":
        from .streaming import load_streamed, should_stream

        local = source
        if on_hub and stream == "always":  # the checkpoint's files on disk (the hub cache), read block by block
            from huggingface_hub import snapshot_download

            try:
                local = Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
            except Exception as e:  # noqa: BLE001 - offline, unknown id, ...
                raise ModelLoadError(f"could not download {text!r} from the Hugging Face hub to stream it: "
                                     f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
        if not on_hub or stream == "always":
            decided = stream == "always" or should_stream(local, torch_dtype)
            if decided:
                if dev is not None and dev.type != "cpu":
                    raise ConfigError("a streamed model stays on the CPU between stages (blocks go to the device one "
                                      "at a time): load it without device=")
                model = load_streamed(local, torch_dtype)
                return model, AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except MixsparseError:
        raise
    except Exception as e:  # transformers/hub raise OSError, ValueError, KeyError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if on_hub:
            raise ModelLoadError(
                f"could not load model {text!r} from the Hugging Face hub: {first}. The hub could not be "
                "reached or has no such model; offline, use --model embedded or a local model directory"
            ) from e
        raise ModelLoadError(f"could not load the model in {source}: {first}") from e

    missing = _truly_missing(model, info.get("missing_keys") or [])
    if missing:
        raise ModelLoadError(
            f"the checkpoint in {source} lacks {len(missing)} weight tensor(s) the model needs (e.g. {', '.join(missing[:3])}); "
            "they would be random, so pruning would prune noise. Check that the directory holds the whole checkpoint")
    if dev is not None:
        try:
            model.to(dev)
        except (RuntimeError, AssertionError) as e:  # e.g. CUDA asked for on a CPU-only torch
            raise ConfigError(f"cannot move the model to device {str(dev)!r}: {e}") from e
    model.eval()
    model.config.use_cache = False  # pruning and evaluation never decode token by token
    return model, tokenizer

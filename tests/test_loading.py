"""Model loading: local directories, refusals, errors, the hub path (faked) and the embedded model."""

from __future__ import annotations

import shutil

import pytest
import torch

from mixsparse.errors import ConfigError, ModelLoadError
from mixsparse.loading import load_model, looks_like_hub_id, parse_dtype


def test_parse_dtype():
    assert parse_dtype("float32") is torch.float32
    assert parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("float16") is torch.float16
    assert parse_dtype("BF16") is torch.bfloat16
    assert parse_dtype("torch.float16") is torch.float16
    assert parse_dtype(torch.float32) is torch.float32
    assert parse_dtype("auto") == "auto"
    with pytest.raises(ConfigError, match="'float8'"):
        parse_dtype("float8")
    with pytest.raises(ConfigError, match="int8"):
        parse_dtype(torch.int8)


def test_looks_like_hub_id():
    assert looks_like_hub_id("HuggingFaceTB/SmolLM2-135M")
    assert looks_like_hub_id("meta-llama/Llama-2-7b-hf")
    for spec in ("gpt2", "./a/b", "/abs/path", "~/models/x", "a/b/c", "org/"):
        assert not looks_like_hub_id(spec), spec


def test_local_dir_round_trip(tiny_llama, tiny_llama_dir):
    ref, _ = tiny_llama
    model, tok = load_model(tiny_llama_dir)
    assert not model.training and model.config.use_cache is False
    assert next(model.parameters()).dtype == torch.float32
    x = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref(input_ids=x).logits)
    assert tok("hi")["input_ids"] == [1, 3 + ord("h") - 32, 3 + ord("i") - 32]


def test_local_dir_dtype(tiny_llama_dir):
    model, _ = load_model(str(tiny_llama_dir), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_dir_and_file(tmp_path):
    with pytest.raises(ModelLoadError, match=f"{tmp_path / 'nope'} does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("no_such_model_name")
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is not a directory"):
        load_model(f)


def test_dir_without_config(tiny_llama_dir):
    (tiny_llama_dir / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=f"{tiny_llama_dir} has no config.json"):
        load_model(tiny_llama_dir)


def test_dir_without_weights(tiny_llama_dir):
    (tiny_llama_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="has no weights"):
        load_model(tiny_llama_dir)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tiny_llama_dir, damage):
    f = tiny_llama_dir / "model.safetensors"
    blob = f.read_bytes()
    f.write_bytes(blob[: len(blob) // 2] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=f"{f} is corrupt or truncated"):
        load_model(tiny_llama_dir)


def test_pickle_only_dir_is_refused_unless_allowed(tiny_llama, tiny_llama_dir):
    ref, _ = tiny_llama
    (tiny_llama_dir / "model.safetensors").unlink()
    torch.save(ref.state_dict(), tiny_llama_dir / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin.*arbitrary code"):
        load_model(tiny_llama_dir)
    model, _ = load_model(tiny_llama_dir, allow_pickle=True)
    x = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref(input_ids=x).logits)


def test_missing_tokenizer_names_dir(tiny_llama_dir):
    for f in tiny_llama_dir.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ModelLoadError, match=str(tiny_llama_dir)):
        load_model(tiny_llama_dir)


def test_hub_unreachable_is_a_clear_error(monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = {}

    def offline(name, **kwargs):
        seen.update(kwargs, name=name)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(ModelLoadError, match=r"'org/model'.*couldn't connect.*--model embedded or a local model"):
        load_model("org/model")
    assert seen["name"] == "org/model" and seen["use_safetensors"] is True  # no pickles from the hub either


def test_bad_device(tiny_llama_dir):
    with pytest.raises(ConfigError, match="'notadevice'"):
        load_model(tiny_llama_dir, device="notadevice")


def test_copied_dir_still_loads(tiny_llama_dir, tmp_path):
    # directories are located by content, not by name: a renamed copy loads the same way
    copy = tmp_path / "renamed copy"
    shutil.copytree(tiny_llama_dir, copy)
    model, _ = load_model(copy)
    assert model.config.num_hidden_layers == 2


@pytest.mark.integration
def test_embedded_model(embedded):
    model, tok = embedded
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not model.training and model.config.use_cache is False
    assert tok("Hello")["input_ids"] == [19556]  # no BOS is prepended by this tokenizer

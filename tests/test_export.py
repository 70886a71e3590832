"""HF and compressed checkpoints: exact packing, bit-exact round trips, sizes, refusals."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from mixsparse.engine import prune_layerwise
from mixsparse.errors import ConfigError, ModelLoadError
from mixsparse.export import (
    INDEX_FILE,
    TENSOR_FILE,
    bitmask_decode,
    bitmask_encode,
    load_compressed,
    nm_decode,
    nm_encode,
    pack_bits,
    save_compressed,
    save_hf,
    unpack_bits,
)
from mixsparse.modeling import param_counts, prunable_linears
from mixsparse.sparsity import NM, SparsityMap

# --- packing on hand-built tensors -------------------------------------------------------------


def test_pack_bits_first_bit_is_most_significant():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    assert pack_bits(bits).tolist() == [0b10000001, 0b11000000]
    assert torch.equal(unpack_bits(pack_bits(bits), 10), bits)


def test_bitmask_exact_bytes_and_round_trip():
    w = torch.tensor(
        [[0.0, 1.5, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0],
         [3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0],
         [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25]],
        dtype=torch.float16,
    )  # fmt: skip
    packed, values = bitmask_encode(w)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [0b01001000, 0b10000001, 0b00000001]
    assert values.tolist() == [1.5, 2.0, 3.0, -1.0, 0.25]
    assert values.dtype == torch.float16
    assert torch.equal(bitmask_decode(packed, values, (3, 8)), w)


def test_bitmask_pads_last_byte_and_handles_empty():
    w = torch.tensor([[0.0, 7.0, 0.0]])  # 3 bits -> one byte, padded with zeros
    packed, values = bitmask_encode(w)
    assert packed.tolist() == [0b01000000] and values.tolist() == [7.0]
    z = torch.zeros(2, 4)
    packed, values = bitmask_encode(z)
    assert packed.tolist() == [0] and values.numel() == 0
    assert torch.equal(bitmask_decode(packed, values, (2, 4)), z)


def test_bitmask_decode_refuses_wrong_value_count():
    packed, values = bitmask_encode(torch.tensor([[1.0, 0.0, 2.0, 0.0]]))
    with pytest.raises(ValueError, match="2 set bits but 1 values"):
        bitmask_decode(packed, values[:1], (1, 4))


def test_nm_2_4_exact_bytes_and_round_trip():
    # groups of 4 inputs: kept positions [1,2], [0,3] | [0,1], [2,3]
    w = torch.tensor([[0.0, 5.0, 6.0, 0.0, 7.0, 0.0, 0.0, 8.0],
                      [1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0, 4.0]])  # fmt: skip
    values, idx = nm_encode(w, NM(2, 4))
    assert values.tolist() == [5.0, 6.0, 7.0, 8.0, 1.0, 2.0, 3.0, 4.0]
    # 2 bits per index, MSB first: 01 10 00 11 | 00 01 10 11
    assert idx.tolist() == [0b01100011, 0b00011011]
    assert torch.equal(nm_decode(values, idx, (2, 8), NM(2, 4)), w)


def test_nm_3_bit_indices_and_padding_of_short_groups():
    # 1:8 -> 3 bits per index; second row's group is all zero: padded with position 0, value 0
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # fmt: skip
    values, idx = nm_encode(w, NM(1, 8))
    assert values.tolist() == [9.0, 0.0]
    assert idx.tolist() == [0b10100000]  # 101 000 + 2 pad bits
    assert torch.equal(nm_decode(values, idx, (2, 8), NM(1, 8)), w)


def test_nm_encode_refuses_a_non_nm_weight():
    with pytest.raises(ValueError, match="not 2:4"):
        nm_encode(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), NM(2, 4))


# --- tiny model round trips ---------------------------------------------------------------------


def _tiny(tied: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)  # fmt: skip
    # built directly in fp16 so its non-persistent rotary buffers match a reload's (fp32)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()


def _pruned(target: str | float, tied: bool = True):
    model = _tiny(tied)
    smap = SparsityMap.uniform(target, param_counts(model))
    prune_layerwise(model, None, smap, "magnitude", progress=False)
    return model, smap


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("target, tied", [(0.7, True), ("2:4", False)])
def test_round_trip_logits_identical(tmp_path, target, tied):
    model, smap = _pruned(target, tied)
    meta = {"pruner": "magnitude", "allocation": "uniform", "target": target, "per_layer": smap}
    save_hf(model, None, tmp_path / "hf", meta)
    sizes = save_compressed(model, tmp_path / "c", sparsity_map=smap, metadata=meta)

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    comp = load_compressed(tmp_path / "c")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    assert torch.equal(ref, _logits(hf, ids))
    assert torch.equal(ref, _logits(comp, ids))
    for name, t in model.state_dict().items():  # every tensor bit-exact (no -0.0 in these weights)
        assert torch.equal(comp.state_dict()[name].view(torch.int16), t.view(torch.int16)), name

    assert comp.dtype == torch.float16 and not comp.training
    assert (comp.lm_head.weight is comp.model.embed_tokens.weight) == tied
    index = json.loads((tmp_path / "c" / INDEX_FILE).read_text())
    want = "nm" if target == "2:4" else "bitmask"
    for name in prunable_linears(model):
        assert index["tensors"][f"{name}.weight"]["encoding"] == want
    assert index["tensors"]["model.embed_tokens.weight"]["encoding"] == "dense"
    assert index["aliases"] == ({"lm_head.weight": "model.embed_tokens.weight"} if tied else {})
    assert sizes["compressed_bytes"] == (tmp_path / "c" / TENSOR_FILE).stat().st_size

    for d in ("hf", "c"):
        cfg = AutoConfig.from_pretrained(tmp_path / d)
        assert cfg.mixsparse["pruner"] == "magnitude"
        assert cfg.mixsparse["per_layer"]["model.layers.1.mlp.down_proj"] == (0.7 if target == 0.7 else "2:4")
    assert hf.config.mixsparse["target"] == target


def test_sizes_at_70_percent(tmp_path):
    model, smap = _pruned(0.7)
    sizes = save_compressed(model, tmp_path / "c", sparsity_map=smap)
    prunable = sum(param_counts(model).values())
    total = sum(t.numel() for t in model.state_dict().values()) - model.lm_head.weight.numel()  # tied: once
    assert sizes["prunable_dense_bytes"] == 2 * prunable
    assert sizes["dense_bytes"] == 2 * total
    # 1 bit + 30% x 16 bits = 5.8 bits per weight = 0.3625x dense (up to the rounding of 30% of each layer)
    nnz = sum(round(0.3 * n) for n in param_counts(model).values())
    assert sizes["prunable_compressed_bytes"] == prunable // 8 + 2 * nnz
    assert sizes["prunable_ratio"] == pytest.approx(0.3625, rel=1e-3)
    assert sizes["prunable_ratio"] <= 0.45
    assert sizes["ratio"] == sizes["compressed_bytes"] / sizes["dense_bytes"] < 1.0


def test_dense_layers_are_not_bitmasked(tmp_path):
    model = _tiny()
    save_compressed(model, tmp_path / "c")
    index = json.loads((tmp_path / "c" / INDEX_FILE).read_text())
    assert {e["encoding"] for e in index["tensors"].values()} == {"dense"}


def test_nm_map_on_unstructured_weight_falls_back_to_bitmask(tmp_path):
    model, _ = _pruned(0.7)
    smap = SparsityMap.uniform("2:4", param_counts(model))  # says 2:4 but the weights are not
    save_compressed(model, tmp_path / "c", sparsity_map=smap)
    index = json.loads((tmp_path / "c" / INDEX_FILE).read_text())
    assert index["tensors"]["model.layers.0.mlp.up_proj.weight"]["encoding"] == "bitmask"
    ids = torch.randint(0, 128, (1, 8))
    assert torch.equal(_logits(model, ids), _logits(load_compressed(tmp_path / "c"), ids))


def test_fp32_model_saved_as_fp16(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg).eval()
    prune_layerwise(model, None, SparsityMap.uniform(0.5, param_counts(model)), "magnitude", progress=False)
    save_compressed(model, tmp_path / "c", dtype=torch.float16)
    back = load_compressed(tmp_path / "c")
    assert back.dtype == torch.float16
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t.half()), name
    assert load_compressed(tmp_path / "c", dtype=torch.float32).dtype == torch.float32


# --- refusals and corruption --------------------------------------------------------------------


def test_refuses_to_overwrite_unless_asked(tmp_path):
    model = _tiny()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        save_hf(model, None, out, {})
    with pytest.raises(ConfigError, match="not empty"):
        save_compressed(model, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    save_compressed(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / INDEX_FILE).is_file()
    save_hf(model, None, out, {"pruner": "x"}, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / INDEX_FILE).exists()
    # no temp dirs left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_empty_existing_dir_is_fine(tmp_path):
    (tmp_path / "c").mkdir()
    save_compressed(_tiny(), tmp_path / "c")
    assert (tmp_path / "c" / TENSOR_FILE).is_file()


def test_save_hf_of_a_gguf_style_model_leaves_the_caller_model_alone(tmp_path):
    model = _tiny()
    quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))
    model.hf_quantizer = quantizer
    model.config.quantization_config = {"quant_method": "gguf"}
    with pytest.raises(ValueError, match="not serializable"):  # what plain save_pretrained does
        model.save_pretrained(tmp_path / "plain")
    config_before = model.config
    save_hf(model, None, tmp_path / "hf", {"pruner": "magnitude"})
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in saved and saved["mixsparse"] == {"pruner": "magnitude"}
    assert model.hf_quantizer is quantizer and model.config is config_before
    assert model.config.quantization_config == {"quant_method": "gguf"}
    assert not hasattr(model.config, "mixsparse")


def test_unserialisable_metadata_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="metadata.bad"):
        save_hf(_tiny(), None, tmp_path / "hf", {"bad": object()})
    assert not (tmp_path / "hf").exists()


def _saved(tmp_path):
    model, smap = _pruned(0.7)
    save_compressed(model, tmp_path / "c", sparsity_map=smap)
    return tmp_path / "c"


def test_corrupt_tensor_file_is_a_model_load_error(tmp_path):
    d = _saved(tmp_path)
    data = bytearray((d / TENSOR_FILE).read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the values: safetensors itself would not notice
    (d / TENSOR_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_compressed(d)


def test_truncated_tensor_file_without_checksum_is_a_model_load_error(tmp_path):
    d = _saved(tmp_path)
    index = json.loads((d / INDEX_FILE).read_text())
    index["files"] = {TENSOR_FILE: None}  # no checksum recorded
    (d / INDEX_FILE).write_text(json.dumps(index))
    (d / TENSOR_FILE).write_bytes((d / TENSOR_FILE).read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_compressed(d)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / TENSOR_FILE).unlink(), "lacks its tensor file"),
        (lambda d: (d / INDEX_FILE).unlink(), "is missing"),
        (lambda d: (d / INDEX_FILE).write_text("{not json"), "corrupt"),
        (lambda d: _edit_index(d, format_version=99), "format version 99"),
        (lambda d: _edit_index(d, tensors={}, aliases={}), "does not fit its config"),
        (lambda d: _edit_index(d, tensors={}), "inconsistent: KeyError"),
        (lambda d: _edit_index(d, dtype="float99"), "unknown dtype 'float99'"),
    ],
)
def test_damaged_checkpoint_is_a_model_load_error(tmp_path, damage, message):
    d = _saved(tmp_path)
    damage(d)
    with pytest.raises(ModelLoadError, match=message):
        load_compressed(d)


def _edit_index(d, **changes):
    index = json.loads((d / INDEX_FILE).read_text())
    index.update(changes)
    (d / INDEX_FILE).write_text(json.dumps(index))


def test_missing_directory_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_compressed(tmp_path / "nope")


def test_packed_sizes_match_formula():
    w = torch.zeros(64, 40, dtype=torch.float16)
    w[:, ::4] = 1.0  # 1:4 shape, 25% dense
    packed, values = bitmask_encode(w)
    assert packed.numel() == math.ceil(64 * 40 / 8) and values.numel() == 64 * 10
    values, idx = nm_encode(w, NM(1, 4))
    assert values.numel() == 64 * 10 and idx.numel() == math.ceil(64 * 10 * 2 / 8)


def test_overflowing_cast_is_refused_but_existing_inf_is_kept(tmp_path):
    from mixsparse.errors import NumericalError

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")  # already infinite: stored as is
    save_compressed(model, tmp_path / "ok")
    assert torch.isinf(load_compressed(tmp_path / "ok").model.norm.weight[0])
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e6  # finite in fp32, inf in fp16
    with pytest.raises(NumericalError, match="model.layers.0.mlp.up_proj.weight"):
        save_compressed(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_a_large_checkpoint_is_written_in_shards_and_reads_back_bit_exactly(tmp_path):
    """Shards are written as tensors are encoded (no whole encoded copy in memory); each is hashed."""
    import json

    model = _tiny()
    smap = SparsityMap.uniform(0.5, param_counts(model))
    prune_layerwise(model, None, smap, "magnitude", progress=False)
    sizes = save_compressed(model, tmp_path / "c", sparsity_map=smap, max_shard_bytes=8 * 2**10)
    files = sorted(p.name for p in (tmp_path / "c").glob("model.compressed-*.safetensors"))
    index = json.loads((tmp_path / "c" / "compression.json").read_text())
    assert len(files) > 2 and sorted(index["files"]) == files and index["format_version"] == 2
    assert sizes["compressed_bytes"] == sum((tmp_path / "c" / f).stat().st_size for f in files)
    back = load_compressed(tmp_path / "c")
    for (n, a), (_, b) in zip(model.named_parameters(), back.named_parameters()):
        assert torch.equal(a.half(), b), n
    shard = tmp_path / "c" / files[1]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_compressed(tmp_path / "c")

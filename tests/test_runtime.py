"""Sparse runtime: a compressed checkpoint loaded as SparseLinear layers computes what the dense-with-zeros model
computes, for every stored format, on the kernels (each instruction set this CPU has) and on the torch path."""


import pytest
import torch

from mixsparse.engine import prune_layerwise
from mixsparse.export import load_compressed, save_compressed
from mixsparse.modeling import param_counts
from mixsparse.quant.grid import QuantSpec
from mixsparse.quant.stage import quantize_model
from mixsparse.runtime import SparseLinear, kernels, load_sparse
from mixsparse.runtime.linear import Q4SparseLinear
from mixsparse.runtime.decode import greedy
from mixsparse.sparsity import NM, SparsityMap

from .tiny import tiny_ids, tiny_model

CALIB = tiny_ids(4, 16, seed=1)
KERNELS = kernels.get()
ISAS = [i for i in (0, 1, 2) if KERNELS is not None and int(KERNELS.isa_level(i)) == i]


def _saved(tmp_path, target, *, dtype=torch.float16, quant: QuantSpec | None = None, tied=False, smap=None):
    model = tiny_model("llama", tie_word_embeddings=tied)
    smap = smap or SparsityMap.uniform(target, param_counts(model))
    prune_layerwise(model, CALIB, smap, "wanda", device="cpu", progress=False)
    codes = {}
    if quant is not None:
        codes, _ = quantize_model(model, "rtn", quant, progress=False)
    out = tmp_path / "c"
    save_compressed(model, out, dtype=dtype, sparsity_map=smap, quantized=codes)
    return out


def _reference_logits(path, ids):
    ref = load_compressed(path, dtype=torch.float32).eval()  # the dense-with-zeros model, exactly the stored values
    with torch.no_grad():
        return ref(ids).logits


CASES = {
    "bitmask-fp16": dict(target=0.7),
    "bitmask-bf16": dict(target=0.7, dtype=torch.bfloat16),
    "nm-2:4": dict(target=NM(2, 4)),
    "int4-sym": dict(target=0.6, quant=QuantSpec(4, 16, True)),
    "int4-asym": dict(target=0.6, quant=QuantSpec(4, 16, False)),
    "tied-head": dict(target=0.7, tied=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_runtime_logits_equal_the_dense_with_zeros_model(tmp_path, case, path):
    if path == "kernel" and KERNELS is None:
        pytest.skip(f"kernels not built: {kernels.reason()}")
    d = _saved(tmp_path, **CASES[case])
    ids = tiny_ids(1, 12, seed=3)
    want = _reference_logits(d, ids)
    model, info = load_sparse(d, kernels="auto" if path == "kernel" else "torch")
    assert len(info.sparse) == 14 and not info.dense  # every pruned linear of the 2 blocks is sparse
    assert all(isinstance(m, SparseLinear) for n, m in model.named_modules() if n in info.sparse)
    if "int4" in case and path == "kernel":  # codes and group scales as stored, half a byte per kept weight
        assert all(isinstance(m, Q4SparseLinear) for n, m in model.named_modules() if n in info.sparse)
    with torch.no_grad():
        prefill = model(ids).logits  # 12 tokens: the dense-expansion path
        decode = torch.cat([model(ids[:, : t + 1]).logits[:, -1:] for t in range(3)], 1)  # few tokens: the kernel
    torch.testing.assert_close(prefill, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decode, want[:, :3], rtol=1e-4, atol=1e-4)


def test_every_instruction_set_and_the_torch_path_agree():
    if len(ISAS) < 2:
        pytest.skip("one instruction set here")
    from mixsparse.export import bitmask_encode

    torch.manual_seed(0)
    # widths that end a row mid-step of every kernel (8..56 columns past a 32/64-column step); rows empty, full
    # and at 30% density, the last rows within a step's read of the values' end
    for cols in (136, 72, 256, 520):
        w = torch.randn(96, cols)
        w[torch.rand_like(w) < 0.7] = 0
        w[3] = 0
        w[5] = torch.randn(cols)
        w[-1] = torch.randn(cols)
        for dt in (torch.float16, torch.bfloat16):
            mask, values = bitmask_encode(w.to(dt))
            x = torch.randn(5, cols)
            ys = [SparseLinear(cols, 96, mask, values, kernels=KERNELS, isa=i)(x[:b]) for i in ISAS for b in (1, 2, 5)]
            ys.append(SparseLinear(cols, 96, mask, values)(x))
            ref = x @ w.to(dt).float().t()
            for y in ys:
                torch.testing.assert_close(y, ref[: len(y)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
# groups of 16 (one chunk at a time), 32 to 128 (32 columns per step; rows ending mid-step), per channel
@pytest.mark.parametrize("cols, group", [(160, 16), (160, 32), (136, 0), (192, 64), (264, 0), (512, 128)])
def test_int4_kernel_on_every_instruction_set_equals_the_dequantized_weight(symmetric, cols, group):
    if KERNELS is None:
        pytest.skip(f"kernels not built: {kernels.reason()}")
    from mixsparse.export import quantized_encode
    from mixsparse.quant.grid import quantize_rtn

    torch.manual_seed(1)
    w = torch.randn(40, cols)
    w[torch.rand_like(w) < 0.6] = 0
    # every weight of rows 6 and 8 kept (|w| >= 1: no code lands on the zero point), one of row 7: rows whose steps
    # need all 32 codes, from an even and from an odd first code
    w[6], w[8] = (torch.randn(cols).sign() * (1 + torch.rand(cols)) for _ in range(2))
    w[7] = 0
    w[7, 3] = 1.5
    qw = quantize_rtn(w, QuantSpec(4, group, symmetric), "w")
    enc, parts = quantized_encode(qw)
    assert enc == "quantized"  # 60% zeros: the bitmask pays
    ref_w = qw.dequantize()
    x = torch.randn(6, cols)
    for isa in ISAS:
        lin = Q4SparseLinear(cols, 40, parts["bitmask"], parts["codes"], parts["scale"], parts.get("zero"),
                             kernels=KERNELS, isa=isa)
        torch.testing.assert_close(lin(x), x @ ref_w.t(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lin.dense(), ref_w)
        many = torch.randn(20, cols)  # past SPARSE_MAX_TOKENS: the dense path
        torch.testing.assert_close(lin(many), many @ ref_w.t(), rtol=1e-5, atol=1e-5)


def test_the_kernels_refuse_too_few_stored_weights_before_reading_them():
    """A direct call whose values or codes are fewer than the mask says (or whose scales have no groups) is refused,
    not read past its end."""
    if KERNELS is None:
        pytest.skip(f"kernels not built: {kernels.reason()}")
    from mixsparse.export import bitmask_encode, quantized_encode
    from mixsparse.quant.grid import quantize_rtn

    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[torch.rand_like(w) < 0.5] = 0
    mask, values = bitmask_encode(w.half())
    rp = KERNELS.bitmask_row_ptr(mask, 16, 64)
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="row_ptr"):
        KERNELS.bitmask_matmul(x, mask, values[:-1], rp, 16, -1)
    _, parts = quantized_encode(quantize_rtn(w, QuantSpec(4, 32, True), "w"))
    rq = KERNELS.bitmask_row_ptr(parts["bitmask"], 16, 64)
    none = torch.empty(0, dtype=torch.uint8)
    KERNELS.q4_matmul(x, parts["bitmask"], parts["codes"], rq, parts["scale"], none, 16, -1)  # as stored: runs
    with pytest.raises(RuntimeError, match="4-bit codes"):
        KERNELS.q4_matmul(x, parts["bitmask"], parts["codes"][: (int(rq[-1]) - 1) // 2], rq, parts["scale"], none,
                          16, -1)
    with pytest.raises(RuntimeError, match="scale"):
        KERNELS.q4_matmul(x, parts["bitmask"], parts["codes"], rq, parts["scale"][:, :0], none, 16, -1)


def test_layers_too_dense_to_gain_stay_dense(tmp_path):
    model = tiny_model("llama")
    counts = param_counts(model)
    smap = SparsityMap({n: (0.1 if "mlp" in n else 0.7) for n in counts}, counts)
    d = _saved(tmp_path, None, smap=smap)
    sparse, info = load_sparse(d, min_sparsity=0.3)
    assert set(info.dense) == {n.rsplit(".", 1)[0] if n.endswith(".weight") else n for n in counts if "mlp" in n}
    assert all("min_sparsity" in why for why in info.dense.values())
    ids = tiny_ids(1, 8, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, _reference_logits(d, ids), rtol=1e-4, atol=1e-4)


def test_greedy_decode_gives_the_dense_models_tokens(tmp_path):
    d = _saved(tmp_path, 0.7)
    ref = load_compressed(d, dtype=torch.float32).eval()
    sparse, _ = load_sparse(d)
    ids = tiny_ids(1, 6, seed=7)
    a, b = greedy(ref, ids, 16), greedy(sparse, ids, 16)
    assert a.tokens == b.tokens and len(a.tokens) == 16 and b.tokens_per_s > 0


def test_the_packed_tensors_are_the_files_own_mapping(tmp_path):
    """Never densified: a sparse layer's values are a view of the memory-mapped checkpoint, and the model holds
    fewer weight bytes than the dense float32 one."""
    d = _saved(tmp_path, 0.7)
    sparse, info = load_sparse(d)
    dense = load_compressed(d, dtype=torch.float32)
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    lin = next(m for m in sparse.modules() if isinstance(m, SparseLinear))
    assert lin.values.dtype == torch.float16 and not lin.values.untyped_storage().resizable()  # a file mapping
    assert info.weight_bytes < dense_bytes


def test_cli_generate_eval_and_bench_on_a_run(tmp_path, capsys):
    """`mixsparse generate`, `eval --runtime sparse` and `bench` on a compressed checkpoint with a tokenizer."""
    import json

    from transformers import PreTrainedTokenizerFast

    from mixsparse.cli import main

    d = _saved(tmp_path, 0.7)
    from .conftest import _tiny_tokenizer

    tok = _tiny_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    tok.save_pretrained(d)
    assert main(["generate", str(d), "--prompt", "the river", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("the river")
    corpus = tmp_path / "t.txt"
    corpus.write_text("\n\n".join(" ".join(["the river model quiet stone"] * 20) for _ in range(40)))
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(d), "--runtime", "sparse", "--set", f"data.evaluation={corpus}",
                 "--seqlen", "16", "--set", "data.eval_tokens=64", "--quiet", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["runtime"]["sparse_layers"] == 14 and res["sparsity"] == pytest.approx(0.7, abs=0.01)
    ref = tmp_path / "ref.json"
    assert main(["eval", "--model", str(d), "--compressed", "--set", f"data.evaluation={corpus}", "--seqlen", "16",
                 "--set", "data.eval_tokens=64", "--quiet", "--json", str(ref)]) == 0
    assert res["perplexity"] == pytest.approx(json.loads(ref.read_text())["perplexity"], rel=1e-3)  # fp16 -> fp32 build
    q8 = tmp_path / "q8.json"
    assert main(["eval", "--model", str(d), "--runtime", "sparse", "--head-dtype", "int8", "--set",
                 f"data.evaluation={corpus}", "--seqlen", "16", "--set", "data.eval_tokens=64", "--quiet", "--json",
                 str(q8)]) == 0
    r8 = json.loads(q8.read_text())
    assert r8["runtime"]["sparse_layers"] == 15 and r8["runtime"]["weight_bytes"] < res["runtime"]["weight_bytes"]
    assert r8["perplexity"] == pytest.approx(res["perplexity"], rel=0.02)  # the head rounded to 8 bits per row
    js = tmp_path / "b.json"
    assert main(["bench", str(d), "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1", "--json", str(js)]) == 0
    b = json.loads(js.read_text())
    assert b["sparse"]["first_tokens"] == b["dense-fp32"]["first_tokens"]
    assert b["sparse"]["weight_bytes"] < b["dense-fp32"]["weight_bytes"]


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_a_16_bit_head_shares_its_values_with_the_tied_embedding(tmp_path, path):
    if path == "kernel" and KERNELS is None:
        pytest.skip(f"kernels not built: {kernels.reason()}")
    from mixsparse.runtime.linear import DenseLowpLinear
    from mixsparse.runtime.load import PackedEmbedding

    d = _saved(tmp_path, 0.7, tied=True)  # stored in fp16: the 16-bit head holds exactly the stored values
    model, info = load_sparse(d, head_dtype="float16", kernels="auto" if path == "kernel" else "torch")
    emb = model.get_input_embeddings()
    assert isinstance(model.lm_head, DenseLowpLinear) and info.sparse["lm_head"] == "dense float16"
    assert isinstance(emb, PackedEmbedding) and emb.weight_lowp.data_ptr() == model.lm_head.weight.data_ptr()
    ids = tiny_ids(1, 10, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _reference_logits(d, ids), rtol=1e-4, atol=1e-4)
        decode = torch.cat([model(ids[:, : t + 1]).logits[:, -1:] for t in range(3)], 1)  # the head's kernel
    torch.testing.assert_close(decode, _reference_logits(d, ids)[:, :3], rtol=1e-4, atol=1e-4)
    f32, _ = load_sparse(d)
    rows, cols = f32.get_input_embeddings().weight.shape
    # one 16-bit matrix instead of the float32 one: no copy left
    assert info.weight_bytes == _weight_bytes(f32) - rows * cols * 4 + rows * cols * 2


def test_an_int8_head_is_the_row_quantized_head_in_a_quarter_of_the_bytes(tmp_path):
    from mixsparse.runtime.linear import DenseLowpLinear, quantize_rows_int8
    from mixsparse.runtime.load import PackedEmbedding

    d = _saved(tmp_path, 0.7, tied=True)
    model, info = load_sparse(d, head_dtype="int8")
    assert isinstance(model.lm_head, DenseLowpLinear) and model.lm_head.weight.dtype == torch.int8
    assert info.sparse["lm_head"] == "dense int8, row scales"
    ref = load_compressed(d, dtype=torch.float32).eval()
    q, scale = quantize_rows_int8(ref.lm_head.weight.detach())
    assert all(torch.equal(a, b) for a, b in zip(quantize_rows_int8(ref.lm_head.weight.detach(), rows_per_chunk=3),
                                                 (q, scale)))  # a few rows at a time: the same codes and scales
    assert (q.abs() <= 127).all() and (q.float() * scale[:, None] - ref.lm_head.weight).abs().le(scale[:, None] / 2 + 1e-7).all()
    with torch.no_grad():  # the reference: the dense model whose tied head/embedding is the dequantized int8 matrix
        ref.lm_head.weight.copy_(q.float() * scale[:, None])
        ids = tiny_ids(1, 10, seed=9)
        want = ref(ids).logits
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
        decode = torch.cat([model(ids[:, : t + 1]).logits[:, -1:] for t in range(3)], 1)
    torch.testing.assert_close(decode, want[:, :3], rtol=1e-4, atol=1e-4)
    emb = model.get_input_embeddings()
    assert isinstance(emb, PackedEmbedding) and emb.weight_lowp.data_ptr() == model.lm_head.weight.data_ptr()
    f32, _ = load_sparse(d)
    rows, cols = f32.get_input_embeddings().weight.shape
    assert info.weight_bytes == _weight_bytes(f32) - rows * cols * 4 + rows * cols + rows * 4


def test_an_unknown_head_dtype_is_refused_in_one_line(tmp_path, capsys):
    from mixsparse.cli import main
    from mixsparse.errors import ConfigError

    with pytest.raises(ConfigError, match="head_dtype must be one of float32, float16, bfloat16, int8, got 'int4'"):
        load_sparse(tmp_path, head_dtype="int4")
    # a head dtype with the dense runtime would do nothing: refused before anything loads
    assert main(["eval", "--model", str(tmp_path), "--head-dtype", "int8"]) == 2
    assert capsys.readouterr().err.strip() == ("mixsparse: error: --head-dtype int8 applies to the sparse runtime only; "
                                               "add --runtime sparse or drop --head-dtype")
    assert main(["generate", str(tmp_path), "--prompt", "a", "--runtime", "dense", "--head-dtype", "float16"]) == 2
    assert "--head-dtype float16 applies to the sparse runtime only" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
def test_the_dense_head_kernel_on_every_instruction_set_equals_torch(dtype):
    if KERNELS is None:
        pytest.skip(f"kernels not built: {kernels.reason()}")
    from mixsparse.runtime.linear import DenseLowpLinear, quantize_rows_int8

    torch.manual_seed(2)
    # 576: whole 32/64-column steps; 592 and 48: AVX-512's 16-column tail; 72 and 24: AVX2 alone, its 8-column tail;
    # 20: not a multiple of 8 (the scalar loop)
    for cols in (576, 592, 48, 72, 24, 20):
        w = torch.randn(37, cols)
        low, scale = quantize_rows_int8(w) if dtype == torch.int8 else (w.to(dtype), None)
        ref_w = low.float() * scale[:, None] if scale is not None else low.float()
        x = torch.randn(8, cols)
        ref = (x.double() @ ref_w.double().t())
        # float32 sums of ``cols`` products in any order: within cols * 2^-24 * sum |w x| of the exact sum (a wrong
        # index or scale is off by the size of a product)
        bound = cols * 2.0**-24 * (x.double().abs() @ ref_w.double().abs().t())
        outs = [DenseLowpLinear(low, scale)(x)]  # the torch path
        for isa in ISAS:
            lin = DenseLowpLinear(low, scale, kernels=KERNELS, isa=isa)
            outs += [lin(x[:b]) for b in range(1, 9)]  # 1..8 tokens: every batch the kernel takes (4 at a time)
        for y in outs:
            err = (y.double() - ref[: len(y)]).abs()
            assert (err <= bound[: len(y)]).all(), f"cols {cols}: error {float(err.max()):.3g} beyond the float32 bound"


def _weight_bytes(model):
    from mixsparse.runtime.load import _weight_bytes as wb

    return wb(model)


def test_the_loaded_sparse_model_is_resident_in_less_memory_than_the_dense_one(tmp_path):
    """Resident memory of a fresh process that loads the model and decodes (``mixsparse bench``), sparse vs dense, on a
    model large enough (18M parameters, 70 MiB in float32) for its weights to stand out of torch's own memory."""
    import json

    from mixsparse.cli import main

    from .conftest import _tiny_tokenizer

    model = tiny_model("llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=4, vocab_size=8192,
                       num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    prune_layerwise(model, None, SparsityMap.uniform(0.7, param_counts(model)), "magnitude", progress=False)
    d = tmp_path / "c"
    save_compressed(model, d, dtype=torch.float16)
    _tiny_tokenizer().save_pretrained(d)
    js = tmp_path / "b.json"
    assert main(["bench", str(d), "--prompt-tokens", "16", "--new-tokens", "8", "--repeats", "1", "--json", str(js)]) == 0
    b = json.loads(js.read_text())
    sparse, dense = b["sparse"], b["dense-fp32"]
    # weights: 70 MiB in float32 (plus the fp16 copy load_compressed decodes from); sparse 39 MiB, of which the
    # float32 embeddings and head are 32
    assert sparse["weight_bytes"] < 0.6 * dense["weight_bytes"]
    # resident memory the loaded model adds to its process (the mapped file's pages it touched included)
    assert sparse["model_rss_mb"] < 0.75 * dense["model_rss_mb"], (sparse["model_rss_mb"], dense["model_rss_mb"])
    assert sparse["peak_rss_mb"] < dense["peak_rss_mb"]

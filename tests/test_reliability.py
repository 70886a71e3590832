"""Bad input and faults (issue: trustworthy under bad input): one test per case, at the CLI where a user
meets it. Numbers in the test names follow the issue's list."""

import json
import math
import signal

import pytest
import torch

from mixsparse.cli import main

from .tiny import tiny_model


@pytest.fixture
def quick(quick_cli):
    """CLI arguments of a seconds-long uniform run on the tiny model and the word corpus."""
    return quick_cli(sparsity=0.5, calib_samples=2, report=False)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the model gets loaded: the checks must come first."""
    import mixsparse.loading

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the configuration was checked")

    monkeypatch.setattr(mixsparse.loading, "load_model", boom)


def err(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mixsparse:")]
    assert len(lines) == 1, lines
    return lines[0]


# 1 -------------------------------------------------------------------------------------------------
def snapshot(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_1_a_finished_run_is_never_overwritten_by_accident(quick, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["prune", *quick, "--out", str(out)]) == 0
    before = snapshot(out)
    assert any(k.startswith("model/") for k in before) and any(k.startswith("compressed/") for k in before)
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    # a failing re-run (typo in the pruner) into the finished directory: refused, nothing touched
    assert main(["prune", *quick, "--pruner", "wandaa", "--out", str(out)]) == 2
    assert "wandaa" in err(capsys)
    assert main(["prune", *quick, "--out", str(out)]) == 2
    msg = err(capsys)
    assert "finished run" in msg and "--overwrite" in msg
    assert snapshot(out) == before
    # --overwrite whose new run fails: the finished run comes back whole
    import mixsparse.pipeline

    def fail(*a, **k):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(mixsparse.pipeline, "save_allocation", fail)
        with pytest.raises(RuntimeError):
            main(["prune", *quick, "--out", str(out), "--overwrite", "--sparsity", "0.6"])
    assert snapshot(out) == before
    assert main(["prune", *quick, "--out", str(out), "--overwrite", "--sparsity", "0.6"]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["prune"]["sparsity"] == 0.6


def test_1_a_failed_run_is_recorded_as_failed_and_the_report_says_so(quick, tmp_path, monkeypatch):
    """(also 11) A run that fails mid-way says so in run.json and in its report."""
    import mixsparse.pipeline
    from mixsparse.report import render_report

    def fail(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mixsparse.pipeline, "save_allocation", fail)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        main(["prune", *quick, "--out", str(out)])
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "failed" and "disk full" in rec["error"]
    assert "did not finish: failed" in render_report(out).read_text()


# 2 -------------------------------------------------------------------------------------------------
def test_2_a_checkpoint_with_missing_tensors_is_refused(tiny_llama_dir, capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    f = tiny_llama_dir / "model.safetensors"
    tensors = load_file(f)
    dropped = [k for k in tensors if "layers.1.mlp" in k]
    save_file({k: v for k, v in tensors.items() if k not in dropped}, f, metadata={"format": "pt"})
    assert main(["prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "r"), "--device", "cpu"]) == 2
    msg = err(capsys)
    assert f"lacks {len(dropped)} weight tensor" in msg and "layers.1.mlp" in msg


def test_2_tied_weights_are_not_missing(tmp_path):
    from mixsparse.loading import load_model

    m = tiny_model("llama", tie_word_embeddings=True)
    m.save_pretrained(tmp_path / "m")
    from tests.conftest import _tiny_tokenizer

    _tiny_tokenizer().save_pretrained(tmp_path / "m")
    model, _ = load_model(tmp_path / "m")
    assert model.lm_head.weight is model.model.embed_tokens.weight


# 3 -------------------------------------------------------------------------------------------------
def _alloc_file(path, layers: dict):
    import yaml

    path.write_text(yaml.safe_dump({"per_layer": layers}))
    return path


def test_3_allocation_file_missing_layers_or_other_average_is_an_error(quick, tiny_llama, tmp_path, capsys):
    from mixsparse.modeling import param_counts

    names = list(param_counts(tiny_llama[0]))
    f = _alloc_file(tmp_path / "a.yaml", {n: 0.7 for n in names[:-2]})
    args = [a for a in quick if a not in ("--sparsity", "0.5")]
    assert main(["prune", *args, "--allocation-file", str(f), "--out", str(tmp_path / "r1")]) == 2
    assert "no sparsity for 2 of" in err(capsys)
    g = _alloc_file(tmp_path / "b.yaml", {n: 0.3 for n in names})
    assert main(["prune", *args, "--allocation-file", str(g), "--sparsity", "0.7", "--out", str(tmp_path / "r2")]) == 2
    msg = err(capsys)
    assert "0.3000" in msg and "0.7" in msg
    assert main(["prune", *args, "--allocation-file", str(g), "--out", str(tmp_path / "r3")]) == 0  # the file decides


# 4 -------------------------------------------------------------------------------------------------
def test_4_windows_follow_the_tokenizers_bos_convention(tiny_tokenizer):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from mixsparse.data import calibration_ids, eval_windows, window_prefix

    text = "the river is quiet and green. " * 40
    assert window_prefix(tiny_tokenizer) == [tiny_tokenizer.bos_token_id]  # it prepends <s> itself
    w = eval_windows(tiny_tokenizer, text, 16, 64, prefix=window_prefix(tiny_tokenizer))
    c = calibration_ids(tiny_tokenizer, text, 3, 16, 0, prefix=window_prefix(tiny_tokenizer))
    assert w.shape == (4, 16) and c.shape == (3, 16)
    assert (w[:, 0] == 1).all() and (c[:, 0] == 1).all() and (w[:, 1:] != 1).all()
    vocab = {ch: i for i, ch in enumerate(["<unk>", "<s>"] + [chr(i) for i in range(32, 127)])}
    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                    unk_token="<unk>", bos_token="<s>")
    assert window_prefix(plain) == [] and window_prefix(plain, "always") == [1] and window_prefix(tiny_tokenizer, "never") == []
    assert (eval_windows(plain, text, 16, 64, prefix=window_prefix(plain))[:, 0] != 1).all()


def test_4_the_run_records_the_window_start(quick, tmp_path):
    assert main(["prune", *quick, "--out", str(tmp_path / "r"), "--set", "data.bos=auto"]) == 0
    rec = json.loads((tmp_path / "r" / "run.json").read_text())
    assert rec["windows"] == {"bos": "auto", "prefix_ids": [1]}


# 5 -------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "tpu"])
def test_5_an_unavailable_device_is_one_line_before_anything_runs(quick, tmp_path, capsys, no_model_load, device):
    assert main(["prune", *quick, "--set", f"model.device={device}", "--out", str(tmp_path / "r")]) == 2
    assert "model.device" in err(capsys)
    assert not (tmp_path / "r").exists()


# 6 -------------------------------------------------------------------------------------------------
def test_6_bad_output_paths_are_one_line(quick, tmp_path, capsys, no_model_load):
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main(["prune", *quick, "--out", str(f)]) == 2
    assert "is a file" in err(capsys)
    assert main(["prune", *quick, "--out", str(f / "sub")]) == 2
    assert "lies under a file" in err(capsys)
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    import os

    if os.geteuid() != 0:  # root writes anywhere
        assert main(["prune", *quick, "--out", str(ro / "r")]) == 2
        assert "not writable" in err(capsys)
    assert main(["eval", *quick, "--json", str(tmp_path)]) == 2
    assert "is a directory" in err(capsys)


# 7 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("section,field,value", [("perplexity", "dense", "abc"), ("pruning", "overall_sparsity", [1]),
                                                 ("timings", "prune", "slow"), ("zeroshot", "sentiment", 0.5)])
def test_7_report_on_a_malformed_record_names_the_field(tmp_path, capsys, section, field, value):
    (tmp_path / "run.json").write_text(json.dumps({"config": {}, section: {field: value}}))
    assert main(["report", str(tmp_path)]) == 2
    assert f"{section}.{field}" in err(capsys)


# 8 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,needle", [
    (["--pruner", "wandaa"], "wandaa"),
    (["--calibration", "wikki"], "wikki"),
    (["--set", "data.evaluation=lee"], "lee"),
    (["--calibration", "/nope/corpus.txt"], "does not exist"),
    (["--allocation-file", "/nope/a.yaml"], "does not exist"),
    (["--sparsity", "2:4", "--allocation", "owl"], "N:M"),
    (["--set", "eval.zeroshot=[sentimnt]"], "sentimnt"),
    (["--allocation", "msp", "--set", "search.step=1.5"], "step"),
    (["--allocation", "msp", "--set", "search.patterns=[1:4,3:4]"], "patterns"),
    (["--set", "prune.options={blocksize: 4}"], "blocksize"),
    (["--eval-tokens", "16"], "eval_tokens"),
])
def test_8_configuration_errors_come_before_the_model_loads(quick, tmp_path, capsys, no_model_load, extra, needle):
    args = [a for a in quick if a not in ("--sparsity", "0.5")] if "--sparsity" in extra else quick
    assert main(["prune", *args, *extra, "--out", str(tmp_path / "r")]) == 2
    assert needle in err(capsys)


# 9 -------------------------------------------------------------------------------------------------
def test_9_sparsity_and_pattern_together_are_an_error(quick, tmp_path, capsys, no_model_load):
    assert main(["prune", *quick, "--pattern", "2:4", "--out", str(tmp_path / "r")]) == 2
    msg = err(capsys)
    assert "--sparsity 0.5" in msg and "--pattern 2:4" in msg


# 10 ------------------------------------------------------------------------------------------------
def test_10_sigterm_unwinds_like_ctrl_c_and_the_message_says_what_is_kept(quick, tmp_path, capsys, monkeypatch):
    import os

    import mixsparse.pipeline

    def prune_then_sigterm(*a, **k):
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(mixsparse.pipeline, "prune", prune_then_sigterm)
    out = tmp_path / "r"
    before = signal.getsignal(signal.SIGTERM)
    assert main(["prune", *quick, "--out", str(out)]) == 130
    msg = err(capsys)
    assert "search_state.json" in msg and "other stages will run again" in msg
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_10_atomic_dir_leaves_no_temp_dir_on_interrupt(tmp_path):
    from mixsparse.io import atomic_dir

    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "model") as d:
            (d / "x").write_text("partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# 11 ------------------------------------------------------------------------------------------------
def test_11_eval_on_a_compressed_dir_suggests_the_flag(quick, tmp_path, capsys):
    assert main(["prune", *quick, "--out", str(tmp_path / "r")]) == 0
    c = str(word_corpus_of(quick))
    assert main(["eval", "--model", str(tmp_path / "r" / "compressed"), "--set", f"data.evaluation={c}",
                 "--device", "cpu", "--quiet"]) == 2
    assert "add --compressed" in err(capsys)


def word_corpus_of(args):
    return args[args.index("--calibration") + 1]


def test_11_quiet_silences_transformers_progress_bars(quick, tmp_path):
    from transformers.utils import logging as hf_logging

    try:
        main(["prune", *quick, "--out", str(tmp_path / "r")])
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


# 12-16 ---------------------------------------------------------------------------------------------
def test_12_fitness_key_does_not_depend_on_dict_order():
    from mixsparse.search import Fitness

    assert Fitness.key({"a": 1, "b": -1}) == Fitness.key({"b": -1, "a": 1})


@pytest.mark.parametrize("method", ["owl", "hessian"])
def test_13_owl_and_hessian_honour_min_and_max_sparsity(tiny_llama, word_corpus, method):
    from mixsparse.config import load_config
    from mixsparse.pipeline import allocate

    model, tok = tiny_llama
    cfg = load_config(None, {"data.calibration": str(word_corpus), "data.calibration_samples": 2, "data.seqlen": 32,
                             "prune.sparsity": 0.6, "prune.allocation": method, "allocation.hessian.alpha": 0.3,
                             "allocation.owl.lam": 0.3, "allocation.hessian.samples": 1,
                             "allocation.hessian.probes": 1, "allocation.hessian.seqlen": 32,
                             f"allocation.{method}.min_sparsity": 0.55, f"allocation.{method}.max_sparsity": 0.65})
    alloc = allocate(model, tok, cfg, device=torch.device("cpu"), progress=False)
    vals = [float(v) for v in alloc.sparsity_map.to_dict().values()]
    assert min(vals) >= 0.55 - 1e-9 and max(vals) <= 0.65 + 1e-9
    assert alloc.sparsity_map.average() == pytest.approx(0.6, abs=1e-9)


def test_14_lm_eval_results_are_in_the_report(tmp_path):
    from mixsparse.report import render_report

    (tmp_path / "run.json").write_text(json.dumps({"config": {}, "lm_eval": {"piqa": {"acc,none": 0.61, "n_samples": 50}}}))
    md = render_report(tmp_path).read_text()
    assert "lm-evaluation-harness" in md and "piqa" in md and "0.6100" in md


def test_15_an_allocation_file_with_another_method_is_an_error(quick, tmp_path, capsys, no_model_load):
    f = _alloc_file(tmp_path / "a.yaml", {"x": 0.5})
    assert main(["prune", *quick, "--allocation", "owl", "--allocation-file", str(f), "--out", str(tmp_path / "r")]) == 2
    assert "allocation_file" in err(capsys)


def test_16_infinite_scores_are_valid_json_and_resume(tmp_path):
    from mixsparse.io import atomic_write_json
    from mixsparse.search import SearchState

    atomic_write_json(tmp_path / "x.json", {"f": math.inf, "g": [1.0, -math.inf], "h": math.nan})
    text = (tmp_path / "x.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    import random

    class Memo:
        memo = {(("a", 1),): [math.inf, 0.5]}
        evaluations = 2

    st = SearchState("fp", [{"a": 1}], random.Random(0))
    st.save(tmp_path / "s.json", Memo)
    fresh, back = SearchState("fp", [], random.Random(0)), type("M", (), {"memo": {}, "evaluations": 0})()
    assert fresh.load(tmp_path / "s.json", back)
    assert back.memo == {(("a", 1),): [math.inf, 0.5]}


# 17 ------------------------------------------------------------------------------------------------
def test_17_an_empty_calibration_file_is_refused_before_the_model_loads(quick, tmp_path, capsys, no_model_load):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    i = quick.index("--calibration") + 1
    args = quick[:i] + [str(empty)] + quick[i + 1:]
    assert main(["prune", *args, "--out", str(tmp_path / "r")]) == 2
    msg = err(capsys)
    assert "empty.txt is empty" in msg


def test_17_a_too_short_corpus_names_its_token_count_and_the_need(quick, tmp_path, capsys, no_model_load):
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(["a b"] * 4))  # its calibration split: ~10 characters (the tokenizer's tokens)
    i = quick.index("--calibration") + 1
    args = quick[:i] + [str(short)] + quick[i + 1:]
    assert main(["prune", *args, "--out", str(tmp_path / "r")]) == 2
    msg = err(capsys)
    assert "short.txt" in msg and "tokens in its calibration split, but 33 are needed" in msg

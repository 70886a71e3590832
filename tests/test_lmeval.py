"""lm-evaluation-harness adapter, run offline on a local 10-question task and a tiny random Llama."""

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mixsparse.errors import ConfigError, MixsparseError, UnknownNameError
from mixsparse.lmeval import LmEvalUnavailableError, _flatten_metrics, run_lm_eval
from tests.test_zeroshot import byte_tokenizer, reference_logprob, token_ids
from tests.tiny import tiny_model

TASK_DIR = Path(__file__).parent / "data" / "lmeval_task"
TASK = "mixsparse_toy_mc"


def test_missing_lm_eval_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(LmEvalUnavailableError, match=r"pip install 'lm-eval>=0\.4\.13'"):
        run_lm_eval(tiny_model(), byte_tokenizer(), [TASK])
    assert issubclass(LmEvalUnavailableError, MixsparseError)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tasks=[]), "non-empty"),
        (dict(tasks=[TASK], limit=0), "limit"),
        (dict(tasks=[TASK], limit=1.5), "limit"),
        (dict(tasks=[TASK], batch_size=0), "batch_size"),
        (dict(tasks=[TASK], num_fewshot=-1), "num_fewshot"),
        (dict(tasks=[TASK], include_path="/no/such/dir"), "/no/such/dir"),
    ],
)
def test_bad_arguments_fail_before_lm_eval_is_touched(kwargs, message):
    tasks = kwargs.pop("tasks")
    with pytest.raises(ConfigError, match=message):
        run_lm_eval(None, None, tasks, **kwargs)


def test_flatten_metrics():
    raw = {"alias": "x", "acc,none": 0.5, "acc_stderr,none": "N/A", "exact_match,strict-match": 1, "flag,none": True}
    assert _flatten_metrics(raw) == {"acc": 0.5, "exact_match,strict-match": 1.0}


@pytest.fixture()
def local_task(tmp_path, monkeypatch):
    """A copy of the task YAML whose data_files points at the JSONL by absolute path."""
    import datasets

    # keep datasets' Arrow cache out of the user's home and never ask the hub for anything
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    data = (TASK_DIR / "toy_mc.jsonl").resolve()
    yaml_text = (TASK_DIR / f"{TASK}.yaml").read_text()
    assert "tests/data/lmeval_task/toy_mc.jsonl" in yaml_text
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / f"{TASK}.yaml").write_text(yaml_text.replace("tests/data/lmeval_task/toy_mc.jsonl", str(data)))
    docs = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    return task_dir, docs


def expected_accuracy(model, tok, docs):
    """lm-eval's multiple-choice acc recomputed with plain forwards (target delimiter " "; the byte
    tokenizer encodes context and continuation apart exactly as together)."""
    correct = []
    for d in docs:
        context = token_ids(tok, f"Question: {d['question']}\nAnswer:")
        scores = [reference_logprob(model, context, token_ids(tok, " " + c)) for c in d["choices"]]
        correct.append(max(range(len(scores)), key=scores.__getitem__) == d["label"])
    return sum(correct) / len(correct)


def test_run_lm_eval_local_task_in_memory_model(local_task):
    task_dir, docs = local_task
    model, tok = tiny_model("llama", seed=0, vocab_size=257), byte_tokenizer()
    pad_before = tok.pad_token

    full = run_lm_eval(model, tok, [TASK], include_path=task_dir, include_defaults=False, batch_size=4)
    assert set(full) == {TASK}
    res = full[TASK]
    assert res["n_samples"] == 10
    assert 0.0 <= res["acc"] <= 1.0 and 0.0 <= res["acc_norm"] <= 1.0
    assert res["acc"] == pytest.approx(expected_accuracy(model, tok, docs))
    assert tok.pad_token == pad_before  # the caller's tokenizer is not modified

    limited = run_lm_eval(model, tok, [TASK], include_path=str(task_dir), include_defaults=False, limit=4)
    assert limited[TASK]["n_samples"] == 4
    assert limited[TASK]["acc"] == pytest.approx(expected_accuracy(model, tok, docs[:4]))

    with pytest.raises(UnknownNameError, match="'no_such_task'"):
        run_lm_eval(model, tok, ["no_such_task"], include_path=task_dir, include_defaults=False)


def test_run_lm_eval_keeps_the_callers_random_streams(local_task):
    """lm-eval reseeds the global generators; a run that evaluates midway must draw what it would have."""
    task_dir, _ = local_task
    model, tok = tiny_model("llama", seed=0, vocab_size=257), byte_tokenizer()

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected = draws()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    run_lm_eval(model, tok, [TASK], include_path=task_dir, include_defaults=False, limit=2)
    assert draws() == expected


def test_run_lm_eval_skips_lm_evals_run_metadata_and_restores_it(local_task, tmp_path, monkeypatch, capfd):
    """Outside a git repository lm-eval's own `git describe` printed "fatal: not a git repository" on every
    evaluation; the metadata it gathers (git hash, pip list) is not kept, so it is not gathered."""
    import lm_eval.evaluator as evaluator

    task_dir, _ = local_task
    before = (evaluator.get_git_commit_hash, evaluator.add_env_info)
    monkeypatch.chdir(tmp_path)  # not inside a repository
    model, tok = tiny_model("llama", seed=0, vocab_size=257), byte_tokenizer()
    res = run_lm_eval(model, tok, [TASK], include_path=task_dir, include_defaults=False, limit=2, progress=False)
    assert res[TASK]["n_samples"] == 2
    assert "not a git repository" not in capfd.readouterr().err
    assert (evaluator.get_git_commit_hash, evaluator.add_env_info) == before

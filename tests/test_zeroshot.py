"""Offline zero-shot tasks: data building, the local lm-eval tasks they become, scoring through lm-eval.

Everything runs on tiny random Llamas with hand-built offline tokenizers; no packaged asset is read.
The accuracies lm-eval reports are checked against plain, unbatched forward passes done here.
"""

import math
import random
import tempfile

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from mixsparse.errors import ConfigError, DataError, MixsparseError, UnknownNameError
from mixsparse.placement import Placement
from mixsparse.zeroshot import (
    LM_EVAL_TASKS,
    SENTIMENT_PROMPT,
    ClozeExample,
    SentimentExample,
    cloze_passages,
    evaluate_zeroshot,
    load_polarity,
    sample_cloze,
    sample_sentiment,
    write_lmeval_tasks,
)
from tests.tiny import tiny_model


# ----------------------------------------------------------------------------------------- fixtures


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every UTF-8 byte is one token (ids 0..255), plus <eos>=256."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


# alphabetic 3-letter words, so that cloze_passages accepts each of them as a passage's last word
WORDS = [f"x{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(40)]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over WORDS and "." that puts a BOS token first by itself, as Llama-2's does."""
    vocab = {"<unk>": 0, "<s>": 1, ".": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def btok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def bmodel():
    return tiny_model("llama", seed=0, vocab_size=257)


@pytest.fixture(scope="module")
def bmodel_opinionated():
    """Larger random weights: which sentiment answer the model prefers depends on the sentence (at the
    default scale the answers' own tokens decide, whatever the prompt)."""
    return tiny_model("llama", seed=1, vocab_size=257, initializer_range=0.5)


@pytest.fixture(scope="module")
def wtok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def wmodel():
    return tiny_model("llama", seed=1, vocab_size=len(WORDS) + 3)


@pytest.fixture(autouse=True)
def _offline_datasets(monkeypatch):
    """datasets never asks the hub for anything here (the task data are local JSONL files)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


def token_ids(tok, text):
    """The ids as lm-eval's HFLM encodes text: with the tokenizer's own special tokens."""
    return tok(text)["input_ids"]


def last_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def reference_logprob(model, ctx_ids, cont_ids):
    """Unbatched, unpadded log p(cont | ctx) from one plain forward."""
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(float(logp[len(ctx_ids) - 1 + k, t]) for k, t in enumerate(cont_ids))


# ------------------------------------------------------------------------------------------- data


def test_load_polarity_reads_labels_bom_and_quotes(tmp_path):
    csv_path = tmp_path / "pol.csv"
    csv_path.write_bytes(
        '\ufeff"1","a "" quoted "" gem . \n"\n"-1","dull ,  flat\n"\n\n"1","fun"\n'.encode("utf-8")
    )
    rows = load_polarity(csv_path)
    assert rows == [
        SentimentExample('a " quoted " gem .', 1),
        SentimentExample("dull , flat", 0),
        SentimentExample("fun", 1),
    ]


def test_load_polarity_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_polarity(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text('"2","what"\n')
    with pytest.raises(DataError, match="row 1"):
        load_polarity(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        load_polarity(empty)


def _polarity(n_pos, n_neg):
    return [SentimentExample(f"pos {i}", 1) for i in range(n_pos)] + [SentimentExample(f"neg {i}", 0) for i in range(n_neg)]


def test_sample_sentiment_balanced_seeded_and_clamped():
    data = _polarity(30, 20)
    a = sample_sentiment(data, 11, seed=3)
    assert len(a) == 11 and sum(e.label for e in a) == 6  # 5 negative + 6 positive
    assert len(set(a)) == 11
    assert a == sample_sentiment(data, 11, seed=3)
    assert a != sample_sentiment(data, 11, seed=4)
    big = sample_sentiment(data, 100, seed=0)  # only 20 negatives: 20 + 20
    assert len(big) == 40 and sum(e.label for e in big) == 20
    with pytest.raises(DataError, match="both classes"):
        sample_sentiment(_polarity(5, 0), 2)
    with pytest.raises(ConfigError):
        sample_sentiment(data, 0)


def _para(words, last):
    """One sentence of ``words`` words ("The the the ... last.")."""
    return " ".join(["The"] + ["the"] * (words - 2) + [last]) + "."


def test_cloze_passages_lengths_targets_and_headings():
    text = "\n".join([
        "= = Heading with many words " + "x " * 70 + "= =",
        # 30 + 40 words: the chunk closes at 70 words on "river"
        _para(30, "alpha") + " " + _para(40, "river") + " " + _para(5, "end"),
        # 61 words but the last word is a number, then 2 letters: no passage
        _para(61, "1990") + " " + _para(59, "at"),
        "",
        # 130 words in one sentence: too long
        _para(130, "ocean"),
        # ends with a quote after the period; the target loses the punctuation
        _para(64, 'forest') + '"',
    ])
    passages = cloze_passages(text)
    assert [p.target for p in passages] == [" river", " forest"]
    first = passages[0]
    assert first.context.endswith("the the") and not first.context.endswith(" ")
    assert len((first.context + first.target).split()) == 70
    assert first.context.startswith("The") and "alpha. The" in first.context
    assert all(60 <= len((p.context + p.target).split()) <= 120 for p in passages)


def test_cloze_passages_do_not_end_on_abbreviations():
    text = " ".join(["The"] + ["the"] * 58 + ["Gen.", "Lee", "led", "armies."])
    # "Gen." must not close a 60-word sentence, so the passage runs on to "armies" (63 words)
    assert [p.target for p in cloze_passages(text)] == [" armies"]


def test_sample_cloze_seeded_in_order_and_errors():
    text = "\n".join(_para(60 + i, "target" + chr(97 + i)) for i in range(10))
    all_p = cloze_passages(text)
    assert len(all_p) == 10
    s = sample_cloze(text, 4, seed=1)
    assert s == sample_cloze(text, 4, seed=1)
    idx = [all_p.index(p) for p in s]
    assert idx == sorted(idx) and len(set(idx)) == 4
    assert sample_cloze(text, 50) == all_p  # clamped with a warning
    with pytest.raises(DataError, match="empty"):
        sample_cloze("  \n ", 3)
    with pytest.raises(DataError, match="no passage"):
        sample_cloze("Too short a text.", 3)


# --------------------------------------------------------------------------------------- lm-eval tasks


def test_written_tasks_are_what_lm_eval_reads(tmp_path):
    from lm_eval.tasks import TaskManager

    sentiment = [SentimentExample('a "{{quoted}}" gem, naïve , fun', 1), SentimentExample("dull", 0)]
    cloze = [ClozeExample("The old mill stands by the", " river"), ClozeExample("It ends near the", " harbour")]
    names = write_lmeval_tasks(tmp_path, {"sentiment": sentiment, "cloze": cloze})
    assert names == [LM_EVAL_TASKS["sentiment"], LM_EVAL_TASKS["cloze"]] == ["mixsparse_sentiment", "mixsparse_cloze"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mixsparse_cloze.jsonl", "mixsparse_cloze.yaml", "mixsparse_sentiment.jsonl", "mixsparse_sentiment.yaml"]
    config = yaml.safe_load((tmp_path / "mixsparse_sentiment.yaml").read_text())
    assert config["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "mixsparse_sentiment.jsonl").resolve())

    loaded = TaskManager(include_path=str(tmp_path), include_defaults=False).load(names)["tasks"]
    requests = {}
    for name in names:
        task = loaded[name]
        task.build_all_requests(limit=None, rank=0, world_size=1)
        requests[name] = [(i.doc_id, i.request_type, i.args) for i in task.instances]
    # the prompt is the sentence verbatim (no Jinja evaluation of its braces) and the continuations are
    # exactly " negative" / " positive": one space, from the choices themselves
    assert sorted(requests["mixsparse_sentiment"]) == [
        (0, "loglikelihood", ('Review: a "{{quoted}}" gem, naïve , fun\nSentiment:', " negative")),
        (0, "loglikelihood", ('Review: a "{{quoted}}" gem, naïve , fun\nSentiment:', " positive")),
        (1, "loglikelihood", ("Review: dull\nSentiment:", " negative")),
        (1, "loglikelihood", ("Review: dull\nSentiment:", " positive")),
    ]
    assert SENTIMENT_PROMPT.format(sentence="dull") == "Review: dull\nSentiment:"
    assert [loaded["mixsparse_sentiment"].doc_to_target(d) for d in loaded["mixsparse_sentiment"].test_docs()] == [1, 0]
    assert sorted(requests["mixsparse_cloze"]) == [
        (0, "loglikelihood", ("The old mill stands by the", " river")),
        (1, "loglikelihood", ("It ends near the", " harbour")),
    ]


def test_write_lmeval_tasks_errors(tmp_path):
    with pytest.raises(UnknownNameError, match="'piqa'"):
        write_lmeval_tasks(tmp_path, {"piqa": [SentimentExample("x", 1)]})
    with pytest.raises(DataError, match="no cloze examples"):
        write_lmeval_tasks(tmp_path, {"cloze": []})


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture()
def polarity_csv(tmp_path):
    p = tmp_path / "pol.csv"
    rows = [f'"1","a truly wonderful film number {i} ."' for i in range(6)]
    rows += [f'"-1","a dreadful boring mess number {i} ."' for i in range(6)]
    p.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return p


CLOZE_TEXT = "\n".join(
    " ".join(["The river runs past the old mill and on to the sea."] * 6) + f" It ends near the {w}."
    for w in ["harbour", "village", "castle", "meadow", "bridge"]
)


def test_evaluate_zeroshot_end_to_end(bmodel, btok, polarity_csv, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the task folder goes, to see it removed
    bmodel.train()
    res = evaluate_zeroshot(bmodel, btok, n={"sentiment": 8, "cloze": 3}, batch_size=4, device="cpu", progress=False,
                            polarity_path=polarity_csv, cloze_text=CLOZE_TEXT)
    assert bmodel.training  # the train/eval mode comes back
    bmodel.eval()
    assert list(scratch.iterdir()) == []
    assert set(res) == {"sentiment", "cloze"}
    assert res["sentiment"]["n"] == 8 and res["cloze"]["n"] == 3
    for r in res.values():
        p = r["accuracy"]
        # lm-eval's stderr of a mean: the sample one, n - 1 in the denominator
        assert 0 <= p <= 1 and r["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (r["n"] - 1)))
    # the batch size changes no score
    again = evaluate_zeroshot(bmodel, btok, tasks=("cloze",), n=3, batch_size=1, progress=False, cloze_text=CLOZE_TEXT)
    assert again == {"cloze": res["cloze"]}


def test_sentiment_accuracy_equals_a_plain_forward(bmodel_opinionated, btok, tmp_path):
    """Which of " positive" / " negative" the model prefers after the prompt, from unbatched forwards here;
    the labels are chosen so that this reference gives 6 of 8, with both answers among the right ones."""

    model = bmodel_opinionated

    def margin(sentence):  # log p(" positive") - log p(" negative") after the prompt
        ctx = token_ids(btok, SENTIMENT_PROMPT.format(sentence=sentence))
        return (reference_logprob(model, ctx, token_ids(btok, " positive"))
                - reference_logprob(model, ctx, token_ids(btok, " negative")))

    says_pos, says_neg = [], []
    for i in range(20):
        rng = random.Random(i)
        letters = "".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(3, 30)))
        sentence = " ".join(letters.split()) or "x"  # as load_polarity normalizes it
        m = margin(sentence)
        if abs(m) > 1e-3:  # no near-ties: lm-eval's padded batches may differ from a plain forward in the last bits
            (says_pos if m > 0 else says_neg).append(sentence)
    assert len(says_pos) >= 4 and len(says_neg) >= 4, "the tiny model should prefer each answer for some sentences"
    positive = says_pos[:3] + says_neg[:1]
    negative = says_neg[1:4] + says_pos[3:4]
    csv_path = tmp_path / "pol.csv"
    csv_path.write_text("".join(f'"1","{s}"\n' for s in positive) + "".join(f'"-1","{s}"\n' for s in negative))
    expected = sum((margin(e.sentence) > 0) == (e.label == 1) for e in load_polarity(csv_path))
    assert expected == 6

    res = evaluate_zeroshot(model, btok, tasks=("sentiment",), n=8, batch_size=3, progress=False,
                            polarity_path=csv_path)
    assert res["sentiment"]["n"] == 8
    assert res["sentiment"]["accuracy"] == pytest.approx(expected / 8)


def test_cloze_accuracy_equals_a_plain_greedy_check(wmodel, wtok):
    """LAMBADA-style acc: the last word is right only if it is the model's argmax after the passage, here
    with a tokenizer that adds its BOS (so lm-eval's context starts with it, as the reference's does)."""
    rng = random.Random(0)
    lines = []
    for i in range(6):
        words = [rng.choice(WORDS) for _ in range(69)]
        logits = last_logits(wmodel, token_ids(wtok, " ".join(words)))
        best = WORDS[int(logits[3:].argmax())]  # the likeliest word (the argmax may still be "." or <unk>)
        target = best if i % 2 == 0 else next(w for w in WORDS if w != best)
        lines.append(" ".join(words + [target]) + ".")
    text = "\n".join(lines)
    passages = sample_cloze(text, 6)
    assert len(passages) == 6 and [p.target for p in passages] == [" " + line.split()[-1][:-1] for line in lines]

    def greedy(example):
        logits = last_logits(wmodel, token_ids(wtok, example.context))
        top2 = logits.topk(2).values
        assert float(top2[0] - top2[1]) > 1e-4  # no near-tie
        return int(logits.argmax()) == wtok.convert_tokens_to_ids(example.target.strip())

    expected = [greedy(p) for p in passages]
    assert 0 < sum(expected) < 6

    res = evaluate_zeroshot(wmodel, wtok, tasks=("cloze",), n=6, batch_size=4, progress=False, cloze_text=text)
    assert res == {"cloze": {"accuracy": pytest.approx(sum(expected) / 6), "stderr": pytest.approx(
        math.sqrt(sum(expected) / 6 * (1 - sum(expected) / 6) / 5)), "n": 6}}


def test_model_on_device_restores_mode():
    from mixsparse.lmeval import model_on_device

    model = tiny_model("llama")
    model.train()
    with model_on_device(model, "cpu") as dev:
        assert dev == torch.device("cpu") and not model.training
    assert model.training


def test_blockwise_placement_scores_block_by_block_with_the_same_result(bmodel, btok):
    whole = evaluate_zeroshot(bmodel, btok, tasks=("cloze",), n=3, progress=False, cloze_text=CLOZE_TEXT)
    res = evaluate_zeroshot(bmodel, btok, tasks=("cloze",), n=3, progress=False, cloze_text=CLOZE_TEXT,
                            device=Placement(torch.device("cpu"), "blockwise"))
    assert res == {"cloze": {k: pytest.approx(v) for k, v in whole["cloze"].items()}}
    one = evaluate_zeroshot(bmodel, btok, tasks=("cloze",), n=1, progress=False, cloze_text=CLOZE_TEXT)
    assert one["cloze"]["n"] == 1 and math.isnan(one["cloze"]["stderr"])  # lm-eval has no sample stderr for n=1


def test_evaluate_zeroshot_bad_input(bmodel, btok):
    with pytest.raises(UnknownNameError, match="'piqa'"):
        evaluate_zeroshot(bmodel, btok, tasks=("piqa",))
    with pytest.raises(UnknownNameError, match="'boolq'"):
        evaluate_zeroshot(bmodel, btok, n={"boolq": 3})
    with pytest.raises(ConfigError, match="got 0"):
        evaluate_zeroshot(bmodel, btok, tasks=("cloze",), n=0)
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate_zeroshot(bmodel, btok, tasks=("cloze",), batch_size=0, cloze_text=CLOZE_TEXT)
    with pytest.raises(DataError, match="empty"):
        evaluate_zeroshot(bmodel, btok, tasks=("cloze",), n=2, cloze_text="", progress=False)
    with pytest.raises(ConfigError, match="no zero-shot task"):
        evaluate_zeroshot(bmodel, btok, tasks=())
    assert issubclass(UnknownNameError, MixsparseError) and issubclass(DataError, MixsparseError)

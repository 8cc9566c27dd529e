"""Haystack text: the bundled prose, user corpora and their errors, needle insertion."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from leank.data import build_prose
from leank.data.text import (
    DEPTHS,
    NOISE,
    Prose,
    build_haystack,
    bundled_prose,
    bundled_words,
    load_corpus,
    split_sentences,
    vocabulary,
)
from leank.errors import LeanKError


def test_bundled_prose_is_plain_sentences():
    text = bundled_prose()
    assert text == (Path(build_prose.__file__).with_name("prose.txt")).read_text(encoding="utf-8")
    assert 300_000 <= len(text.encode()) <= 600_000
    paragraphs = text.splitlines()
    assert len(paragraphs) == len(set(paragraphs)) > 1000
    for marker in (">>>", "def ", "{", "==", "|", "->", "()", "__"):
        assert marker not in text, marker
    assert all(p[0].isupper() and p[-1] in ".!?" for p in paragraphs)


def test_prose_filter_keeps_sentences_and_drops_code():
    doc = """Return the sum of two numbers. It never fails on ordinary input values.

    >>> add(1, 2)
    3

Args:
    a: the first number.

====  =====
name  value
====  =====

Call add(x, y) to combine them. Both values are converted to floats before adding them up."""
    kept = [build_prose._clean_paragraph(block) for block in doc.split("\n\n")]
    assert kept[0] == "Return the sum of two numbers. It never fails on ordinary input values."
    assert kept[1:4] == [None, None, None]
    assert kept[4] == "Both values are converted to floats before adding them up."


def test_build_prose_writes_deterministic_file(tmp_path, monkeypatch):
    monkeypatch.setattr(build_prose, "MODULES", ("textwrap", "shlex"))
    outputs = []
    for name in ("a.txt", "b.txt"):
        build_prose.main(["--out", str(tmp_path / name)])
        outputs.append((tmp_path / name).read_text(encoding="utf-8"))
    assert outputs[0] == outputs[1] and outputs[0].count("\n") > 10


def test_load_corpus_file_and_directory(tmp_path):
    (tmp_path / "b.md").write_text("Second file here.", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("Third file here.", encoding="utf-8")
    (tmp_path / "a.txt").write_text("First file here.\n", encoding="utf-8")
    (tmp_path / "skip.json").write_text('{"not": "prose"}', encoding="utf-8")
    assert load_corpus(tmp_path) == "First file here.\n\nSecond file here.\n\nThird file here."
    assert load_corpus(tmp_path / "b.md") == "Second file here."


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "does not exist"),
        ("", None, "has no .txt or .md files"),
        ("blank.txt", b"  \n", "is empty"),
        ("latin1.txt", b"caf\xe9 au lait", "cannot read corpus file"),
    ],
)
def test_load_corpus_errors(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(LeanKError, match=message) as err:
        load_corpus(tmp_path / name)
    assert "\n" not in str(err.value)


def test_split_sentences():
    assert split_sentences("One two. Three four!  Five six? Seven") == ["One two.", "Three four!", "Five six?", "Seven"]


def test_passage_starts_at_a_sentence_and_wraps():
    prose = Prose.from_text("Alpha beta gamma. Delta epsilon.\nZeta eta theta.")
    assert prose.sentence_starts == (0, 3, 5)
    rng = random.Random(0)
    for _ in range(20):
        passage = prose.passage(rng, 12).split()
        assert len(passage) == 12 and passage[0] in ("Alpha", "Delta", "Zeta")
        assert " ".join(passage) in " ".join(prose.words * 3)


@pytest.mark.parametrize("haystack", ["filler", "prose", "distractor"])
def test_needles_hidden_in_order(haystack):
    rng = random.Random(1)
    needles = [f"Needle number {i} is here." for i in range(5)]
    text = build_haystack(haystack, 200, needles, rng, exclude_keys=["held-out"])
    positions = [text.index(n) for n in needles]
    assert positions == sorted(positions)
    if haystack == "filler":
        assert text.count(NOISE) == 200 and len(text.splitlines()) == 205
    if haystack == "distractor":
        assert len(text.splitlines()) == 205 and "held-out" not in text
    assert build_haystack(haystack, 0, needles, rng).count("Needle number") == 5


def test_prose_depths_cover_the_text():
    assert DEPTHS[0] == 0 and DEPTHS[-1] == 100 and len(set(DEPTHS)) == 40
    firsts, lasts = 0, 0
    for seed in range(200):
        text = build_haystack("prose", 300, ["NEEDLE."], random.Random(seed))
        firsts += text.startswith("NEEDLE.")
        lasts += text.endswith("NEEDLE.")
    assert firsts > 0 and lasts > 0  # depth 0 and depth 100 both occur


def test_vocabulary_grows_past_the_prose_words():
    words = vocabulary(len(bundled_words()) + 500)
    assert len(words) == len(set(words)) >= len(bundled_words()) + 500
    assert words[: len(bundled_words())] == bundled_words()
    assert all(w.isalpha() and w.islower() for w in words)

"""Haystack text for long-context samples, all generated offline.

Three haystacks, named as LeanK uses them everywhere (RULER's names in brackets):

- ``filler`` [repeat]: RULER's noise sentence repeated, one copy per line;
- ``prose`` [essay]: English prose, by default the bundled ``prose.txt`` (stdlib
  documentation, see ``build_prose.py``), or a user corpus from :func:`load_corpus`;
- ``distractor`` [needle]: needle-like lines for other keys, one per line.

:func:`build_haystack` hides needle sentences in any of them the way RULER does. The random
keys, values and words the tasks need come from here too; every function that draws takes
a ``random.Random`` so samples are reproducible.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from ..errors import LeanKError

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
HAYSTACKS = ("filler", "prose", "distractor")
VALUE_KINDS = ("numbers", "words", "uuids")
CORPUS_SUFFIXES = (".txt", ".md")

# RULER's needle depths in prose, in percent: np.round(np.linspace(0, 100, 40)).
DEPTHS = tuple(round(100 * i / 39) for i in range(40))

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"\b[a-z]{4,12}\b")


def bundled_prose() -> str:
    """The text of the bundled ``prose.txt``: one paragraph per line."""
    return files("leank.data").joinpath("prose.txt").read_text(encoding="utf-8")


def load_corpus(path: str | Path) -> str:
    """Text of a user corpus: one text file, or every .txt/.md file under a directory.

    Files are read as UTF-8 in sorted path order and joined by blank lines.
    """
    path = Path(path)
    if path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES)
        if not paths:
            raise LeanKError(f"corpus directory {path} has no .txt or .md files: add some or pass a file")
    elif path.is_file():
        paths = [path]
    else:
        raise LeanKError(f"corpus {path} does not exist: pass a text file or a directory of .txt/.md files")
    texts = []
    for file in paths:
        try:
            texts.append(file.read_text(encoding="utf-8").strip())
        except (OSError, UnicodeDecodeError) as err:
            raise LeanKError(f"cannot read corpus file {file} ({err}): fix it or save it as UTF-8 text") from err
    text = "\n\n".join(t for t in texts if t)
    if len(text.split()) < 2:
        raise LeanKError(f"corpus {path} is empty: it needs at least a few sentences of text")
    return text


def split_sentences(text: str) -> list[str]:
    """Split at whitespace after ``.``, ``!`` or ``?`` (a stand-in for NLTK's ``sent_tokenize``)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


@dataclass(frozen=True)
class Prose:
    """A prose corpus as words, with the indices of the words that start a sentence."""

    words: tuple[str, ...]
    sentence_starts: tuple[int, ...]

    @classmethod
    def from_text(cls, text: str) -> Prose:
        words: list[str] = []
        starts: list[int] = []
        for paragraph in text.split("\n"):
            for sentence in split_sentences(paragraph):
                starts.append(len(words))
                words.extend(sentence.split())
        if not words:
            raise LeanKError("the prose corpus is empty: it needs at least a few sentences of text")
        return cls(tuple(words), tuple(starts))

    def passage(self, rng: random.Random, num_words: int) -> str:
        """``num_words`` consecutive words from a random sentence start, wrapping around the end."""
        start = rng.choice(self.sentence_starts)
        n = len(self.words)
        return " ".join(self.words[(start + i) % n] for i in range(num_words))


@lru_cache(maxsize=1)
def bundled_prose_corpus() -> Prose:
    return Prose.from_text(bundled_prose())


@lru_cache(maxsize=1)
def bundled_words() -> tuple[str, ...]:
    """Distinct lowercase words (4-12 letters) of the bundled prose, sorted."""
    return tuple(sorted(set(_WORD.findall(bundled_prose()))))


@lru_cache(maxsize=8)
def vocabulary(size: int) -> tuple[str, ...]:
    """At least ``size`` distinct words: the bundled prose words, then made-up pronounceable
    words (fixed sequence) when more are needed than the prose has."""
    words = list(bundled_words())
    seen = set(words)
    rng = random.Random("leank-pseudo-words")
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    while len(words) < size:
        syllables = rng.randint(2, 4)
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return tuple(words)


def random_number(rng: random.Random, *, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_word_key(rng: random.Random) -> str:
    """Two distinct prose words joined by a hyphen, like RULER's ``adjective-noun`` keys."""
    first, second = rng.sample(bundled_words(), 2)
    return f"{first}-{second}"


def random_value(rng: random.Random, kind: str) -> str:
    """A needle key or value of RULER's ``kind``: ``numbers``, ``words`` or ``uuids``."""
    if kind == "numbers":
        return random_number(rng)
    if kind == "words":
        return random_word_key(rng)
    if kind == "uuids":
        return random_uuid(rng)
    raise LeanKError(f"unknown needle kind {kind!r}: use one of {', '.join(VALUE_KINDS)}")


def distinct_values(rng: random.Random, kind: str, count: int, *, exclude: Sequence[str] = ()) -> list[str]:
    """``count`` distinct values of ``kind``, none of them in ``exclude``."""
    taken = set(exclude)
    values: list[str] = []
    while len(values) < count:
        value = random_value(rng, kind)
        if value not in taken:
            taken.add(value)
            values.append(value)
    return values


def needle(key: str, value: str, *, kind: str = "numbers") -> str:
    """RULER's needle sentence; ``kind`` is the plural noun of the value (``numbers``, ``uuids``)."""
    return NEEDLE.format(kind=kind, key=key, value=value)


def distractor_lines(
    rng: random.Random,
    count: int,
    *,
    key_kind: str = "words",
    value_kind: str = "numbers",
    exclude_keys: Sequence[str] = (),
) -> list[str]:
    """``count`` needle-like lines whose keys are none of ``exclude_keys`` (the real keys)."""
    keys = distinct_values(rng, key_kind, count, exclude=exclude_keys)
    return [needle(key, random_value(rng, value_kind), kind=value_kind) for key in keys]


def insert_at_random(rng: random.Random, units: Sequence[str], items: Sequence[str]) -> list[str]:
    """``units`` with ``items`` inserted at random distinct slots, keeping the items' order."""
    total = len(units) + len(items)
    slots = set(rng.sample(range(total), len(items)))
    unit_iter, item_iter = iter(units), iter(items)
    return [next(item_iter) if i in slots else next(unit_iter) for i in range(total)]


def build_haystack(
    haystack: str,
    size: int,
    needles: Sequence[str],
    rng: random.Random,
    *,
    prose: Prose | None = None,
    key_kind: str = "words",
    value_kind: str = "numbers",
    exclude_keys: Sequence[str] = (),
) -> str:
    """A haystack of ``size`` units with ``needles`` hidden in it, in the given order.

    Units are noise lines (``filler``), words (``prose``; needles go between sentences at
    RULER's depths) or distractor lines (``distractor``, drawn with ``key_kind`` /
    ``value_kind`` and never using ``exclude_keys``).
    """
    if haystack == "filler":
        return "\n".join(insert_at_random(rng, [NOISE] * size, needles))
    if haystack == "distractor":
        lines = distractor_lines(rng, size, key_kind=key_kind, value_kind=value_kind, exclude_keys=exclude_keys)
        return "\n".join(insert_at_random(rng, lines, needles))
    if haystack == "prose":
        if len(needles) > len(DEPTHS):
            raise LeanKError(f"at most {len(DEPTHS)} needles fit in a prose haystack, got {len(needles)}")
        sentences = split_sentences((prose or bundled_prose_corpus()).passage(rng, size))
        cuts = sorted(int(len(sentences) * depth / 100) for depth in rng.sample(DEPTHS, len(needles)))
        parts: list[str] = []
        begin = 0
        for needle_text, end in zip(needles, cuts, strict=True):
            parts.extend(sentences[begin:end])
            parts.append(needle_text)
            begin = end
        parts.extend(sentences[begin:])
        return " ".join(parts)
    raise LeanKError(f"unknown haystack {haystack!r}: use one of {', '.join(HAYSTACKS)}")

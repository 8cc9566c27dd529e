"""Training samples for mask distillation: a long haystack with hidden facts, a question,
and the answer the model should give.

Each sample is one token sequence ``[context | question | answer]``: the context (chat
template prefix, instruction, haystack with needles) is the prefill region, the question
closes the user turn and opens the assistant turn with an answer prefix, and the answer
tokens are the supervised ones. Kinds: ``passkey`` (one pass key), ``multikey`` (the value
of one key among several) and ``multivalue`` (every value of one key); haystacks as in
:mod:`leank.data.text`, with a user corpus in place of the bundled prose if given.

    cfg = TrainDataConfig(min_length=2048, max_length=8192, seed=0)
    sampler = TrainSampler(tokenizer, cfg)
    sample = sampler.sample_at(step)          # the same sample for the same (seed, step)
    for sample in sample_stream(tokenizer, cfg, start=step): ...
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LeanKError
from .tasks import encode_prompt, fit_to_length, render_prompt
from .text import HAYSTACKS, Prose, build_haystack, bundled_prose_corpus, distinct_values, load_corpus, needle

KINDS = ("passkey", "multikey", "multivalue")
_MAX_KEYS = 6  # multikey: 2 to 6 keys
_MAX_VALUES = 4  # multivalue: 2 to 4 values


@dataclass(frozen=True)
class TrainDataConfig:
    """What to train on: context lengths drawn uniformly from ``[min_length, max_length]``
    tokens, sample kinds and haystacks drawn uniformly from ``kinds`` / ``haystacks``.
    ``corpus``: a text file or a directory of .txt/.md files replacing the bundled prose."""

    min_length: int = 2048
    max_length: int = 8192
    kinds: tuple[str, ...] = KINDS
    haystacks: tuple[str, ...] = HAYSTACKS
    corpus: str | Path | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_length <= 0 or self.max_length <= 0:
            raise LeanKError(
                f"training lengths must be positive, got min_length={self.min_length}, max_length={self.max_length}"
            )
        if self.min_length > self.max_length:
            raise LeanKError(
                f"min_length {self.min_length} is larger than max_length {self.max_length}: swap or fix them"
            )
        for field, choices in (("kinds", KINDS), ("haystacks", HAYSTACKS)):
            value = getattr(self, field)
            value = (value,) if isinstance(value, str) else tuple(value)
            if not value:
                raise LeanKError(f"{field} is empty: choose at least one of {', '.join(choices)}")
            unknown = [v for v in value if v not in choices]
            if unknown:
                raise LeanKError(f"unknown {field} {', '.join(unknown)}: choose from {', '.join(choices)}")
            object.__setattr__(self, field, value)


@dataclass(frozen=True)
class TrainSample:
    """``input_ids`` [T]; tokens ``[:context_end]`` are the long context (prefill);
    ``answer_mask`` [T] marks the supervised answer tokens (after the answer prefix)."""

    input_ids: torch.LongTensor
    context_end: int
    answer_mask: torch.BoolTensor


@dataclass(frozen=True)
class _Episode:
    instruction: str
    needles: list[str]
    keys: list[str]
    question: str
    answer_prefix: str
    answer: str


def _episode(kind: str, rng: random.Random) -> _Episode:
    if kind == "passkey":
        (value,) = distinct_values(rng, "numbers", 1)
        return _Episode(
            "There is an important piece of information hidden inside a lot of irrelevant text. "
            "Find it and memorize it. I will quiz you about it afterwards.\n",
            [f"The pass key is {value}. Remember it. {value} is the pass key."],
            [],
            "\nWhat is the pass key?",
            " The pass key is",
            f" {value}.",
        )
    if kind == "multikey":
        keys = distinct_values(rng, "words", rng.randint(2, _MAX_KEYS))
        values = distinct_values(rng, "numbers", len(keys))
        needles = [needle(k, v) for k, v in zip(keys, values, strict=True)]
        rng.shuffle(needles)
        asked = rng.randrange(len(keys))
        return _Episode(
            "The following text hides special magic numbers for several keys. "
            "Memorize them; I will ask about one of them afterwards.\n",
            needles,
            keys,
            f"\nWhat is the special magic number for {keys[asked]}?",
            f" The special magic number for {keys[asked]} is",
            f" {values[asked]}.",
        )
    if kind == "multivalue":
        (key,) = distinct_values(rng, "words", 1)
        values = distinct_values(rng, "numbers", rng.randint(2, _MAX_VALUES))
        # Listed in the order they appear in the text, as a reader would.
        return _Episode(
            "The following text hides several special magic numbers for one key. "
            "Memorize all of them; I will ask about them afterwards.\n",
            [needle(key, v) for v in values],
            [key],
            f"\nWhat are all the special magic numbers for {key}?",
            f" The special magic numbers for {key} are",
            " " + ", ".join(values) + ".",
        )
    raise LeanKError(f"unknown training kind {kind!r}: choose from {', '.join(KINDS)}")


class TrainSampler:
    """Deterministic training samples: ``sample_at(step)`` depends only on the tokenizer,
    the config and ``step``, so a run resumes by asking for the next step."""

    def __init__(self, tokenizer, cfg: TrainDataConfig) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.prose: Prose = (
            Prose.from_text(load_corpus(cfg.corpus)) if cfg.corpus is not None else bundled_prose_corpus()
        )

    def sample_at(self, step: int) -> TrainSample:
        rng = random.Random(f"leank-train/{self.cfg.seed}/{step}")
        length = rng.randint(self.cfg.min_length, self.cfg.max_length)
        kind = rng.choice(self.cfg.kinds)
        haystack = rng.choice(self.cfg.haystacks)
        episode_seed = rng.getrandbits(64)

        def build(size: int) -> tuple[str, str, str]:
            # Same facts for every size tried: the episode generator restarts from its seed.
            episode_rng = random.Random(episode_seed)
            episode = _episode(kind, episode_rng)
            hay = build_haystack(
                haystack, size, episode.needles, episode_rng, prose=self.prose, exclude_keys=episode.keys
            )
            context = episode.instruction + hay
            user = context + episode.question
            prompt = render_prompt(self.tokenizer, user, episode.answer_prefix)
            at = prompt.find(user)
            if at < 0:
                raise LeanKError(
                    "this tokenizer's chat template rewrites the user message, so the context cannot be "
                    "located in the prompt: use a tokenizer whose template keeps the message verbatim"
                )
            split = at + len(context)
            return prompt[:split], prompt[split:], episode.answer

        _, (context_text, question_text, answer_text) = fit_to_length(
            build, lambda parts: len(encode_prompt(self.tokenizer, parts[0])), length
        )
        context_ids = encode_prompt(self.tokenizer, context_text)
        rest_ids = self.tokenizer(question_text, add_special_tokens=False)["input_ids"]
        answer_ids = self.tokenizer(answer_text, add_special_tokens=False)["input_ids"]
        input_ids = torch.tensor(context_ids + rest_ids + answer_ids, dtype=torch.long)
        answer_mask = torch.zeros(len(input_ids), dtype=torch.bool)
        answer_mask[len(input_ids) - len(answer_ids) :] = True
        return TrainSample(input_ids, len(context_ids), answer_mask)


def sample_stream(tokenizer, cfg: TrainDataConfig, *, start: int = 0) -> Iterator[TrainSample]:
    """Training samples for steps ``start, start + 1, ...`` (endless)."""
    sampler = TrainSampler(tokenizer, cfg)
    step = start
    while True:
        yield sampler.sample_at(step)
        step += 1

"""RULER's synthetic tasks, generated offline for any Hugging Face tokenizer and length.

Task definitions and prompt templates follow NVIDIA/RULER (``synthetic.yaml`` and
``data/synthetic/*.py``): eight needle-in-a-haystack variants, variable tracking (``vt``),
common words extraction (``cwe``) and frequent words extraction (``fwe``). Differences:
the essay haystack is the bundled prose (or a user corpus) starting at a random sentence;
keys and ``cwe`` words come from that prose (see :mod:`leank.data.text`); each sample's
haystack is sized on its own so that its prompt, as the model sees it, has between
``length - length_tolerance(length)`` and ``length`` tokens (RULER sizes once per task and
also reserves room for the answer).

    from leank.data.tasks import generate_task
    samples = generate_task("niah_single_1", tokenizer, 4096, 50, 0)
    ids = encode_prompt(tokenizer, samples[0].prompt)
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from ..errors import LeanKError
from .text import (
    NOISE,
    Prose,
    build_haystack,
    bundled_prose_corpus,
    distinct_values,
    insert_at_random,
    needle,
    vocabulary,
)

Metric = Literal["all", "any"]
T = TypeVar("T")


@dataclass(frozen=True)
class Sample:
    """One prompt and its references.

    The user message is ``context + query``: ``context`` runs from the instruction to the
    end of the long haystack, ``query`` is the question after it. ``prompt`` is the full
    text given to the model: the user message in the tokenizer's chat template (when it has
    one) with the generation prompt, then ``answer_prefix``. ``metric`` says how
    ``outputs`` are scored: ``all`` (RULER's ``string_match_all``) or ``any``
    (``string_match_part``). ``length`` is the token length the sample was built for.
    """

    task: str
    index: int
    length: int
    context: str
    query: str
    answer_prefix: str
    outputs: list[str]
    metric: Metric
    prompt: str


@dataclass(frozen=True)
class TaskSpec:
    """A RULER task: its family, haystack and needle configuration, metric and answer budget."""

    name: str
    family: Literal["niah", "vt", "cwe", "fwe"]
    tokens_to_generate: int
    metric: Metric = "all"
    haystack: str | None = None
    key_kind: str = "words"
    value_kind: str = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1


def _niah(name: str, haystack: str, **needles) -> TaskSpec:
    return TaskSpec(name, "niah", 128, haystack=haystack, **needles)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _niah("niah_single_1", "filler"),
        _niah("niah_single_2", "prose"),
        _niah("niah_single_3", "prose", value_kind="uuids"),
        _niah("niah_multikey_1", "prose", num_keys=4),
        _niah("niah_multikey_2", "distractor"),
        _niah("niah_multikey_3", "distractor", key_kind="uuids", value_kind="uuids"),
        _niah("niah_multivalue", "prose", num_values=4),
        _niah("niah_multiquery", "prose", num_keys=4, num_queries=4),
        TaskSpec("vt", "vt", 30),
        TaskSpec("cwe", "cwe", 120),
        TaskSpec("fwe", "fwe", 50),
    )
}


def list_tasks() -> list[str]:
    return list(TASKS)


def length_tolerance(length: int) -> int:
    """How far below ``length`` a generated prompt may end: 2% or 32 tokens, the larger."""
    return max(32, length // 50)


def render_prompt(tokenizer, user_message: str, answer_prefix: str) -> str:
    """The chat template (if any) around ``user_message``, its generation prompt, the prefix."""
    if tokenizer.chat_template is None:
        return user_message + answer_prefix
    chat = [{"role": "user", "content": user_message}]
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + answer_prefix


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a rendered prompt: a chat template writes its own special tokens, so the
    tokenizer adds them (e.g. BOS) only when there is no template."""
    return tokenizer(prompt, add_special_tokens=tokenizer.chat_template is None)["input_ids"]


def fit_to_length(
    build: Callable[[int], T],
    num_tokens: Callable[[T], int],
    length: int,
    *,
    minimum: int = 0,
    guess: int | None = None,
) -> tuple[int, T]:
    """The haystack size (and its ``build``) whose token count lies within
    ``length_tolerance(length)`` below ``length``; if one haystack unit is longer than the
    tolerance (a line of two UUIDs, at short lengths), the largest size that fits.

    ``num_tokens(build(size))`` must grow with ``size``. Interpolation search: the token
    count is nearly linear in the size, so a good ``guess`` (the last sample's size) usually
    lands within tolerance on the first try.
    """
    low_edge = length - length_tolerance(length)
    lo, lo_item = minimum, build(minimum)
    lo_tokens = num_tokens(lo_item)
    if lo_tokens > length:
        raise LeanKError(
            f"a {length}-token prompt is too short for this task: with the smallest haystack the "
            f"prompt has {lo_tokens} tokens; ask for a length of at least {lo_tokens}"
        )
    base_size, base_tokens = lo, lo_tokens
    hi: int | None = None
    hi_tokens = length + 1
    size = max(guess or minimum + 16, minimum + 1)
    while lo_tokens < low_edge and (hi is None or hi - lo > 1):
        item = build(size)
        tokens = num_tokens(item)
        if tokens <= length:
            lo, lo_item, lo_tokens = size, item, tokens
        else:
            hi, hi_tokens = size, tokens
        # Next size: aim at the middle of the tolerance window along the line through the
        # bracket (or through the smallest size while there is no upper end yet).
        ref_size, ref_tokens = (hi, hi_tokens) if hi is not None else (base_size, base_tokens)
        per_unit = max((ref_tokens - lo_tokens) / (ref_size - lo), 1e-3)
        size = lo + math.ceil(((low_edge + length) / 2 - lo_tokens) / per_unit)
        if hi is None:
            size = min(max(size, lo + 1), 4 * lo + 64)
        else:  # keep strictly inside the bracket and shrink it by at least an eighth
            margin = (hi - lo) // 8
            size = min(max(size, lo + max(margin, 1)), hi - max(margin, 1))
    return lo, lo_item


# --- task families: each builds (context, query, answer_prefix, outputs) from (rng, size) ---

Parts = tuple[str, str, str, list[str]]


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _niah_parts(spec: TaskSpec, rng: random.Random, size: int, *, prose: Prose, length: int) -> Parts:
    keys = distinct_values(rng, spec.key_kind, spec.num_keys)
    values = [distinct_values(rng, spec.value_kind, spec.num_values) for _ in keys]
    needles = [needle(k, v, kind=spec.value_kind) for k, vs in zip(keys, values, strict=True) for v in vs]
    rng.shuffle(needles)
    haystack = build_haystack(
        spec.haystack,
        size,
        needles,
        rng,
        prose=prose,
        key_kind=spec.key_kind,
        value_kind=spec.value_kind,
        exclude_keys=keys,
    )
    asked = rng.sample(range(len(keys)), spec.num_queries)
    query_keys = _join_keys([keys[i] for i in asked])
    outputs = [v for i in asked for v in values[i]]
    # RULER words the prompt in the singular when a single value is asked for.
    if len(outputs) == 1:
        kind = spec.value_kind[:-1]
        intro, ask, verb = f"A special magic {kind} is", "What is the", "is"
    else:
        kind = spec.value_kind
        intro, ask, verb = f"Some special magic {kind} are", "What are all the", "are"
    context = (
        f"{intro} hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {kind} afterwards.\n{haystack}"
    )
    query = f"\n{ask} special magic {kind} for {query_keys} mentioned in the provided text?"
    answer_prefix = f" The special magic {kind} for {query_keys} mentioned in the provided text {verb}"
    return context, query, answer_prefix, outputs


# Variable tracking: one chain of 4 hops, and RULER's one-shot example (3-letter names)
# ahead of the task; RULER sizes that example to 500 tokens, about 16 noise lines.
_VT_HOPS = 4
_VT_EXAMPLE_NOISE = 16


def _vt_chain(rng: random.Random, *, name_length: int) -> tuple[list[str], list[str]]:
    names: list[str] = []
    while len(names) < _VT_HOPS + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=name_length))
        if name not in names:
            names.append(name)
    value = str(rng.randrange(10000, 99999))
    statements = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(_VT_HOPS)]
    return names, statements


def _vt_task(rng: random.Random, size: int, *, name_length: int) -> Parts:
    names, statements = _vt_chain(rng, name_length=name_length)
    lines = insert_at_random(rng, [NOISE + "\n"] * size, statements)
    value = statements[0].split("=")[-1].strip()
    text = " ".join(lines).replace(". \n", ".\n")
    context = f"Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{text}"
    query = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    # "assgined" is RULER's spelling; kept so prompts match the published benchmark.
    answer_prefix = (
        " Answer: According to the chain(s) of variable assignment in the text above, "
        f"{len(names)} variables are assgined the value {value}, they are: "
    )
    return context, query, answer_prefix, names


def _vt_parts(spec: TaskSpec, rng: random.Random, size: int, *, prose: Prose, length: int) -> Parts:
    shot_context, shot_query, shot_prefix, shot_answer = _vt_task(rng, _VT_EXAMPLE_NOISE, name_length=3)
    context, query, answer_prefix, outputs = _vt_task(rng, size, name_length=5)
    shot = shot_context + shot_query + shot_prefix + " ".join(shot_answer)
    return f"{shot}\n\n{context}", query, answer_prefix, outputs


_CWE_COMMON = 10
_CWE_INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
_CWE_QUESTION = "\nQuestion: What are the 10 most common words in the above list?"
_CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _cwe_list(rng: random.Random, num_words: int, common_repeats: int, uncommon_repeats: int) -> tuple[str, list[str]]:
    chosen = rng.sample(vocabulary(num_words), num_words)
    common, uncommon = chosen[:_CWE_COMMON], chosen[_CWE_COMMON:]
    words = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(words)
    return _numbered(words), common


def _cwe_parts(spec: TaskSpec, rng: random.Random, size: int, *, prose: Prose, length: int) -> Parts:
    # RULER's repetitions: fewer for short contexts, where 30 copies of 10 words would not fit.
    (example_words, *example_reps), reps = ((20, 3, 1), (6, 1)) if length < 4096 else ((40, 10, 3), (30, 3))
    example_list, example_answer = _cwe_list(rng, example_words, *example_reps)
    word_list, common = _cwe_list(rng, _CWE_COMMON + size, *reps)
    shot = _CWE_INTRO + example_list + _CWE_QUESTION + _CWE_ANSWER_PREFIX + " " + _numbered(example_answer)
    return f"{shot}\n{_CWE_INTRO}{word_list}", _CWE_QUESTION, _CWE_ANSWER_PREFIX, common


_FWE_ALPHA = 2.0
_ZETA_2 = math.pi**2 / 6  # zeta(_FWE_ALPHA)
_FWE_WORD_LENGTH = 6


def _fwe_parts(spec: TaskSpec, rng: random.Random, size: int, *, prose: Prose, length: int) -> Parts:
    vocab_size = max(length // 50, 8)  # RULER: length // 50
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=_FWE_WORD_LENGTH)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # RULER treats the most frequent "word" as noise
    # Zipf counts: the word of rank k appears size * k^-alpha / zeta(alpha) times.
    counts = [int(size * k**-_FWE_ALPHA / _ZETA_2) for k in range(1, len(ranked) + 1)]
    words = [word for word, count in zip(ranked, counts, strict=True) for _ in range(count)]
    rng.shuffle(words)
    context = (
        "Read the following coded text and track the frequency of each coded word. "
        "Find the three most frequently appeared coded words. " + " ".join(words)
    )
    query = (
        "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
        "What are the three most frequently appeared words in the above coded text?"
    )
    answer_prefix = " Answer: According to the coded text above, the three most frequently appeared words are:"
    return context, query, answer_prefix, ranked[1:4]


_FAMILIES: dict[str, Callable[..., Parts]] = {
    "niah": _niah_parts,
    "vt": _vt_parts,
    "cwe": _cwe_parts,
    "fwe": _fwe_parts,
}
# Smallest size per family: fwe needs enough words that ranks 2-4 appear and differ.
_MINIMUM_SIZE = {"niah": 0, "vt": 0, "cwe": 0, "fwe": 64}


def generate_task(
    task: str,
    tokenizer,
    length: int,
    num_samples: int,
    seed: int,
    *,
    prose: str | None = None,
) -> list[Sample]:
    """``num_samples`` samples of ``task`` whose prompts have ``length`` tokens, less at most
    ``length_tolerance(length)``. The same arguments give the same samples.

    ``prose``: text to use instead of the bundled prose for the prose haystack.
    """
    if task not in TASKS:
        raise LeanKError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    if length <= 0 or num_samples < 0:
        raise LeanKError(f"length must be positive and num_samples non-negative, got {length} and {num_samples}")
    spec = TASKS[task]
    corpus = Prose.from_text(prose) if prose is not None else bundled_prose_corpus()
    make_parts = _FAMILIES[spec.family]

    samples = []
    size = None
    for index in range(num_samples):
        sample_seed = f"leank-ruler/{task}/{seed}/{index}"

        def build(n: int, sample_seed: str = sample_seed) -> tuple[str, Parts]:
            # A fresh generator per size: keys and values stay the same while the size is searched.
            parts = make_parts(spec, random.Random(sample_seed), n, prose=corpus, length=length)
            return render_prompt(tokenizer, parts[0] + parts[1], parts[2]), parts

        size, (prompt, (context, query, answer_prefix, outputs)) = fit_to_length(
            build,
            lambda built: len(encode_prompt(tokenizer, built[0])),
            length,
            minimum=_MINIMUM_SIZE[spec.family],
            guess=size,
        )
        samples.append(Sample(task, index, length, context, query, answer_prefix, outputs, spec.metric, prompt))
    return samples

"""RULER tasks: prompt lengths, answers checked against the context by independent parsing,
determinism, and the prompt layout with and without a chat template."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from leank.data.tasks import TASKS, generate_task, length_tolerance, list_tasks
from leank.errors import LeanKError

LENGTHS = (1024, 8192)


def count_tokens(tokenizer, prompt: str) -> int:
    # The chat template already holds the special tokens.
    return len(tokenizer(prompt, add_special_tokens=tokenizer.chat_template is None)["input_ids"])


def niah_expected(sample) -> list[str]:
    values: dict[str, list[str]] = {}
    for key, value in re.findall(r"One of the special magic \w+ for (\S+) is: ([^\s.]+)\.", sample.context):
        values.setdefault(key, []).append(value)
    asked = re.search(r"for (.+) mentioned in the provided text\?", sample.query).group(1)
    keys = re.split(r", and |, ", asked)
    return [v for key in keys for v in values[key]]


def vt_expected(sample) -> list[str]:
    task = sample.context[sample.context.rindex("Memorize and track") :]
    assigned = dict(re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)", task))

    def resolve(name: str) -> str:
        source = assigned[name]
        return resolve(source[4:]) if source.startswith("VAR ") else source

    value = re.search(r"assigned the value (\d+)", sample.query).group(1)
    return [name for name in assigned if resolve(name) == value]


def cwe_expected(sample) -> list[str]:
    listing = sample.context[sample.context.rindex("most often.\n") :]
    counts = Counter(re.findall(r"\d+\. (\S+)", listing))
    top = max(counts.values())
    common = [w for w, c in counts.items() if c == top]
    assert len(common) == 10 and max(c for c in counts.values() if c < top) < top
    return common


def fwe_expected(sample) -> list[str]:
    words = sample.context[sample.context.index("coded words. ") + len("coded words. ") :].split()
    ranked = [w for w, _ in Counter(w for w in words if w != "...").most_common()]
    counts = Counter(words)
    assert counts[ranked[2]] > counts[ranked[3]]  # the top three are unambiguous
    return ranked[:3]


EXPECTED = {"niah": niah_expected, "vt": vt_expected, "cwe": cwe_expected, "fwe": fwe_expected}


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", list_tasks())
def test_prompt_length_and_answers(tokenizer, task, length):
    samples = generate_task(task, tokenizer, length, 2, seed=length)
    # One distractor line of two UUIDs is ~90 tokens, more than the tolerance at 1K:
    # there the fit may stop one line short.
    slack = 100 if task == "niah_multikey_3" and length < 4096 else length_tolerance(length)
    for index, sample in enumerate(samples):
        n = count_tokens(tokenizer, sample.prompt)
        assert length - slack <= n <= length, (task, n)
        assert (sample.task, sample.index, sample.length, sample.metric) == (task, index, length, "all")
        assert sample.outputs and all(output in sample.context for output in sample.outputs)
        expected = EXPECTED[TASKS[task].family](sample)
        assert sorted(sample.outputs) == sorted(expected)
        assert len(sample.outputs) == {"vt": 5, "cwe": 10, "fwe": 3}.get(
            TASKS[task].family, TASKS[task].num_values * TASKS[task].num_queries
        )
        # The chat template wraps the user message; the answer prefix follows the generation prompt.
        assert sample.prompt.startswith("<|im_start|>system") and sample.prompt.endswith(sample.answer_prefix)
        assert f"<|im_start|>user\n{sample.context}{sample.query}<|im_end|>" in sample.prompt


def test_niah_wording_singular_and_plural(tokenizer):
    single = generate_task("niah_single_3", tokenizer, 1024, 1, 0)[0]
    assert single.context.startswith("A special magic uuid is hidden")
    assert single.answer_prefix.endswith("mentioned in the provided text is")
    multi = generate_task("niah_multiquery", tokenizer, 1024, 1, 0)[0]
    assert multi.query.startswith("\nWhat are all the special magic numbers for ")
    assert multi.answer_prefix.endswith("mentioned in the provided text are")


def test_haystack_types(tokenizer):
    noise = generate_task("niah_single_1", tokenizer, 1024, 1, 0)[0]
    assert noise.context.count("The grass is green. The sky is blue.") > 10
    lines = generate_task("niah_multikey_2", tokenizer, 1024, 1, 0)[0]
    assert lines.context.count("One of the special magic numbers for") > 10
    prose = generate_task("niah_single_2", tokenizer, 1024, 1, 0)[0]
    assert "The grass is green" not in prose.context and prose.context.count("special magic") == 2


def test_deterministic_for_a_seed_and_different_across_seeds(tokenizer):
    for task in ("niah_multikey_1", "vt", "cwe", "fwe"):
        first = generate_task(task, tokenizer, 2048, 3, 7)
        assert first == generate_task(task, tokenizer, 2048, 3, 7)
        other = generate_task(task, tokenizer, 2048, 3, 8)
        assert all(a.prompt != b.prompt for a, b in zip(first, other, strict=True))
        assert len({s.prompt for s in first}) == 3  # samples differ from each other too


def test_without_chat_template(plain_tokenizer):
    for task in ("niah_single_2", "vt"):
        sample = generate_task(task, plain_tokenizer, 2048, 1, 0)[0]
        assert sample.prompt == sample.context + sample.query + sample.answer_prefix
        n = count_tokens(plain_tokenizer, sample.prompt)
        assert 2048 - length_tolerance(2048) <= n <= 2048


def test_user_prose(tokenizer):
    prose = "\n".join(f"Zebra number {i} walks slowly across the quiet savanna today." for i in range(500))
    sample = generate_task("niah_single_2", tokenizer, 1024, 1, 0, prose=prose)[0]
    assert "Zebra number" in sample.context and sample.outputs[0] in sample.context


def test_errors(tokenizer):
    with pytest.raises(LeanKError, match="unknown task"):
        generate_task("niah_single_9", tokenizer, 1024, 1, 0)
    with pytest.raises(LeanKError, match="too short"):
        generate_task("vt", tokenizer, 100, 1, 0)
    with pytest.raises(LeanKError, match="length must be positive"):
        generate_task("vt", tokenizer, 0, 1, 0)

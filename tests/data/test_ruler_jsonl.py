"""Loading task files in RULER's JSONL format, and their errors."""

from __future__ import annotations

import json

import pytest

from leank.data.ruler_jsonl import load_ruler_jsonl
from leank.errors import LeanKError


def write_jsonl(path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_new_and_old_style_records(tmp_path):
    path = tmp_path / "4096" / "data" / "niah_single_1" / "validation.jsonl"
    write_jsonl(
        path,
        [
            # Newer RULER: the answer prefix in its own field.
            {"index": 7, "input": "[INST] Find it. [/INST]", "outputs": ["1234567"], "length": 4000,
             "answer_prefix": " The special magic number is"},
            # Older RULER: the prefix inside the input, no index or length.
            {"input": "Find it. Answer:", "outputs": ["7654321", "x"]},
        ],
    )  # fmt: skip
    first, second = load_ruler_jsonl(path)
    assert (first.task, first.index, first.length, first.metric) == ("niah_single_1", 7, 4000, "all")
    assert first.prompt == "[INST] Find it. [/INST] The special magic number is"
    assert first.context == "[INST] Find it. [/INST]" and first.query == ""
    assert (second.index, second.length, second.answer_prefix, second.outputs) == (1, 0, "", ["7654321", "x"])
    assert second.prompt == "Find it. Answer:"


def test_task_metric_and_length_from_caller(tmp_path):
    qa = tmp_path / "qa_2.jsonl"
    write_jsonl(qa, [{"input": "q", "outputs": ["a", "b"], "length": 99}])
    (sample,) = load_ruler_jsonl(qa)
    assert (sample.task, sample.metric) == ("qa_2", "any")
    (sample,) = load_ruler_jsonl(qa, task="custom", metric="all", length=8192)
    assert (sample.task, sample.metric, sample.length) == ("custom", "all", 8192)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"input": "a", "outputs": ["b"]}\n{"input": "a", "outputs": \n', r"t\.jsonl:2: not valid JSON"),
        ('{"input": "a"}\n', r"t\.jsonl:1: missing field 'outputs'"),
        ('{"outputs": ["b"]}\n', r"t\.jsonl:1: missing field 'input'"),
        ('["input", "outputs"]\n', r"t\.jsonl:1: expected a JSON object"),
        ('{"input": "a", "outputs": "b"}\n', r"'outputs' must be a non-empty list of strings"),
        ('{"input": "a", "outputs": []}\n', r"'outputs' must be a non-empty list of strings"),
        ('{"input": 3, "outputs": ["b"]}\n', r"must be strings"),
        ("\n\n", r"has no samples"),
    ],
)
def test_errors(tmp_path, text, message):
    path = tmp_path / "t.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LeanKError, match=message) as err:
        load_ruler_jsonl(path)
    assert "\n" not in str(err.value)


def test_missing_file_and_bad_metric(tmp_path):
    with pytest.raises(LeanKError, match="does not exist"):
        load_ruler_jsonl(tmp_path / "none.jsonl")
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [{"input": "a", "outputs": ["b"]}])
    with pytest.raises(LeanKError, match="unknown metric"):
        load_ruler_jsonl(path, metric="exact")

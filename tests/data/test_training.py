"""Training samples: config validation, token layout, the answer mask, determinism, resuming."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from leank.data.tasks import generate_task, length_tolerance
from leank.data.training import TrainDataConfig, TrainSampler, sample_stream
from leank.errors import LeanKError


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_length": 0}, "must be positive"),
        ({"max_length": -5}, "must be positive"),
        ({"min_length": 4096, "max_length": 2048}, "larger than max_length"),
        ({"kinds": ()}, "kinds is empty"),
        ({"haystacks": []}, "haystacks is empty"),
        ({"kinds": ("passkey", "riddle")}, "unknown kinds riddle"),
        ({"haystacks": ("essay",)}, "unknown haystacks essay"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(LeanKError, match=message):
        TrainDataConfig(**kwargs)


def test_config_normalises_sequences():
    cfg = TrainDataConfig(kinds="passkey", haystacks=["prose", "filler"])
    assert cfg.kinds == ("passkey",) and cfg.haystacks == ("prose", "filler")


def expected_answer(context: str, question: str) -> str:
    """The answer, found independently: parse the question, look the facts up in the context."""
    if "pass key" in question:
        return " " + re.search(r"The pass key is (\d+)\. Remember it\.", context).group(1) + "."
    key = re.search(r"numbers? for (\S+)\?", question).group(1)
    values = re.findall(rf"special magic numbers for {re.escape(key)} is: (\d+)\.", context)
    return " " + ", ".join(values) + "."


def test_samples_layout_and_answer_mask(tokenizer):
    cfg = TrainDataConfig(min_length=600, max_length=2000, seed=1)
    seen = set()
    for sample in itertools.islice(sample_stream(tokenizer, cfg), 24):
        ids, mask, end = sample.input_ids, sample.answer_mask, sample.context_end
        assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
        assert cfg.min_length - length_tolerance(cfg.min_length) <= end <= cfg.max_length
        # The answer is the last tokens, one contiguous run after the context and the question.
        answer_at = int(mask.nonzero()[0])
        assert mask[answer_at:].all() and not mask[:answer_at].any() and answer_at > end
        context = tokenizer.decode(ids[:end])
        question = tokenizer.decode(ids[end:answer_at])
        assert tokenizer.decode(ids[mask]) == expected_answer(context, question)
        assert question.rstrip().endswith((" is", " are")) and "<|im_start|>assistant\n" in question
        seen.add(("pass key" in question, "grass is green" in context, context.count("special magic") > 5))
    assert len(seen) >= 4  # kinds and haystacks are mixed


def test_context_length_follows_the_range(tokenizer):
    sampler = TrainSampler(tokenizer, TrainDataConfig(min_length=3000, max_length=3000, seed=2))
    for step in range(3):
        assert 3000 - length_tolerance(3000) <= sampler.sample_at(step).context_end <= 3000


def as_lists(sample) -> tuple:
    return sample.input_ids.tolist(), sample.context_end, sample.answer_mask.tolist()


def test_deterministic_and_resumable(tokenizer):
    cfg = TrainDataConfig(min_length=500, max_length=1500, seed=5)
    stream = [as_lists(s) for s in itertools.islice(sample_stream(tokenizer, cfg), 6)]
    resumed = [as_lists(s) for s in itertools.islice(sample_stream(tokenizer, cfg, start=3), 3)]
    assert resumed == stream[3:]
    assert as_lists(TrainSampler(tokenizer, cfg).sample_at(4)) == stream[4]
    other = TrainSampler(tokenizer, TrainDataConfig(min_length=500, max_length=1500, seed=6))
    assert all(as_lists(other.sample_at(step)) != stream[step] for step in range(6))


def test_same_samples_in_a_fresh_process(tokenizer):
    """No dependence on hash randomisation or process state: a restarted run resumes exactly."""
    code = (
        "import json; from leank.models import load_tokenizer; "
        "from leank.data.training import TrainDataConfig, TrainSampler; "
        "from leank.data.tasks import generate_task; tok = load_tokenizer('smollm2-135m'); "
        "s = TrainSampler(tok, TrainDataConfig(min_length=500, max_length=1500, seed=5)).sample_at(2); "
        "print(json.dumps([s.input_ids.tolist(), generate_task('cwe', tok, 1024, 1, 3)[0].prompt]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    ids, prompt = json.loads(out.stdout.strip().splitlines()[-1])
    sampler = TrainSampler(tokenizer, TrainDataConfig(min_length=500, max_length=1500, seed=5))
    assert ids == sampler.sample_at(2).input_ids.tolist()
    assert prompt == generate_task("cwe", tokenizer, 1024, 1, 3)[0].prompt


def test_user_corpus_replaces_the_prose(tokenizer, tmp_path):
    (tmp_path / "notes.txt").write_text(
        "\n".join(f"The lighthouse keeper counted {i} waves before dawn." for i in range(400)), encoding="utf-8"
    )
    cfg = TrainDataConfig(min_length=800, max_length=900, haystacks=("prose",), corpus=tmp_path, seed=0)
    sample = TrainSampler(tokenizer, cfg).sample_at(0)
    assert "lighthouse keeper" in tokenizer.decode(sample.input_ids[: sample.context_end])


def test_missing_corpus(tokenizer, tmp_path):
    with pytest.raises(LeanKError, match="does not exist"):
        TrainSampler(tokenizer, TrainDataConfig(corpus=tmp_path / "nope.txt"))

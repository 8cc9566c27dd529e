"""Fixtures for the evaluation tests: the real SmolLM2 tokenizer (from ``tests/data``), a
tiny random Llama sized to its vocabulary, an all-kept mask file, a fake results directory."""

from __future__ import annotations

import json

import pytest

import leank
from leank.eval.methods import slugify

from ..conftest import tiny_model
from ..data.conftest import tokenizer  # noqa: F401  (session fixture, shared)


@pytest.fixture(scope="session")
def tiny_lm(tokenizer):  # noqa: F811
    """A 2-layer random Llama (4 query / 2 KV heads, head_dim 16) over SmolLM2's vocabulary,
    LeanK attention on, context 1024."""
    model = tiny_model("llama", vocab=len(tokenizer), qk_gain=3.0)
    leank.enable(model)
    return model


@pytest.fixture
def all_kept_mask(tiny_lm, tmp_path):
    cfg = tiny_lm.config
    path = tmp_path / "all-kept.safetensors"
    leank.ChannelMask.full(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim).save(path)
    return path


def fake_metrics(method: str, task: str, length: int, score: float, *, sparsity: float, n: int = 50) -> dict:
    """A ``metrics.json`` as the runner writes it (the fields the report reads)."""
    return {
        "method": method, "family": method.split(":")[0], "task": task, "length": length, "score": score, "n": n,
        "sparsity": sparsity, "kv_bytes_per_sample": (1 - 0.5 * sparsity) * 2**20,
        "dense_kv_bytes_per_sample": 2**20, "kv_bytes_kind": "allocated", "seconds": 10.0, "model": "fake-model",
        "device": "cuda:0", "gpu": "NVIDIA H100", "dtype": "bfloat16",
        "versions": {"torch": "2.11", "transformers": "5.17"}, "command": "leank eval --model fake-model",
    }


# method -> (sparsity, {(task, length): score}); think has no vt result at 8192 (unfinished).
FAKE_SCORES = {
    "full": (0.0, {("niah_single_1", 4096): 100.0, ("vt", 4096): 80.0, ("niah_single_1", 8192): 96.0,
                   ("vt", 8192): 70.0}),
    "magnitude:0.7": (0.7, {("niah_single_1", 4096): 90.0, ("vt", 4096): 60.0, ("niah_single_1", 8192): 84.0,
                            ("vt", 8192): 50.0}),
    "magnitude:0.8": (0.8, {("niah_single_1", 4096): 70.0, ("vt", 4096): 40.0, ("niah_single_1", 8192): 62.0,
                            ("vt", 8192): 30.0}),
    "think:0.7": (0.7, {("niah_single_1", 4096): 20.0, ("vt", 4096): 10.0, ("niah_single_1", 8192): 12.0}),
}


@pytest.fixture
def fake_results(tmp_path):
    """A partly finished results directory, without agreement.json."""
    root = tmp_path / "results"
    for method, (sparsity, scores) in FAKE_SCORES.items():
        for (task, length), score in scores.items():
            path = root / slugify(method) / task / str(length) / "metrics.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(fake_metrics(method, task, length, score, sparsity=sparsity)))
    return root

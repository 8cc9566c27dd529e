"""LeanK under transformers' tensor parallelism (``tp_plan="auto"``), 2 processes, gloo, CPU,
against the single-process LeanK run (tests/tp_worker.py is the worker)."""

from __future__ import annotations

import json

import pytest
import torch

import leank
from leank.cache import cache_kwargs
from leank.errors import LeanKError
from leank.masks import mask_from_counts
from leank.parallel import kv_head_rows, sum_over_ranks

from .conftest import tiny_model
from .torchrun import ROOT, torchrun

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
    ),
]

SINK, RECENT, NEW = 3, 6, 24


def test_tensor_parallel_decoding_equals_one_process(tmp_path):
    """Each process's cache holds its KV heads with their mask rows; greedy tokens and every
    step's logits equal the one-process LeanK run (left-padded batch, tokens moved into the
    middle store many times), and the byte counts summed over the processes equal its own."""
    seed = torch.seed() % 2**31
    model = tiny_model("llama", layers=2, kv_heads=4, groups=2, head_dim=16, vocab=101, seed=seed % 1000,
                       qk_gain=3.0)
    model.save_pretrained(tmp_path / "model")
    gen = torch.Generator().manual_seed(seed)
    counts = torch.tensor([[0, 4, 8, 16], [12, 4, 0, 8]])  # heads keeping nothing on both ranks' shares
    mask = leank.ChannelMask(mask_from_counts(torch.rand(2, 4, 16, generator=gen), counts), sink=SINK, recent=RECENT)
    mask.save(tmp_path / "mask.safetensors")
    ids = torch.randint(3, 101, (2, 20), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, :5] = 0  # left padding
    ids[1, :5] = 0
    (tmp_path / "dump").mkdir()
    spec = {"model": str(tmp_path / "model"), "mask": str(tmp_path / "mask.safetensors"), "sink": SINK,
            "recent": RECENT, "new": NEW, "input_ids": ids.tolist(), "attention_mask": attention.tolist(),
            "dump": str(tmp_path / "dump")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    torchrun(ROOT / "tests/tp_worker.py", [str(tmp_path / "spec.json")], tmp_path / "logs", timeout=180)

    leank.enable(model)
    cache = leank.LeanKCache(model, mask, sink=SINK, recent=RECENT)
    one = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=NEW, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, disable_compile=True,
                         **cache_kwargs(cache))
    assert cache.layers[0].middle_length() >= NEW  # tokens went through the ring into the middle
    tp = torch.load(tmp_path / "dump" / "result.pt")
    torch.testing.assert_close(tp["logits"], torch.stack(one.logits, 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(tp["sequences"], one.sequences)
    ranks = [torch.load(tmp_path / "dump" / f"rank{r}.pt") for r in (0, 1)]
    assert all(r["kept_rows"] == [2, 2] for r in ranks)  # half of the 4 KV heads each
    assert tp["ideal"] == cache.ideal_nbytes() and tp["dense"] == cache.dense_nbytes()
    assert tp["nbytes"] == sum(r["nbytes"] for r in ranks) and tp["nbytes"] >= tp["ideal"]


def test_without_tensor_parallelism_every_head_and_the_value_itself():
    model = tiny_model("llama", kv_heads=4)
    assert kv_head_rows(model, 4) == slice(0, 4) and kv_head_rows(model.config, 4) == slice(0, 4)
    assert sum_over_ranks(123) == 123


def test_uneven_or_unknown_sharding_is_refused(monkeypatch):
    model = tiny_model("llama", kv_heads=4)
    monkeypatch.setattr(type(model), "tp_size", property(lambda self: 3), raising=False)
    with pytest.raises(LeanKError, match="no key projection is sharded"):
        kv_head_rows(model, 4)
    monkeypatch.setattr("leank.parallel.tensor_parallel", lambda model: (0, 3))
    with pytest.raises(LeanKError, match="4 KV heads do not split evenly over 3"):
        kv_head_rows(model, 4)

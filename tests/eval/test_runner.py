"""The runner end to end on a tiny random Llama: files, metrics, identical predictions for
the full cache and an all-kept LeanK mask, resume, and bad input refused before generation."""

from __future__ import annotations

import json

import pytest

from leank.errors import LeanKError
from leank.eval import runner
from leank.eval.runner import EvalConfig, run_eval

TASKS = ("niah_single_1", "fwe")
LENGTH = 640  # prompt + answer budget; the tiny model takes 1024


def no_generation(*args, **kwargs):
    raise AssertionError("generate() was called")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_runs_writes_and_resumes(tiny_lm, tokenizer, tmp_path, all_kept_mask, monkeypatch):
    out = tmp_path / "runs"
    cfg = EvalConfig(model="tiny", methods=("full", f"leank:{all_kept_mask}"), tasks=TASKS, lengths=(LENGTH,),
                     samples=3, batch_size=2, out=out)
    results = run_eval(cfg, model=tiny_lm, tokenizer=tokenizer, progress=False)

    assert sorted((r["method"], r["task"]) for r in results) == sorted(
        (m, t) for m in ("full", "leank:all-kept") for t in TASKS
    )
    for r in results:
        assert (r["length"], r["n"], r["model"], r["dtype"], r["metric"]) == (LENGTH, 3, "tiny", "float32", "all")
        assert 0 <= r["score"] <= 100 and r["kv_bytes_per_sample"] > 0 and r["seconds"] > 0
        assert r["prompt_tokens_mean"] + r["tokens_to_generate"] <= LENGTH
        assert r["versions"]["transformers"] and r["kv_bytes_kind"] == "allocated"
    assert json.loads((out / "results.json").read_text())["results"] == results

    for task in TASKS:
        full = read_jsonl(out / "full" / task / str(LENGTH) / "predictions.jsonl")
        lean = read_jsonl(out / "leank-all-kept" / task / str(LENGTH) / "predictions.jsonl")
        assert [p["index"] for p in full] == [0, 1, 2]
        assert len({p["prompt_tokens"] for p in full}) > 1  # batches really are left-padded
        assert [p["prediction"] for p in full] == [p["prediction"] for p in lean]
        assert all(p["references"] and p["prediction"] for p in full)

    # Everything finished: a second run generates nothing and returns the same results.
    monkeypatch.setattr(runner, "generate_batch", no_generation)
    assert run_eval(cfg, model=tiny_lm, tokenizer=tokenizer, progress=False) == results

    # A new method runs alone; the finished ones are skipped.
    calls = []
    monkeypatch.undo()
    real = runner.generate_batch

    def counting(model, tokenizer, method, *args):
        calls.append(method.spec.label)
        return real(model, tokenizer, method, *args)

    monkeypatch.setattr(runner, "generate_batch", counting)
    cfg = EvalConfig(model="tiny", methods=(*cfg.methods, "think:0.5"), tasks=TASKS, lengths=(LENGTH,),
                     samples=3, batch_size=2, out=out)
    assert len(run_eval(cfg, model=tiny_lm, tokenizer=tokenizer, progress=False)) == 6
    assert calls == ["think:0.5"] * 4  # 2 tasks x 2 batches


def test_ruler_jsonl_file(tiny_lm, tokenizer, tmp_path):
    path = tmp_path / "ruler" / "512" / "data" / "qa_1" / "validation.jsonl"
    path.parent.mkdir(parents=True)
    records = [{"index": i, "input": f"Question {i}: what is the capital of France?", "outputs": ["Paris", "paris"],
                "answer_prefix": " Answer:", "length": 20} for i in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = EvalConfig(model="tiny", methods=("full",), tasks=(), ruler_jsonl=(path,), samples=5, out=tmp_path / "runs")
    (result,) = run_eval(cfg, model=tiny_lm, tokenizer=tokenizer, progress=False)
    assert (result["task"], result["length"], result["n"], result["metric"]) == ("ruler-qa_1", 512, 2, "any")
    assert result["tokens_to_generate"] == 32


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tasks": ("niah_single_9",)}, "unknown task"),
        ({"methods": ()}, "no method"),
        ({"methods": ("full", "full")}, "given twice"),
        ({"lengths": (0,)}, "positive token counts"),
        ({"samples": 0}, "samples must be a positive integer"),
        ({"batch_size": 2.5}, "batch_size must be a positive integer"),
        ({"tasks": ()}, "nothing to evaluate"),
        ({"ruler_jsonl": ("missing.jsonl",)}, "does not exist"),
        ({"dtype": "float8"}, "unknown dtype"),
    ],
)
def test_config_errors(changes, message):
    with pytest.raises(LeanKError, match=message):
        EvalConfig(**{"model": "tiny", "methods": ("full",), **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lengths": (2048,)}, "exceeds the 1024-token context"),
        ({"lengths": (200,)}, "too short for this task"),
        ({"methods": ("full", "leank:OTHER")}, "does not match the model"),
    ],
)
def test_bad_input_fails_before_generation(tiny_lm, tokenizer, tmp_path, monkeypatch, changes, message):
    import leank

    other = tmp_path / "other.safetensors"
    leank.ChannelMask.full(30, 3, 64).save(other)
    if "methods" in changes:
        changes = {"methods": tuple(m.replace("OTHER", str(other)) for m in changes["methods"])}
    monkeypatch.setattr(runner, "generate_batch", no_generation)
    cfg = EvalConfig(**{"model": "tiny", "methods": ("full",), "tasks": ("niah_single_1",), "lengths": (LENGTH,),
                        "samples": 1, "out": tmp_path / "runs", **changes})
    with pytest.raises(LeanKError, match=message):
        run_eval(cfg, model=tiny_lm, tokenizer=tokenizer, progress=False)
    assert not list((tmp_path / "runs").rglob("metrics.json"))

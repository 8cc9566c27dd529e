"""``leank eval`` and ``leank report`` through argparse and their handlers."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import leank
from leank.errors import LeanKError
from leank.eval.cli import register


def parse(argv):
    parser = argparse.ArgumentParser(prog="leank")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_report_command(fake_results, capsys):
    args = parse(["report", str(fake_results)])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "| niah_single_1 |" in out and f"wrote {fake_results / 'report.md'}" in out


def test_eval_defaults():
    args = parse(["eval", "--methods", "full", "think:0.7"])
    assert (args.model, args.tasks, args.lengths, args.samples, args.batch_size, args.out, args.agreement) == (
        "smollm2-135m", None, [4096], 50, 8, "runs/eval", False
    )


def test_eval_command_end_to_end(tiny_lm, tokenizer, tmp_path, capsys):
    model_dir, out = tmp_path / "model", tmp_path / "runs"
    tiny_lm.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    args = parse([
        "eval", "--model", str(model_dir), "--methods", "full", "think:0.5", "--tasks", "fwe", "--lengths", "640",
        "--samples", "2", "--batch-size", "2", "--out", str(out), "--device", "cpu", "--agreement",
        "--agreement-length", "128", "--agreement-steps", "3", "--agreement-windows", "2",
    ])
    assert args.run(args) == 0
    assert (out / "think-0.5" / "fwe" / "640" / "metrics.json").is_file()
    assert (out / "agreement.json").is_file() and (out / "report.md").is_file()
    assert "| fwe | " in capsys.readouterr().out


def test_eval_jobs_runs_methods_in_processes_with_the_same_results(tiny_lm, tokenizer, tmp_path):
    """``--jobs 2``: each method in its own process, into one results directory — the same predictions
    and scores as one process; a method that fails is reported by name and the others finish."""
    import json

    model_dir = tmp_path / "model"
    tiny_lm.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    common = ["eval", "--model", str(model_dir), "--tasks", "fwe", "niah_single_1", "--lengths", "640", "--samples",
              "2", "--batch-size", "2", "--device", "cpu", "--methods", "full", "think:0.5"]
    args = parse([*common, "--out", str(tmp_path / "one")])
    assert args.run(args) == 0
    other = Path(leank.__file__).parent / "masks" / "smollm2-135m.leank-0.70.safetensors"  # another model's mask
    args = parse([*common, f"leank:{other}", "--out", str(tmp_path / "two"), "--jobs", "2"])
    with pytest.raises(LeanKError, match=f"leank:{other}: .*does not match the model"):
        args.run(args)
    runs = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").glob("*/*/*/predictions.jsonl"))
    assert len(runs) == 4
    for run in runs:  # the methods that could run finished, as one process would have
        one, two = (json.loads((tmp_path / d / run).with_name("metrics.json").read_text()) for d in ("one", "two"))
        assert (tmp_path / "one" / run).read_text() == (tmp_path / "two" / run).read_text()
        assert (one["score"], one["settings"]) == (two["score"], two["settings"])
    assert len(json.loads((tmp_path / "two" / "results.json").read_text())["results"]) == 4


def _gone(pid: int) -> bool:
    """No such process, or only its exit status left (a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_eval_jobs_ctrl_c_stops_every_process(tiny_lm, tokenizer, tmp_path, monkeypatch):
    """Ctrl-C while methods run in processes: nothing new starts and the running ones end (before,
    interrupted workers went on to the next method until every method had run)."""
    import concurrent.futures
    import multiprocessing
    import time

    from leank.eval.runner import EvalConfig, run_eval_in_processes

    model_dir = tmp_path / "model"
    tiny_lm.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    as_completed = concurrent.futures.as_completed

    def interrupted_after_one(futures, *args, **kwargs):
        for future in as_completed(futures, *args, **kwargs):
            yield future
            raise KeyboardInterrupt  # as if Ctrl-C came while the others wait or run

    monkeypatch.setattr(concurrent.futures, "as_completed", interrupted_after_one)
    methods = ("full", "think:0.5", "magnitude:0.5", "random:0.5")
    cfg = EvalConfig(model=str(model_dir), methods=methods, tasks=("fwe",), lengths=(640,), samples=2, batch_size=2,
                     out=tmp_path / "out", device="cpu")
    with pytest.raises(KeyboardInterrupt):
        run_eval_in_processes(cfg, 1, progress=False)
    # Every worker is gone at the OS level. (multiprocessing's own bookkeeping can still list one: when the pool's
    # thread reaps it first, `join` gets ECHILD and leaves it marked alive — seen in CI, /proc showed it gone.)
    for child in multiprocessing.active_children():
        child.join(timeout=10)
        deadline = time.monotonic() + 10
        while not _gone(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child.pid), child
    finished = list((tmp_path / "out").glob("*/*/*/metrics.json"))
    assert 1 <= len(finished) < len(methods)


def test_eval_command_refuses_bad_input_before_loading():
    args = parse(["eval", "--model", "/no/such/model", "--methods", "full", "thinkk:0.7"])
    with pytest.raises(LeanKError, match="unknown method"):
        args.run(args)
    args = parse(["eval", "--model", "/no/such/model", "--methods", "full", "--agreement", "--agreement-steps", "0"])
    with pytest.raises(LeanKError, match="agreement steps"):
        args.run(args)
    args = parse(["eval", "--model", "/no/such/model", "--methods", "full", "think:0.7", "--jobs", "0"])
    with pytest.raises(LeanKError, match="--jobs must be at least 1, got 0"):
        args.run(args)

"""``leank eval`` and ``leank report`` through argparse and their handlers."""

from __future__ import annotations

import argparse

import pytest

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


def test_eval_command_refuses_bad_input_before_loading():
    args = parse(["eval", "--model", "/no/such/model", "--methods", "full", "thinkk:0.7"])
    with pytest.raises(LeanKError, match="unknown method"):
        args.run(args)
    args = parse(["eval", "--model", "/no/such/model", "--methods", "full", "--agreement", "--agreement-steps", "0"])
    with pytest.raises(LeanKError, match="agreement steps"):
        args.run(args)

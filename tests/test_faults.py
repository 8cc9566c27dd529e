"""Bad input and faults, through the ``leank`` command line (issue 11; docs/faults.md lists them).

Every case asserts what the user sees: exit code 2 and exactly one ``leank CMD: error: ...``
line on stderr (no traceback), that nothing was written that would block a re-run, and,
for interrupted or failed runs, that the finished work is kept and a re-run completes.
Checks that must happen *before* the work prove it by making model loading fail.

The model is a tiny random Llama with SmolLM2's tokenizer saved to disk (tests/train);
tests run as root in CI, where permission bits do not stop writes, so an unwritable output
is a path whose parent is a regular file (or a read-only directory when not root).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import leank
import leank.demo  # imported before any test patches leank.models.load_model (demo binds it at import)
from leank import models
from leank.cli import main as cli_main
from leank.masks import ChannelMask

from .train.test_train import tiny_dir  # noqa: F401  (module fixture: tiny Llama + SmolLM2 tokenizer on disk)

ROOT = Path(__file__).resolve().parents[1]
AUTHORS_MASK = ROOT / "leank" / "masks" / "llama3.1-8b-instruct.leank-mask.safetensors"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable GPU")


# ---- helpers ------------------------------------------------------------------------------


def run(argv, capsys) -> tuple[int, str, str]:
    rc = cli_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_line(rc: int, err: str, command: str, *fragments: str) -> str:
    """Exit code 2, no traceback, exactly one error line, naming ``fragments``."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"leank {command}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded: the check under test must come before the work."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr("leank.demo.load_model", refuse)


@pytest.fixture
def unwritable(tmp_path):
    """A directory path no file can be created in: read-only when not root; as root (where chmod
    does not stop writes), a path below a regular file."""
    if os.geteuid() != 0:
        path = tmp_path / "readonly"
        path.mkdir()
        path.chmod(0o500)
        yield path
        path.chmod(0o700)
    else:
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        yield blocker / "out"


@pytest.fixture
def tiny_mask(tmp_path):
    path = tmp_path / "tiny-mask.safetensors"
    ChannelMask.full(2, 2, 16, model="tiny").save(path)
    return path


@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.pyplot", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# ---- bad mask files (info, demo) -----------------------------------------------------------


def bad_mask_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = tmp_path / "good.safetensors"
    ChannelMask.full(2, 2, 16).save(good)
    files = {}
    files["missing"] = (tmp_path / "missing.safetensors", "mask file not found")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    files["empty"] = (tmp_path / "empty.safetensors", "not a valid .safetensors")
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    files["truncated"] = (tmp_path / "truncated.safetensors", "not a valid .safetensors")
    (tmp_path / "text.safetensors").write_text("mask = [1, 0, 1]\n")
    files["text"] = (tmp_path / "text.safetensors", "not a valid .safetensors")
    save_file({"mask": torch.tensor([[[0, 1, 2, 1]]], dtype=torch.uint8)}, str(tmp_path / "nonbinary.safetensors"))
    files["non-binary"] = (tmp_path / "nonbinary.safetensors", "only 0 and 1")
    save_file({"mask": torch.rand(1, 1, 4)}, str(tmp_path / "float.safetensors"))
    files["float"] = (tmp_path / "float.safetensors", "boolean")
    save_file({"alpha": torch.rand(1, 1, 4)}, str(tmp_path / "alpha.safetensors"))
    files["no mask tensor"] = (tmp_path / "alpha.safetensors", "no tensor named 'mask'")
    save_file({"mask": torch.ones(1, 1, 4, dtype=torch.uint8)}, str(tmp_path / "meta.safetensors"),
              metadata={"alignment": "sixteen"})
    files["corrupt metadata"] = (tmp_path / "meta.safetensors", "corrupt mask metadata")
    save_file({"mask": torch.ones(4, dtype=torch.uint8)}, str(tmp_path / "1d.safetensors"))
    files["1-D"] = (tmp_path / "1d.safetensors", "3-D tensor")
    (tmp_path / "dir.safetensors").mkdir()
    files["a directory"] = (tmp_path / "dir.safetensors", "mask file not found")
    return files


def test_info_bad_mask_files(tmp_path, capsys):
    for name, (path, message) in bad_mask_files(tmp_path).items():
        rc, out, err = run(["info", path], capsys)
        error_line(rc, err, "info", message, str(path.name))
        assert out == "", name


def test_info_marks_library_defaults(capsys):
    # The authors' masks carry no metadata: sink/recent/alignment are LeanK's defaults, not the file's.
    rc, out, _ = run(["info", AUTHORS_MASK], capsys)
    assert rc == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:7]}
    for key in ("alignment", "sink", "recent"):
        assert "(not in the file: library default)" in rows[key], rows[key]
    for key in ("model", "method"):
        assert "(not in the file)" in rows[key], rows[key]
    assert "not in the file" not in rows["shape"]
    rc, out, _ = run(["info", AUTHORS_MASK, "--json"], capsys)
    assert json.loads(out)["defaults_not_in_file"] == ["alignment", "method", "model", "recent", "sink"]
    # A mask LeanK wrote has all of them: no note.
    rc, out, _ = run(["info", leank.bundled_mask_path("smollm2-135m")], capsys)
    assert rc == 0 and "library default" not in out


def test_info_unexpected_os_error_is_one_line(monkeypatch, tmp_path, capsys):
    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(ChannelMask, "load", staticmethod(denied))
    rc, _, err = run(["info", tmp_path / "m.safetensors"], capsys)
    error_line(rc, err, "info", "Permission denied", "m.safetensors")


# ---- demo ----------------------------------------------------------------------------------


def test_demo_model_without_bundled_mask_suggests_mask(no_model_load, tiny_dir, capsys):  # noqa: F811
    rc, _, err = run(["demo", "--model", tiny_dir], capsys)
    error_line(rc, err, "demo", "no bundled mask", "--mask")


def test_demo_bad_masks(tiny_dir, tmp_path, capsys):  # noqa: F811
    files = bad_mask_files(tmp_path)
    for name in ("empty", "truncated", "non-binary"):
        path, message = files[name]
        rc, _, err = run(["demo", "--model", tiny_dir, "--mask", path], capsys)
        error_line(rc, err, "demo", message)
    # another model's mask: the bundled SmolLM2 mask on the tiny model
    rc, _, err = run(["demo", "--model", tiny_dir, "--mask", leank.bundled_mask_path("smollm2-135m")], capsys)
    error_line(rc, err, "demo", "does not match the model")


def test_demo_lengths(tiny_dir, tiny_mask, capsys, no_model_load):  # noqa: F811
    for length in ("0", "-5"):
        rc, _, err = run(["demo", "--model", tiny_dir, "--mask", tiny_mask, "--length", length], capsys)
        error_line(rc, err, "demo", "--length must be a positive number of tokens")


def test_demo_length_beyond_context(tiny_dir, tiny_mask, capsys):  # noqa: F811
    rc, _, err = run(["demo", "--model", tiny_dir, "--mask", tiny_mask, "--length", "9000"], capsys)
    error_line(rc, err, "demo", "exceeds the 1024-token context")


# ---- device: one shared check --------------------------------------------------------------


@NO_CUDA
def test_cuda_on_a_cpu_only_torch(tiny_dir, tiny_mask, tmp_path, capsys, no_model_load):  # noqa: F811
    commands = {
        "demo": ["--model", tiny_dir, "--mask", tiny_mask],
        "eval": ["--model", tiny_dir, "--methods", "full", "--tasks", "fwe", "--lengths", "640", "--out",
                 tmp_path / "eval"],
        "calibrate": ["--model", tiny_dir, "--sparsity", "0.5", "--out", tmp_path / "m.safetensors"],
        "train": ["--model", tiny_dir, "--out", tmp_path / "train"],
    }
    for command, args in commands.items():
        rc, _, err = run([command, *args, "--device", "cuda"], capsys)
        line = error_line(rc, err, command, "--device cuda needs a CUDA GPU", "--device cpu")
        assert "Torch not compiled" not in line
    assert listing(tmp_path) == ["tiny-mask.safetensors"]  # no run directory, no mask, no results


def test_unknown_device(no_model_load, tiny_dir, tmp_path, capsys):  # noqa: F811
    rc, _, err = run(["calibrate", "--model", tiny_dir, "--sparsity", "0.5", "--device", "gpu0",
                      "--out", tmp_path / "m.safetensors"], capsys)
    error_line(rc, err, "calibrate", "unknown device 'gpu0'")


# ---- model names ---------------------------------------------------------------------------


def test_bad_model_names(tmp_path, tiny_mask, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    cases = [
        (tmp_path / "not-a-model", "directory without config.json"),
        ("./models/tiny-typo", "does not exist"),
        (tmp_path / "no" / "such" / "dir", "does not exist"),
        (tmp_path / "weights.bin", "is a file, not a model"),
        (tmp_path / "missing.gguf", "GGUF file not found"),
        ("leank-tests/no-such-model", "not in the local Hugging Face cache"),
    ]
    for name, message in cases:
        start = time.perf_counter()
        rc, _, err = run(["demo", "--model", name, "--mask", tiny_mask], capsys)
        error_line(rc, err, "demo", message)
        assert time.perf_counter() - start < 10, f"{name}: no fast failure"


def test_hub_probe_defers_to_a_proxy(monkeypatch):
    import socket

    def no_direct_connection(*args, **kwargs):
        raise OSError("no route")

    monkeypatch.setattr(socket, "create_connection", no_direct_connection)
    for key in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    assert models._hub_reachable() is False
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert models._hub_reachable() is True  # a direct probe says nothing behind a proxy


def test_unreachable_hub_fails_fast(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    rc, _, err = run(["eval", "--model", "leank-tests/no-such-model", "--methods", "full", "--tasks", "fwe",
                      "--lengths", "640", "--device", "cpu", "--out", tmp_path / "e"], capsys)
    error_line(rc, err, "eval", "cannot be reached", "local directory")


# ---- calibrate -----------------------------------------------------------------------------


def test_calibrate_refuses_before_loading(no_model_load, tiny_dir, tmp_path, unwritable, capsys):  # noqa: F811
    out = tmp_path / "m.safetensors"
    base = ["calibrate", "--model", tiny_dir, "--out", out]
    cases = [
        (["--sparsity", "1.0"], r"sparsity must be in [0, 1)"),
        (["--sparsity", "nan"], r"sparsity must be in [0, 1)"),
        (["--sparsity", "0.5", "--samples", "0"], "--samples must be at least 1"),
        (["--sparsity", "0.5", "--length", "0"], "--length must be at least 1"),
        (["--sparsity", "0.5", "--corpus", tmp_path / "nope.txt"], "does not exist"),
    ]
    for extra, message in cases:
        rc, _, err = run([*base, *extra], capsys)
        error_line(rc, err, "calibrate", message)
    rc, _, err = run(["calibrate", "--model", tiny_dir, "--sparsity", "0.5", "--out", unwritable / "m.safetensors"],
                     capsys)
    error_line(rc, err, "calibrate", str(unwritable))
    rc, _, err = run(["calibrate", "--model", tiny_dir, "--sparsity", "0.5", "--out", tmp_path], capsys)
    error_line(rc, err, "calibrate", "is a directory")
    assert not out.exists()


def test_calibrate_checks_the_model_before_the_work(tiny_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    import leank.calibrate

    def no_work(*args, **kwargs):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(leank.calibrate, "channel_magnitudes", no_work)
    out = tmp_path / "m.safetensors"
    for extra, message in [(["--length", "9000"], "exceeds the 1024-token context"),
                           (["--align", "3"], "does not divide head_dim 16")]:
        rc, _, err = run(["calibrate", "--model", tiny_dir, "--sparsity", "0.5", "--device", "cpu", "--out", out,
                          *extra], capsys)
        error_line(rc, err, "calibrate", message)
    assert not out.exists()


def test_calibrate_writes_a_mask_at_the_target_with_the_umask(tiny_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "sub" / "m.safetensors"
    old = os.umask(0o002)
    try:
        rc, stdout, _ = run(["calibrate", "--model", tiny_dir, "--sparsity", "0.5", "--align", "4", "--length",
                             "256", "--samples", "1", "--device", "cpu", "--out", out], capsys)
    finally:
        os.umask(old)
    assert rc == 0, stdout
    mask = ChannelMask.load(out)
    # 64 channels, 4 heads: at most half an alignment (2 channels) per head off the target
    assert abs(mask.sparsity - 0.5) <= 4 * 2 / 64 and (mask.kept_counts % 4 == 0).all()
    assert out.stat().st_mode & 0o777 == 0o664
    assert listing(tmp_path) == ["sub", "sub/m.safetensors"]  # no temporary file left


# ---- train ---------------------------------------------------------------------------------

TRAIN = ["--sparsity", "0.75", "--align", "4", "--sink", "4", "--recent", "8", "--min-length", "300",
         "--max-length", "420", "--validation-samples", "1", "--device", "cpu", "--dtype", "float32",
         "--workers", "0", "--checkpoint-every", "1"]


def train_argv(model_dir, out, *extra) -> list:
    return ["train", "--model", model_dir, "--out", out, *TRAIN, *extra]


def test_train_bad_corpus_leaves_no_run_directory(tiny_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    rc, _, err = run(train_argv(tiny_dir, out, "--corpus", "/nonexistent", "--steps1", "1", "--steps2", "0"),
                     capsys)
    error_line(rc, err, "train", "corpus /nonexistent does not exist")
    assert not out.exists()
    # the corrected command runs (and --steps2 0, binarising α without fine-tuning, is handled)
    rc, _, err = run(train_argv(tiny_dir, out, "--steps1", "2", "--steps2", "0"), capsys)
    assert rc == 0, err
    mask = ChannelMask.load(out / "mask-0.75.safetensors")
    assert abs(mask.sparsity - 0.75) <= 4 * 2 / 64 and mask.sparsity < 1
    assert (out / "summary.json").is_file() and (out / "log.jsonl").is_file()


def test_train_refusals_leave_nothing(no_model_load, tiny_dir, tmp_path, unwritable, capsys):  # noqa: F811
    out = tmp_path / "run"
    cases = [
        (["--steps1", "0"], "stage1_steps must be at least 1"),
        (["--steps2", "-1"], "stage2_steps must be >= 0"),
        (["--sparsity", "1"], r"sparsity must be in [0, 1)"),
        (["--min-length", "10"], "leaves no middle tokens"),
        (["--cuda-graphs"], "--cuda-graphs needs one CUDA GPU"),  # these arguments train on the CPU
        (["--cuda-graphs", "--fsdp"], "--cuda-graphs runs on one GPU, without --fsdp"),
    ]
    for extra, message in cases:
        rc, _, err = run(train_argv(tiny_dir, out, *extra), capsys)
        error_line(rc, err, "train", message)
        assert not out.exists()
    rc, _, err = run(train_argv(tiny_dir, unwritable / "run"), capsys)
    error_line(rc, err, "train", str(unwritable))


def slow_cli(args: list, seconds_per_step: float, target: str) -> subprocess.Popen:
    """``leank ARGS`` in a fresh process whose ``target`` (module:Class.method or module:function)
    sleeps first, so a signal lands mid-run on any machine."""
    module, attr = target.split(":")
    code = (
        # A runner started in the background (`cmd &` without job control) ignores SIGINT, and so would the
        # child (Python keeps an inherited SIG_IGN): restore the default handler, as in a terminal.
        "import signal, sys, time, importlib\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"mod = importlib.import_module({module!r})\n"
        f"owner, name = ({'getattr(mod, ' + repr(attr.split('.')[0]) + ')' if '.' in attr else 'mod'}, "
        f"{attr.split('.')[-1]!r})\n"
        "orig = getattr(owner, name)\n"
        "def slow(*a, **k):\n"
        f"    time.sleep({seconds_per_step})\n"
        "    return orig(*a, **k)\n"
        "setattr(owner, name, slow)\n"
        "from leank.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *(str(a) for a in args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the process ended before the signal ({proc.returncode}): {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run did not get far enough in time")
        time.sleep(0.05)


def log_steps(out: Path, stage: str = "stage1") -> list[int]:
    """Steps of ``stage`` in log.jsonl; a line torn by a kill mid-write is skipped."""
    path = out / "log.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [r["step"] for r in records if r["stage"] == stage]


@pytest.mark.slow
def test_train_sigkill_then_resume(tiny_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    args = train_argv(tiny_dir, out, "--steps1", "12", "--steps2", "2")
    proc = slow_cli(args, 0.15, "leank.train.trainer:Trainer._sample_loss")
    wait_for(lambda: len(log_steps(out)) >= 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = log_steps(out)
    assert 3 <= len(done) < 12 and not (out / "summary.json").exists()
    # the same command without --resume explains what to do
    rc, _, err = run(args, capsys)
    error_line(rc, err, "train", "already holds a run", "--resume")
    # a kill can land mid-write: a torn last log line and a checkpoint temporary must not stop the resume
    with open(out / "log.jsonl", "a") as f:
        f.write('{"stage": "stage1", "st')
    (out / "checkpoints" / ".stage1.pt.abc123.tmp").write_bytes(b"\0" * 10)
    rc, _, err = run([*args, "--resume"], capsys)
    assert rc == 0, err
    assert log_steps(out) == list(range(12))  # finished steps kept, none logged twice
    assert not list(out.rglob("*.tmp"))  # leftovers of the kill removed
    assert ChannelMask.load(out / "mask-0.75.safetensors").sparsity < 1


@pytest.mark.slow
def test_eval_sigint_then_rerun(tiny_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "eval"
    args = eval_argv(tiny_dir, out, "--methods", "full", "think:0.5")
    proc = slow_cli(args, 0.5, "leank.eval.runner:generate_batch")
    first = out / "full" / "vt" / "900" / "metrics.json"
    wait_for(first.is_file, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert not list(out.rglob("*.tmp"))
    kept = first.read_text()
    rc, stdout, err = run(args, capsys)
    assert rc == 0, err
    assert first.read_text() == kept  # the finished run was not redone
    assert (out / "think-0.5" / "vt" / "900" / "metrics.json").is_file() and (out / "report.md").is_file()


# ---- eval and report -----------------------------------------------------------------------


def eval_argv(model_dir, out, *extra) -> list:
    return ["eval", "--model", model_dir, "--methods", "full", "--tasks", "vt", "--lengths", "900", "--samples",
            "2", "--batch-size", "2", "--device", "cpu", "--out", out, *extra]


@pytest.fixture
def fake_generation(monkeypatch):
    """Answers without running generate(): for tests about files, not about decoding."""
    from leank.eval import runner

    def fake(model, tokenizer, method, prompts, max_new_tokens):
        return ["42"] * len(prompts), (len(prompts), 2 * len(prompts)), 0.0

    monkeypatch.setattr(runner, "generate_batch", fake)


def test_eval_refuses_another_models_results(no_model_load, tiny_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "eval"
    other = out / "full" / "vt" / "900" / "metrics.json"
    other.parent.mkdir(parents=True)
    settings = {"model": "other-model", "dtype": "float32", "samples": 2, "seed": 0, "source": "generated",
                "method": {"kind": "full"}}
    other.write_text(json.dumps({"settings": settings}))
    before = listing(out)
    rc, _, err = run(eval_argv(tiny_dir, out), capsys)
    error_line(rc, err, "eval", "other-model", "another --out")
    # same model, other generation settings: refused too
    settings["model"] = str(tiny_dir)
    other.write_text(json.dumps({"settings": settings}))
    rc, _, err = run(eval_argv(tiny_dir, out, "--seed", "1"), capsys)
    error_line(rc, err, "eval", "seed 0", "seed 1")
    rc, _, err = run(eval_argv(tiny_dir, out, "--dtype", "bfloat16"), capsys)
    error_line(rc, err, "eval", "dtype 'float32'")
    assert listing(out) == before


def test_eval_refuses_bad_settings_before_loading(no_model_load, tiny_dir, tmp_path, unwritable, capsys):  # noqa: F811
    out = tmp_path / "eval"
    for extra, message in [(["--tasks", "niah_single_1", "--lengths", "50"], "leaves no room for a prompt"),
                           (["--samples", "0"], "samples must be a positive integer"),
                           (["--methods", "leank:/nonexistent.safetensors"], "needs an existing mask file"),
                           (["--methods", "magnitude:1.5"], "sparsity must be in [0, 1)")]:
        rc, _, err = run(eval_argv(tiny_dir, out, *extra), capsys)
        error_line(rc, err, "eval", message)
    rc, _, err = run(eval_argv(tiny_dir, unwritable / "eval"), capsys)
    error_line(rc, err, "eval", str(unwritable))
    assert not out.exists()


def test_eval_without_matplotlib_writes_results_and_report(no_matplotlib, tiny_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "eval"
    rc, stdout, err = run(eval_argv(tiny_dir, out), capsys)
    assert rc == 0, err
    assert "note: plots skipped: matplotlib is not installed" in stdout
    assert (out / "results.json").is_file() and (out / "full" / "vt" / "900" / "metrics.json").is_file()
    report = (out / "report.md").read_text()
    assert "| vt |" in report and ".png" not in report
    assert not list(out.glob("*.png"))


def test_eval_write_failure_is_one_line_and_rerun_completes(fake_generation, tiny_dir, tmp_path, capsys,  # noqa: F811
                                                            monkeypatch):
    out = tmp_path / "eval"
    real_replace = os.replace

    def disk_full(src, dst):
        if Path(dst).name == "metrics.json" and "think" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", disk_full)
    args = eval_argv(tiny_dir, out, "--methods", "full", "think:0.5")
    rc, _, err = run(args, capsys)
    error_line(rc, err, "eval", "cannot write", "think-0.5/vt/900/metrics.json", "No space left on device")
    assert not list(out.rglob("*.tmp"))
    finished = (out / "full" / "vt" / "900" / "metrics.json").read_text()
    monkeypatch.setattr(os, "replace", real_replace)
    rc, _, err = run(args, capsys)
    assert rc == 0, err
    assert (out / "full" / "vt" / "900" / "metrics.json").read_text() == finished  # kept, not redone
    assert (out / "think-0.5" / "vt" / "900" / "metrics.json").is_file()


def write_fake_results(root: Path) -> None:
    from .eval.conftest import fake_metrics

    for method, score in (("full", 90.0), ("think:0.7", 20.0)):
        path = root / method.replace(":", "-") / "vt" / "4096" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(fake_metrics(method, "vt", 4096, score, sparsity=0.7 if ":" in method else 0.0)))


def test_report_without_matplotlib(no_matplotlib, tmp_path, capsys):
    write_fake_results(tmp_path / "r")
    rc, stdout, err = run(["report", tmp_path / "r"], capsys)
    assert rc == 0, err
    assert "note: plots skipped" in stdout
    assert (tmp_path / "r" / "report.md").is_file() and not list((tmp_path / "r").glob("*.png"))


def test_report_bad_directories(tmp_path, capsys):
    rc, _, err = run(["report", tmp_path / "nope"], capsys)
    error_line(rc, err, "report", "does not exist")
    (tmp_path / "empty").mkdir()
    rc, _, err = run(["report", tmp_path / "empty"], capsys)
    error_line(rc, err, "report", "holds no finished runs")
    write_fake_results(tmp_path / "r")
    bad = tmp_path / "r" / "full" / "vt" / "4096" / "metrics.json"
    for text, message in [("{not json", "is not valid JSON"), ("{}", "is not a result of `leank eval`"),
                          ("[1, 2]", "is not a result of `leank eval`")]:
        bad.write_text(text)
        rc, _, err = run(["report", tmp_path / "r"], capsys)
        error_line(rc, err, "report", message, "delete it")
    bad.unlink()
    (tmp_path / "r" / "agreement.json").write_text("{trunc")
    rc, _, err = run(["report", tmp_path / "r"], capsys)
    error_line(rc, err, "report", "agreement.json is not valid JSON")


def test_report_unwritable(tmp_path, capsys, monkeypatch):
    write_fake_results(tmp_path / "r")
    real_replace = os.replace

    def read_only(src, dst):
        if Path(dst).name == "report.md":
            raise OSError(errno.EROFS, "Read-only file system")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", read_only)
    rc, _, err = run(["report", tmp_path / "r"], capsys)
    error_line(rc, err, "report", "report.md", "Read-only file system")


# ---- analyze -------------------------------------------------------------------------------


def tied_alpha(path: Path) -> None:
    # 60% of α clamped to exactly 0 (ties), the rest spread: asked for 50%, 50% must be pruned.
    alpha = torch.zeros(2, 2, 16)
    alpha.view(-1)[:26] = torch.linspace(0.2, 1.0, 26)
    save_file({"alpha": alpha}, str(path))


def test_analyze_alpha_with_ties_hits_the_sparsity(no_matplotlib, tmp_path, capsys):  # figures: not the subject
    tied_alpha(tmp_path / "alpha.safetensors")
    for sparsity in ("0.5", "0.3"):
        rc, stdout, err = run(["analyze", tmp_path / "alpha.safetensors", "--sparsity", sparsity, "--align", "1",
                               "--out", tmp_path / f"an{sparsity}"], capsys)
        assert rc == 0, err
        reported = json.loads((tmp_path / f"an{sparsity}" / "analysis.json").read_text())["mask"]["sparsity"]
        assert reported == pytest.approx(float(sparsity), abs=0.5 / 64)


def test_analyze_without_matplotlib(no_matplotlib, tmp_path, capsys):
    tied_alpha(tmp_path / "alpha.safetensors")
    rc, stdout, err = run(["analyze", tmp_path / "alpha.safetensors", "--align", "4", "--out", tmp_path / "an"],
                          capsys)
    assert rc == 0, err
    assert "note: figures skipped" in stdout
    assert listing(tmp_path / "an") == ["analysis.json", "analysis.md"]


def test_analyze_bad_input(tmp_path, unwritable, capsys):
    files = bad_mask_files(tmp_path)
    for name in ("empty", "truncated", "text"):
        rc, _, err = run(["analyze", files[name][0], "--out", tmp_path / "an"], capsys)
        error_line(rc, err, "analyze", "not a valid .safetensors")
    nan = torch.rand(2, 2, 16)
    nan[0, 0, 0] = float("nan")
    save_file({"alpha": nan}, str(tmp_path / "nan.safetensors"))
    rc, _, err = run(["analyze", tmp_path / "nan.safetensors", "--out", tmp_path / "an"], capsys)
    error_line(rc, err, "analyze", "non-finite 1")
    tied_alpha(tmp_path / "alpha.safetensors")
    rc, _, err = run(["analyze", tmp_path / "alpha.safetensors", "--sparsity", "1.0", "--out", tmp_path / "an"],
                     capsys)
    error_line(rc, err, "analyze", r"sparsity must be in [0, 1)")
    rc, _, err = run(["analyze", tmp_path / "alpha.safetensors", "--compare", AUTHORS_MASK, "--out",
                      tmp_path / "an"], capsys)
    error_line(rc, err, "analyze", "shape")
    rc, _, err = run(["analyze", tmp_path / "alpha.safetensors", "--out", unwritable / "an"], capsys)
    error_line(rc, err, "analyze", str(unwritable))
    assert not (tmp_path / "an").exists()


# ---- files and directories -----------------------------------------------------------------


def test_atomic_writes_follow_the_umask(tmp_path):
    from leank._io import atomic_write_text, make_shared_tempdir

    old = os.umask(0o002)
    try:
        path = atomic_write_text(tmp_path / "new" / "a.txt", "x")
        mask_path = ChannelMask.full(1, 1, 4).save(tmp_path / "m.safetensors")
        directory = make_shared_tempdir(".conv.", tmp_path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o664  # what open() would give, not tempfile's 0600
    assert mask_path.stat().st_mode & 0o777 == 0o664
    assert directory.stat().st_mode & 0o777 == 0o775  # not mkdtemp's 0700
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o775


def test_write_failures_name_the_path(tmp_path):
    from leank._io import atomic_write_text, check_writable_dir

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(leank.LeanKError, match=f"{blocker} is a file, not a directory") as e:
        atomic_write_text(blocker / "sub" / "a.txt", "x")
    assert "\n" not in str(e.value)
    with pytest.raises(leank.LeanKError, match=f"output directory {blocker} is not a directory"):
        check_writable_dir(blocker)
    with pytest.raises(leank.LeanKError, match=f"{blocker} is a file"):
        check_writable_dir(blocker / "a" / "b")
    check_writable_dir(tmp_path / "x" / "y")
    assert not (tmp_path / "x").exists()  # a check creates nothing


# ---- the command line itself ---------------------------------------------------------------


def test_help_does_not_import_torch():
    # leank/__init__.py imports torch for the public API; the parser itself must not, so load
    # leank.cli without running the package's __init__ and see what got imported.
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('leank'); pkg.__path__ = [{str(ROOT / 'leank')!r}]; sys.modules['leank'] = pkg\n"
        "from leank.cli import build_parser\n"
        "text = build_parser(None).format_help()\n"
        "assert all(c in text for c in ('demo', 'train', 'eval', 'report', 'analyze', 'bench')), text\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'safetensors') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_command_parses_in_the_lazy_parser():
    from leank.cli import LAZY_COMMANDS, build_parser

    for name in LAZY_COMMANDS:
        parser = build_parser(name)
        assert parser._subparsers._group_actions[0].choices[name].get_default("run") is not None

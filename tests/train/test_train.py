"""Mask training on CPU with a tiny random model and the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import leank
from leank.errors import LeanKError
from leank.masks import ChannelMask
from leank.train import TrainConfig, train
from leank.train.distill import binary_scale, distill_loss, prompt_cache

from ..conftest import tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer (vocabulary and chat template), saved to disk."""
    try:
        tokenizer = leank.load_tokenizer("smollm2-135m")
    except LeanKError as e:
        pytest.skip(str(e))
    path = tmp_path_factory.mktemp("tiny")
    model = tiny_model("llama", layers=2, kv_heads=2, groups=2, head_dim=16, vocab=len(tokenizer), qk_gain=3.0)
    model.config.max_position_embeddings = 1024
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def config(tiny_dir, out, **kw) -> TrainConfig:
    base = dict(model=str(tiny_dir), out=str(out), sparsities=(0.75,), alignment=4, sink=4, recent=8,
                min_length=300, max_length=420, stage1_steps=6, stage2_steps=4, device="cpu", dtype="float32",
                workers=0, checkpoint_every=2, validation_samples=2)
    base.update(kw)
    return TrainConfig(**base)


def a_sample(tiny_dir):
    from leank.data.training import TrainDataConfig, TrainSampler

    tok = leank.load_tokenizer(str(tiny_dir))
    return TrainSampler(tok, TrainDataConfig(min_length=200, max_length=220, seed=3)).sample_at(0)


def test_loss_zero_at_alpha_one_and_decreases_when_pruned(tiny_dir):
    model, _ = leank.load_model(str(tiny_dir), device="cpu")
    model.requires_grad_(False)
    s = a_sample(tiny_dir)
    ids = s.input_ids[None]
    kw = dict(sink=4, recent=8)
    ones = torch.ones(2, 2, 16)
    assert distill_loss(model, ids, s.context_end, s.answer_mask, ones, **kw).item() == 0.0
    alpha = torch.full((2, 2, 16), 0.2, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = distill_loss(model, ids, s.context_end, s.answer_mask, alpha, **kw)
        loss.backward()
        opt.step()
        with torch.no_grad():
            alpha.clamp_(0, 1)
        losses.append(loss.item())
    assert losses[0] > 1e-4
    assert losses[-1] < 0.5 * losses[0], losses


def test_binary_scale_is_straight_through():
    alpha = torch.rand(3, 2, 16, requires_grad=True)
    scale, empty = binary_scale(alpha, 0.7, 4)
    mask = leank.binarize(alpha.detach(), sparsity=0.7, alignment=4)
    assert torch.equal(scale.detach() == 1, mask.kept)
    assert torch.equal(empty, mask.kept_counts == 0)
    (scale * torch.arange(96.0).view(3, 2, 16)).sum().backward()
    assert torch.equal(alpha.grad, torch.arange(96.0).view(3, 2, 16))


def test_two_stages_end_to_end(tiny_dir, tmp_path):
    cfg = config(tiny_dir, tmp_path / "run", sparsities=(0.5, 0.75))
    summary = train(cfg, progress=False)
    for sparsity in (0.5, 0.75):
        mask = ChannelMask.load(tmp_path / "run" / f"mask-{sparsity:.2f}.safetensors")
        counts = mask.kept_counts
        assert (counts % 4 == 0).all()
        # the target up to rounding each head's count to the alignment (2 of 16 channels per head at most)
        assert abs(mask.sparsity - sparsity) <= 2 / 16 + 1e-9
        assert (mask.method, mask.sink, mask.recent, mask.alignment) == ("leank", 4, 8, 4)
        assert summary["stages"][f"stage2-{sparsity:.2f}"]["sparsity"] == pytest.approx(mask.sparsity)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == "stage1"] == list(range(6))
    assert {"loss", "distill", "reg", "sparsity"} <= set(log[0])
    alpha = load_file(str(tmp_path / "run" / "alpha.safetensors"))["alpha"]
    assert alpha.shape == (2, 2, 16) and alpha.min() >= 0 and alpha.max() <= 1 and alpha.mean() < 1
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0 and (tmp_path / "run" / "alpha.png").exists()


def test_killed_and_resumed_equals_uninterrupted(tiny_dir, tmp_path, monkeypatch):
    from leank.train import trainer as trainer_mod

    train(config(tiny_dir, tmp_path / "a"), progress=False)

    calls = {"n": 0}
    original = trainer_mod.Trainer._sample_loss

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # killed during stage-1 step 3 (checkpoint at step 2)
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_mod.Trainer, "_sample_loss", dying)
    monkeypatch.setattr(trainer_mod.Trainer, "check_memory", lambda self: {})  # count training samples only
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_dir, tmp_path / "b"), progress=False)
    assert (tmp_path / "b" / "checkpoints" / "stage1.pt").exists()  # killed after the step-2 checkpoint
    monkeypatch.undo()
    with pytest.raises(LeanKError, match="pass --resume"):
        train(config(tiny_dir, tmp_path / "b"), progress=False)
    # the killed process's time on stage 1 is in the checkpoint (made large here, so that the resumed
    # process alone cannot reach it) and counts in the resumed run's summary
    ckpt = tmp_path / "b" / "checkpoints" / "stage1.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["seconds"] > 0
    torch.save({**state, "seconds": 1000.0}, ckpt)
    summary_b = train(config(tiny_dir, tmp_path / "b"), resume=True, progress=False)
    assert summary_b["resumed"] and 1000 <= summary_b["stages"]["stage1"]["seconds"] < 1000 + 600
    assert summary_b["seconds_total"] >= 1000
    assert not json.loads((tmp_path / "a" / "summary.json").read_text())["resumed"]

    a = load_file(str(tmp_path / "a" / "alpha.safetensors"))["alpha"]
    b = load_file(str(tmp_path / "b" / "alpha.safetensors"))["alpha"]
    assert torch.equal(a, b)
    ma = ChannelMask.load(tmp_path / "a" / "mask-0.75.safetensors").kept
    mb = ChannelMask.load(tmp_path / "b" / "mask-0.75.safetensors").kept
    assert torch.equal(ma, mb)
    steps_b = [json.loads(x)["step"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()
               if json.loads(x)["stage"] == "stage1"]
    assert steps_b == list(range(6))  # no step logged twice


def test_stage2_from_a_given_stage1_equals_the_two_stage_run(tiny_dir, tmp_path, monkeypatch):
    """``--stage1-alpha``: stage 2 started from an earlier run's α gives that run's masks bit for bit,
    and runs no stage-1 step."""
    full = train(config(tiny_dir, tmp_path / "full", sparsities=(0.5, 0.75)), progress=False)
    from leank.train import trainer as trainer_mod

    stages = []
    original = trainer_mod.Trainer.run_stage
    monkeypatch.setattr(trainer_mod.Trainer, "run_stage",
                        lambda self, stage, *a, **kw: stages.append(stage) or original(self, stage, *a, **kw))
    given = tmp_path / "full" / "alpha.safetensors"
    part = train(config(tiny_dir, tmp_path / "part", sparsities=(0.5, 0.75), stage1_alpha=str(given)), progress=False)
    assert stages == ["stage2-0.50", "stage2-0.75"]
    for sparsity in (0.5, 0.75):
        name = f"mask-{sparsity:.2f}.safetensors"
        kept = [ChannelMask.load(tmp_path / run / name).kept for run in ("full", "part")]
        assert torch.equal(*kept)
        key = f"stage2-{sparsity:.2f}"
        assert part["stages"][key]["validation_distill_after"] == full["stages"][key]["validation_distill_after"]
    assert torch.equal(load_file(str(given))["alpha"], load_file(str(tmp_path / "part" / "alpha.safetensors"))["alpha"])
    assert part["stages"]["stage1"]["given"] == str(given)
    # provenance: the masks name the given α and carry the stage-1 settings recorded with it
    info = ChannelMask.load(tmp_path / "part" / "mask-0.75.safetensors").info
    assert info["stage1_alpha"] == str(given)
    assert (int(info["stage1_steps"]), float(info["reg"])) == (6, config(tiny_dir, tmp_path).reg)


@pytest.mark.slow
def test_stage2_keep_takes_stage1_alpha_when_stage2_raised_the_validation_loss(tiny_dir, tmp_path, monkeypatch):
    """``stage2_keep="best"``: the mask comes from stage 2's α unless stage 2 raised the binarised
    mask's held-out loss, then from stage 1's α binarised; ``"last"`` always takes stage 2's."""
    from leank.masks import binarize
    from leank.train import trainer as trainer_mod

    base = config(tiny_dir, tmp_path / "base", lr2=0.5, stage2_keep="last")
    train(base, progress=False)
    given = tmp_path / "base" / "alpha.safetensors"
    stage1 = binarize(load_file(str(given))["alpha"], sparsity=0.75, alignment=4).kept
    stage2 = ChannelMask.load(tmp_path / "base" / "mask-0.75.safetensors").kept
    assert not torch.equal(stage1, stage2)  # stage 2 moved the mask, so the choice below is visible
    nan = float("nan")
    for case, (keep, (before, after), want) in enumerate([("best", (1.0, 2.0), stage1), ("best", (2.0, 1.0), stage2),
                                        ("best", (1.0, 1.0), stage2), ("best", (1.0, nan), stage1),
                                        ("best", (nan, 1.0), stage2), ("last", (1.0, 2.0), stage2)]):
        losses = iter((before, after))
        monkeypatch.setattr(trainer_mod.Trainer, "validation_loss",
                            lambda self, alpha, sparsity, losses=losses: 0.5 if sparsity is None else next(losses))
        out = tmp_path / f"case{case}"
        summary = train(config(tiny_dir, out, lr2=0.5, stage2_keep=keep, stage1_alpha=str(given)), progress=False)
        mask = ChannelMask.load(out / "mask-0.75.safetensors")
        assert torch.equal(mask.kept, want), (keep, before, after)
        from_stage2 = want is stage2
        assert summary["stages"]["stage2-0.75"]["mask_from"] == ("stage 2" if from_stage2 else "stage 1")
        assert summary["stages"]["stage2-0.75"]["stage1_binarised_sparsity"] == pytest.approx(
            ChannelMask(stage1, sink=4, recent=8).sparsity)
        chosen = float(mask.info["validation_distill"])
        assert chosen == (after if from_stage2 else before) or math.isnan(chosen) and math.isnan(before)
    with pytest.raises(LeanKError, match="stage2_keep must be one of best, last"):
        config(tiny_dir, tmp_path / "x", stage2_keep="first")
    assert TrainConfig().stage2_keep == "last"  # the paper's recipe stays the default (CLI: same default)
    from leank.cli import build_parser

    args = build_parser().parse_args(["train", "--out", "x"])
    assert args.stage2_keep == "last"


def test_a_bad_stage1_alpha_is_refused_before_training(tiny_dir, tmp_path):
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"alpha": torch.rand(3, 2, 16)}, str(wrong), metadata={"model": str(tiny_dir)})
    with pytest.raises(LeanKError, match=r"shape \(3, 2, 16\), but .* needs \(2, 2, 16\)"):
        train(config(tiny_dir, tmp_path / "a", stage1_alpha=str(wrong)), progress=False)
    other = tmp_path / "other.safetensors"
    save_file({"alpha": torch.rand(2, 2, 16)}, str(other), metadata={"model": "smollm2-135m"})
    with pytest.raises(LeanKError, match="stage-1 α of model 'smollm2-135m'"):
        train(config(tiny_dir, tmp_path / "b", stage1_alpha=str(other)), progress=False)
    with pytest.raises(LeanKError, match="no such file"):
        train(config(tiny_dir, tmp_path / "c", stage1_alpha=str(tmp_path / "missing.safetensors")), progress=False)
    with pytest.raises(LeanKError, match="no such file"):
        train(config(tiny_dir, tmp_path / "d", stage1_alpha=str(tmp_path)), progress=False)  # a directory
    mask = tmp_path / "mask.safetensors"
    save_file({"kept": torch.ones(2, 2, 16, dtype=torch.bool)}, str(mask))
    with pytest.raises(LeanKError, match="holds no tensor 'alpha' \\(kept\\).*not a mask"):
        train(config(tiny_dir, tmp_path / "e", stage1_alpha=str(mask)), progress=False)
    ints = tmp_path / "ints.safetensors"
    save_file({"alpha": torch.ones(2, 2, 16, dtype=torch.int64)}, str(ints))
    with pytest.raises(LeanKError, match="finite floating-point values, got torch.int64"):
        train(config(tiny_dir, tmp_path / "f", stage1_alpha=str(ints)), progress=False)
    assert not any((tmp_path / d / "config.json").exists() for d in "abcdef")  # no run started


def test_resume_with_other_config_refused(tiny_dir, tmp_path):
    train(config(tiny_dir, tmp_path / "r", stage1_steps=2, stage2_steps=1), progress=False)
    with pytest.raises(LeanKError, match="different reg"):
        train(config(tiny_dir, tmp_path / "r", stage1_steps=2, stage2_steps=1, reg=0.5), resume=True, progress=False)


def test_bad_training_input(tiny_dir, tmp_path):
    with pytest.raises(LeanKError, match=r"sparsity must be in \[0, 1\)"):
        config(tiny_dir, tmp_path, sparsities=(1.0,))
    with pytest.raises(LeanKError, match="does not divide head_dim"):
        train(config(tiny_dir, tmp_path / "x", alignment=5), progress=False)
    with pytest.raises(LeanKError, match="exceeds the model's maximum context"):
        train(config(tiny_dir, tmp_path / "y", max_length=5000), progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LeanKError, match="corpus"):
        train(config(tiny_dir, tmp_path / "z", corpus=str(empty)), progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(LeanKError, match="needs a CUDA GPU"):
            train(config(tiny_dir, tmp_path / "g", device="cuda"), progress=False)


def test_trainer_trains_through_the_static_region(tiny_dir, tmp_path, monkeypatch):
    """With graphs on (here the same padded passes run eagerly: the CPU cannot capture), every training and
    validation sample goes through the region, and the run learns the eager run's α within rounding
    (batch 2 and both stages: a backward per sample) — and records what it used."""
    import leank.train.trainer as trainer_module
    from leank.train.graphs import StaticRegion

    calls = []

    class Counting(StaticRegion):
        def __call__(self, *a, **k):
            calls.append(1)
            return super().__call__(*a, **k)

    monkeypatch.setattr(trainer_module.Trainer, "_static_region", lambda self: Counting(
        self.model, sink=4, recent=8, capture=False, prompt_bucket=64, query_bucket=16))
    graphed = train(config(tiny_dir, tmp_path / "g", batch=2), progress=False)
    monkeypatch.undo()
    eager = train(config(tiny_dir, tmp_path / "e", batch=2), progress=False)
    # memory check (2 passes) + 2 × (6 + 4) training samples + validation (2 samples × 3 passes)
    assert len(calls) == 2 + 20 + 6
    assert graphed["cuda_graphs"] is True and eager["cuda_graphs"] is False
    a, b = (load_file(str(tmp_path / r / "alpha.safetensors"))["alpha"] for r in ("g", "e"))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not torch.equal(a, torch.ones_like(a))


def test_loss_reads_the_rows_that_predict_answer_tokens():
    """The loss against an independent computation: the model's own forward (its attention, every key in full)
    gives the teacher's hidden states; the student's with α = 0 on middle keys is the same code path's; the
    relative MSE is taken over exactly the positions whose next token is an answer token."""
    from leank.train.distill import decode_hidden, prompt_cache

    model = tiny_model("llama", layers=2, head_dim=16, qk_gain=3.0)
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids = torch.randint(3, 97, (1, 64), generator=gen)
    with torch.no_grad():
        own = model.model(input_ids=ids).last_hidden_state[0]
    leank.enable(model)
    answer = torch.zeros(64, dtype=torch.bool)
    start = int(torch.randint(45, 60, (1,), generator=gen))
    answer[start:] = True
    scale = torch.rand(leank.masks.kv_shape(model.config), generator=gen)
    with torch.no_grad():
        student = decode_hidden(model, ids, prompt_cache(model, ids, 40), scale, sink=4, recent=8)[0]
        loss = distill_loss(model, ids, 40, answer, scale, sink=4, recent=8)
    rows = list(range(start - 1, 63))  # position p predicts token p + 1
    s, t = student[[r - 40 for r in rows]].double(), own[rows].double()
    expect = ((s - t) ** 2).mean() / (t**2).mean()
    torch.testing.assert_close(loss.double(), expect, rtol=1e-4, atol=0)


def test_every_architecture_trains(arch):
    """Both stages' objective on each architecture: at α = 1 the decode-region hidden states
    equal the model's own forward (its default attention and masks: sliding windows,
    soft-capping, sinks), and a few stage-1 (continuous α) and stage-2 (straight-through
    binary) steps give finite gradients on the compressed layers' α only."""
    from leank.masks import kv_shape
    from leank.train.distill import decode_hidden, prompt_cache

    model = tiny_model(arch, layers=2, head_dim=96 if arch == "phi3" else 16, qk_gain=3.0)
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids = torch.randint(3, 97, (1, 60), generator=gen)
    context_end = 40
    with torch.no_grad():
        own = model.model(input_ids=ids).last_hidden_state[:, context_end:]
    leank.enable(model)
    shape = kv_shape(model.config)
    prompt = prompt_cache(model, ids, context_end)
    with torch.no_grad():
        ours = decode_hidden(model, ids, prompt, torch.ones(shape), sink=4, recent=8)
    torch.testing.assert_close(ours, own, atol=1e-5, rtol=1e-5)

    answer = torch.zeros(60, dtype=torch.bool)
    answer[50:] = True
    alpha = torch.full(shape, 0.5, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=0.05)
    for stage in (1, 1, 2, 2):
        opt.zero_grad()
        scale, empty = (alpha, None) if stage == 1 else binary_scale(alpha, 0.5, 4)
        loss = distill_loss(model, ids, context_end, answer, scale, sink=4, recent=8, empty_heads=empty)
        (loss + 0.06 * alpha.abs().mean() * (stage == 1)).backward()
        assert torch.isfinite(alpha.grad).all() and alpha.grad.abs().sum() > 0
        opt.step()
        with torch.no_grad():
            alpha.clamp_(0, 1)


def test_hybrid_model_two_stages_end_to_end(tmp_path):
    """``leank train`` on a hybrid model (Gemma 2: sliding, full, sliding, full): α and the
    masks cover the full-attention layers only, and the masks record which those are."""
    try:
        tokenizer = leank.load_tokenizer("smollm2-135m")
    except LeanKError as e:
        pytest.skip(str(e))
    model = tiny_model("gemma2", layers=4, vocab=len(tokenizer), qk_gain=3.0)
    model.save_pretrained(tmp_path / "gemma2")
    tokenizer.save_pretrained(tmp_path / "gemma2")
    cfg = config(tmp_path / "gemma2", tmp_path / "run", stage1_steps=2, stage2_steps=2, checkpoint_every=10,
                 validation_samples=1)
    train(cfg, progress=False)
    mask = ChannelMask.load(tmp_path / "run" / "mask-0.75.safetensors")
    assert mask.layers == (1, 3) and mask.kept.shape == (2, 2, 16)
    assert load_file(str(tmp_path / "run" / "alpha.safetensors"))["alpha"].shape == (2, 2, 16)
    model, _ = leank.load_model(str(tmp_path / "gemma2"), device="cpu")
    cache = leank.LeanKCache(model, mask)
    assert cache.compressed == (1, 3)


def _saved_bytes(fn, held: set[int]):
    """``fn()`` and the bytes of the distinct tensors autograd keeps for its backward pass, not
    counting storages in ``held`` (tensors that live on anyway, e.g. the prompt cache)."""
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in held:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved.values())


@pytest.mark.parametrize("binary", [False, True], ids=["stage1", "stage2"])
def test_recompute_gives_the_same_loss_and_gradient_with_less_kept(tiny_dir, binary):
    """Recomputing each layer's attention in the backward pass (the default) is the same
    arithmetic: loss and α's gradient are bit-identical to keeping the activations, and
    autograd keeps fewer bytes."""
    model, _ = leank.load_model(str(tiny_dir), device="cpu")
    model.requires_grad_(False)
    s = a_sample(tiny_dir)
    init = torch.rand(2, 2, 16, generator=torch.Generator().manual_seed(torch.seed() % 2**31))
    prompt = prompt_cache(model, s.input_ids[None], s.context_end)
    held = {t.untyped_storage().data_ptr() for layer in prompt.layers for t in (layer.keys, layer.values)}
    results = []
    for recompute in (False, True):
        alpha = init.clone().requires_grad_(True)
        scale, empty = binary_scale(alpha, 0.75, 4) if binary else (alpha, None)
        loss, kept = _saved_bytes(lambda scale=scale, empty=empty, recompute=recompute: distill_loss(
            model, s.input_ids[None], s.context_end, s.answer_mask, scale, sink=4, recent=8, empty_heads=empty,
            prompt=prompt, checkpoint=recompute), held)
        loss.backward()
        results.append((loss.detach(), alpha.grad, kept))
    (loss0, grad0, kept0), (loss1, grad1, kept1) = results
    assert loss0.item() > 0 and grad0.abs().sum() > 0
    assert torch.equal(loss0, loss1) and torch.equal(grad0, grad1)
    assert kept1 < kept0 / 2, (kept0, kept1)


def test_memory_check_refuses_a_context_that_does_not_fit_before_the_run(tiny_dir, tmp_path, monkeypatch):
    """Before the first step (and before the run directory holds a run) a max_length sample is
    tried; running out of memory there names the knob, and nothing is left to resume."""
    import leank.train.trainer as trainer_module

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(trainer_module, "distill_loss", oom)
    with pytest.raises(LeanKError, match=r"420-token sample: lower --max-length"):
        train(config(tiny_dir, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "config.json").exists()

    class OomInBackward(torch.autograd.Function):  # the backward pass is where recomputation peaks
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    real = trainer_module.distill_loss
    monkeypatch.setattr(trainer_module, "distill_loss", lambda *a, **k: OomInBackward.apply(real(*a, **k)))
    with pytest.raises(LeanKError, match=r"420-token sample: lower --max-length"):
        train(config(tiny_dir, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "config.json").exists()
    monkeypatch.undo()
    summary = train(config(tiny_dir, tmp_path / "run"), progress=False)  # the same --out works afterwards
    assert summary["memory_check"]["tokens"] == 420


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_prompt_pass_padded_to_a_bucket_gives_the_unpadded_kv(arch):
    """The prompt pass padded at its end to a multiple of ``bucket`` tokens (what a GPU runs, so that
    cuDNN attention reuses its graph across samples): the K/V cut back to the prompt equal the
    unpadded pass's up to rounding, and so do the loss and α's gradient; a model with sliding-window
    layers (Gemma 2) and a prompt the padding would take past the model's context run unpadded."""
    model = tiny_model(arch, layers=2, head_dim=16, qk_gain=3.0)
    model.requires_grad_(False)
    leank.enable(model)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids = torch.randint(3, 97, (1, 70), generator=gen)
    context_end = int(torch.randint(33, 60, (1,), generator=gen))
    plain = prompt_cache(model, ids, context_end, bucket=1)
    padded = prompt_cache(model, ids, context_end, bucket=32)
    assert plain.get_seq_length() == padded.get_seq_length() == context_end
    for a, b in zip(plain.layers, padded.layers, strict=True):
        if arch == "gemma2":  # not padded: the very same computation
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        torch.testing.assert_close(b.keys, a.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=1e-5)
    answer = torch.zeros(70, dtype=torch.bool)
    answer[62:] = True
    shape = leank.masks.kv_shape(model.config)
    grads = []
    for prompt in (plain, padded):
        alpha = torch.rand(shape, generator=gen.manual_seed(1)).requires_grad_(True)
        loss = distill_loss(model, ids, context_end, answer, alpha, sink=4, recent=8, prompt=prompt)
        loss.backward()
        grads.append((loss.detach(), alpha.grad))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)
    assert grads[0][1].abs().sum() > 0
    # past the model's context (1024 positions in these models): unpadded
    model.config.max_position_embeddings = context_end + 1
    near = prompt_cache(model, ids, context_end, bucket=32)
    for a, b in zip(plain.layers, near.layers, strict=True):
        assert torch.equal(a.keys, b.keys)


@pytest.mark.parametrize("rope", ["longrope", "dynamic"])
def test_prompt_pass_is_not_padded_when_rope_follows_the_length(rope):
    """LongRoPE switches every position's frequencies when the pass passes a threshold, dynamic NTK
    rescales them past the trained length: padding the prompt pass there would change its K, so such
    models run it unpadded (the same K/V bit for bit), even when the padding crosses the threshold."""
    import transformers

    head_dim, threshold = 16, 50
    params = (dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=threshold,
                   short_factor=[1.0] * (head_dim // 2), long_factor=[4.0] * (head_dim // 2))
              if rope == "longrope" else dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))
    cls_config, cls_model = ((transformers.Phi3Config, transformers.Phi3ForCausalLM) if rope == "longrope"
                             else (transformers.LlamaConfig, transformers.LlamaForCausalLM))
    config = cls_config(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, pad_token_id=0,
                        eos_token_id=1, bos_token_id=2, tie_word_embeddings=False,
                        max_position_embeddings=1024 if rope == "longrope" else threshold,
                        original_max_position_embeddings=threshold, rope_parameters=params)
    config._attn_implementation = "sdpa"
    model = cls_model(config).eval()
    model.requires_grad_(False)
    leank.enable(model)
    ids = torch.randint(3, 97, (1, 70), generator=torch.Generator().manual_seed(torch.seed() % 2**31))
    plain = prompt_cache(model, ids, 40, bucket=1)
    padded = prompt_cache(model, ids, 40, bucket=32)  # 40 -> 64 would cross the threshold of 50
    for a, b in zip(plain.layers, padded.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def _attention_before_shared_masks(query, prompt_k, prompt_v, k_new, v_new, scale, sinks, *, scaling, softcap,
                                   masks, empty_heads):
    """The student's attention as it was written before the masks were shared across layers and the
    teacher skipped its scaled scores (commit 06e02f1): masks rebuilt per layer from sink/recent
    (read from the test's globals), the teacher as a scale of ones. The reference for the test below."""
    from leank.contract import capped, in_full

    sink, recent = _SPLIT
    if scale is None:
        scale = torch.ones(prompt_k.shape[1], prompt_k.shape[3])
    K, V = torch.cat([prompt_k, k_new], 2), torch.cat([prompt_v, v_new], 2)
    B, Hq, q, D = query.shape
    H, T = K.shape[1], K.shape[2]
    G = Hq // H
    qf = query.float().view(B, H, G, q, D)
    scale = scale.to(torch.float32)
    full = torch.einsum("bhgqd,bhkd->bhgqk", qf, K.float()) * scaling
    scaled = torch.einsum("bhgqd,bhkd->bhgqk", qf * scale[None, :, None, None, :], K.float()) * scaling
    i = T - q + torch.arange(q)
    j = torch.arange(T)
    use_full = in_full(j, i, torch.zeros(1, dtype=torch.long), sink=sink, recent=recent)[0]
    scores = capped(torch.where(use_full, full, scaled), softcap)
    visible = (j[None, :] <= i[:, None])[None, None, None].expand(B, H, G, q, T)
    if empty_heads is not None:
        visible = visible & (use_full | ~empty_heads[None, :, None, None, None])
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.float().view(1, H, G, 1, 1).expand(B, H, G, q, 1)], -1)
    probs = torch.softmax(scores, dim=-1)[..., :T]
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, V.float())
    return out.view(B, Hq, q, D).to(query.dtype)


_SPLIT = (4, 8)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_oss"])  # plain; soft-capping + hybrid; learned sinks
@pytest.mark.parametrize("recompute", [False, True])
def test_objective_bit_identical_to_the_per_layer_masks(arch, recompute, monkeypatch):
    """Masks made once per pass and a teacher without scaled scores are a rewrite of the same arithmetic: the
    loss and α's gradient equal, bit for bit, those of the attention as written before (both stages, fresh
    random α and tokens). Every compressed layer's α gets a gradient (a layer reading another's scale fails)."""
    import leank.train.distill as distill

    model = tiny_model(arch, layers=2, head_dim=16, qk_gain=3.0)
    model.requires_grad_(False)
    leank.enable(model)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids = torch.randint(3, 97, (1, 64), generator=gen)
    answer = torch.zeros(64, dtype=torch.bool)
    answer[52:] = True
    shape = leank.masks.kv_shape(model.config)
    alpha0 = torch.rand(shape, generator=gen)
    alpha0[0, 1] = 0.0  # the binary stage then empties this head (its middle keys skipped)
    alpha0[0, 0].clamp_(min=0.02)
    current = distill.scaled_attention  # (read once: the loop below patches the module)
    for binary in (False, True):
        results = []
        for attention in (current, _attention_before_shared_masks):
            monkeypatch.setattr(distill, "scaled_attention", attention)
            alpha = alpha0.clone().requires_grad_(True)
            scale, empty = binary_scale(alpha, 0.5, 4) if binary else (alpha, None)
            assert not binary or empty.any()
            loss = distill_loss(model, ids, 40, answer, scale, sink=_SPLIT[0], recent=_SPLIT[1], empty_heads=empty,
                                checkpoint=recompute)
            loss.backward()
            results.append((loss.detach(), alpha.grad))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1]), results
        assert results[0][0] > 0 and (results[0][1].flatten(1).abs().sum(1) > 0).all()  # every layer's α learns


@pytest.mark.parametrize("case", ["fits", "tight", "oom", "forced-on", "forced-off", "fsdp", "cpu"])
def test_auto_recompute_follows_the_memory_check(case, monkeypatch):
    """``recompute`` None (auto): off when the longest sample peaks below 80% of the GPU, on when it
    peaks above or runs out of memory (the check then runs again with recomputation); an explicit
    setting is kept; FSDP means on, the CPU off."""
    from types import SimpleNamespace

    import leank.train.trainer as trainer_module

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (0, 100 * gib))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    first_peak = {"fits": 79.0, "tight": 81.0}.get(case, 10.0)
    calls = []

    def longest_sample():
        calls.append(trainer.recompute)
        if case == "oom" and len(calls) == 1:
            raise trainer_module._OutOfMemory("out of GPU memory")
        return {"tokens": 8, "peak_gib": first_peak if len(calls) == 1 else 5.0}

    requested = {"forced-on": True, "forced-off": False}.get(case)
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(recompute=requested, fsdp=case == "fsdp"),
        device=torch.device("cpu" if case == "cpu" else "cuda"),
        dist=SimpleNamespace(enabled=False), recompute=None, _longest_sample=longest_sample,
        region=SimpleNamespace(reset=lambda: calls.append("reset")),  # graphs captured without recompute: dropped
    )
    out = trainer_module.Trainer.check_memory(trainer)
    again = [False, "reset", True]  # the second check runs after the region dropped its graphs
    expected = {"fits": (False, [False]), "tight": (True, again), "oom": (True, again),
                "forced-on": (True, [True]), "forced-off": (False, [False]), "fsdp": (True, [True]),
                "cpu": (False, [False])}[case]
    assert (trainer.recompute, calls) == expected
    assert out["recompute"] is expected[0]


def _killed_at(monkeypatch, call: int):
    """Trainer._sample_loss raising KeyboardInterrupt at its ``call``-th call (1-based) from now on."""
    from leank.train import trainer as trainer_mod

    calls = {"n": 0}
    original = trainer_mod.Trainer._sample_loss

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_mod.Trainer, "_sample_loss", dying)
    monkeypatch.setattr(trainer_mod.Trainer, "check_memory", lambda self: {})  # count training samples only


def _set_seconds(path, seconds):
    state = torch.load(path, weights_only=True)
    if seconds is None:
        state.pop("seconds")
    else:
        state["seconds"] = seconds
    torch.save(state, path)


def test_resumed_twice_counts_every_process_seconds(tiny_dir, tmp_path, monkeypatch):
    """Killed in stage 1, then in stage 2, then finished: each stage's seconds include what the killed
    processes spent on it (kept in the checkpoints, carried from one resume to the next); a checkpoint of an
    older LeanK without seconds makes the total incomplete, and says so."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _killed_at(m, 4)  # stage-1 step 3 (checkpoint at step 2)
        with pytest.raises(KeyboardInterrupt):
            train(config(tiny_dir, out), progress=False)
    _set_seconds(out / "checkpoints" / "stage1.pt", 1000.0)
    with monkeypatch.context() as m:
        # steps 2..5 (4 calls), 2 validation passes after stage 1 and 2 before stage 2, stage-2 steps 0 and 1
        # (checkpoint at step 2), then killed
        _killed_at(m, 11)
        with pytest.raises(KeyboardInterrupt):
            train(config(tiny_dir, out), resume=True, progress=False)
    assert torch.load(out / "checkpoints" / "stage1.pt", weights_only=True)["seconds"] >= 1000  # carried forward
    _set_seconds(out / "checkpoints" / "stage2-0.75.pt", 500.0)
    summary = train(config(tiny_dir, out), resume=True, progress=False)
    assert summary["resumed"] and summary["seconds_complete"]
    assert 1000 <= summary["stages"]["stage1"]["seconds"] < 1600
    assert 500 <= summary["stages"]["stage2-0.75"]["seconds"] < 1100
    assert summary["seconds_total"] >= 1500

    old = tmp_path / "old"
    with monkeypatch.context() as m:
        _killed_at(m, 4)
        with pytest.raises(KeyboardInterrupt):
            train(config(tiny_dir, old), progress=False)
    _set_seconds(old / "checkpoints" / "stage1.pt", None)  # as an older LeanK wrote it
    with monkeypatch.context() as m:  # resumed, killed again after a checkpoint of its own ...
        _killed_at(m, 11)
        with pytest.raises(KeyboardInterrupt):
            train(config(tiny_dir, old), resume=True, progress=False)
    assert not torch.load(old / "checkpoints" / "stage1.pt", weights_only=True)["seconds_complete"]
    summary = train(config(tiny_dir, old), resume=True, progress=False)  # ... still says the time is incomplete
    assert summary["resumed"] and not summary["seconds_complete"]


def test_checkpoint_seconds_count_the_whole_stage(tiny_dir, tmp_path, monkeypatch):
    """Each checkpoint's seconds are the stage's time so far (not since the previous checkpoint): with a
    clock that ticks once per reading, a stage's checkpoints record growing times."""
    import types

    from leank.train import trainer as trainer_mod

    ticks = iter(range(10**6))
    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    saved = []
    original = trainer_mod.Trainer._save_checkpoint

    def spy(self, path, alpha, opt, step, sparsity, seconds):
        saved.append((path.stem, step, seconds))
        return original(self, path, alpha, opt, step, sparsity, seconds)

    monkeypatch.setattr(trainer_mod.Trainer, "_save_checkpoint", spy)
    train(config(tiny_dir, tmp_path / "run"), progress=False)
    stage1 = [seconds for stem, _, seconds in saved if stem == "stage1"]
    assert len(stage1) == 3 and stage1[0] < stage1[1] < stage1[2], saved  # steps 2, 4, 6


def test_resume_of_a_run_with_old_stage_names_is_refused(tiny_dir, tmp_path, monkeypatch):
    """A run an older LeanK started with target 0.755 named its stage 2 'stage2-0.76' (two decimals, and no
    target in the checkpoint); resuming it — with its targets, or with 0.76 added (sparsities are not a resume
    key) — would start stage 2 over or continue 0.76's from 0.755's, so it is refused in one line. A run of
    this version with targets 0.76 and 0.755, resumed with either, is not mistaken for one."""
    def killed_in_stage2(cfg, call):
        with monkeypatch.context() as m:
            _killed_at(m, call)
            with pytest.raises(KeyboardInterrupt):
                train(cfg, progress=False)

    old = config(tiny_dir, tmp_path / "old", sparsities=(0.755,))
    killed_in_stage2(old, 13)  # stage-2 step 2 (6 stage-1 steps, 4 validation passes; checkpoint at step 2)
    ckpt = tmp_path / "old" / "checkpoints"
    state = torch.load(ckpt / "stage2-0.755.pt", weights_only=True)
    torch.save({k: state[k] for k in ("alpha", "optimizer", "step")}, ckpt / "stage2-0.76.pt")  # the older format
    (ckpt / "stage2-0.755.pt").unlink()
    for sparsities in ((0.755,), (0.755, 0.76)):
        with pytest.raises(LeanKError, match="stage2-0.76.*another --out"):
            train(config(tiny_dir, tmp_path / "old", sparsities=sparsities), resume=True, progress=False)

    new = config(tiny_dir, tmp_path / "new", sparsities=(0.76, 0.755))
    killed_in_stage2(new, 21)  # stage 2 of 0.76 done (4 steps, 2 + 2 validation passes), 0.755's step 0
    summary = train(config(tiny_dir, tmp_path / "new", sparsities=(0.755,)), resume=True, progress=False)
    assert list(summary["stages"]) == ["stage1", "stage2-0.755"]
    assert all((tmp_path / "new" / f"mask-{label}.safetensors").exists() for label in ("0.76", "0.755"))


def test_sparsity_labels_tell_targets_apart():
    """Stage and mask file names: two decimals unless more are needed (0.855 once became "0.85",
    which 0.851 would have overwritten); a sparsity given twice is refused."""
    from leank.train.config import sparsity_label

    assert [sparsity_label(s) for s in (0.7, 0.75, 0.855, 0.905, 0.1 + 0.2, 0.8125)] == [
        "0.70", "0.75", "0.855", "0.905", "0.30", "0.8125"]
    assert sparsity_label(0.851) != sparsity_label(0.854)
    assert sparsity_label(0.12345678) == "0.123457" and sparsity_label(0.7 + 1e-7) == "0.700000"
    assert TrainConfig(model="m", out="o", sparsities=(-0.0,)).sparsities == (0.0,)  # no "-0.00" file names
    with pytest.raises(LeanKError, match="0.00 given twice"):
        TrainConfig(model="m", out="o", sparsities=(0.0, -0.0))
    assert sparsity_label(float(np.float32(0.7))) == "0.70" and sparsity_label(float(np.float32(0.855))) == "0.855"
    assert TrainConfig(model="m", out="o", sparsities=(np.float32(0.85),)).sparsities == (float(np.float32(0.85)),)
    for twice in ((0.7, 0.8, 0.7), (0.7, 0.7 + 5e-13), (0.7, np.float32(0.7))):  # equal, or one label
        with pytest.raises(LeanKError, match="0.70 given twice"):
            TrainConfig(model="m", out="o", sparsities=twice)

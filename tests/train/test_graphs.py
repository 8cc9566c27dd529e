"""The training sample's decode-region passes at padded shapes (:mod:`leank.train.graphs`): on the CPU the
padded passes run eagerly and must give the eager objective; on a GPU their CUDA graphs must give the padded
passes' result bit for bit, across shapes and replays."""

from __future__ import annotations

import pytest
import torch

import leank
from leank.errors import LeanKError
from leank.train.distill import binary_scale, distill_loss, prompt_cache
from leank.train.graphs import StaticRegion

from ..conftest import tiny_model

CUDA = torch.cuda.is_available()


def _setup(arch: str, device="cpu", dtype=torch.float32):
    model = tiny_model(arch, layers=2, head_dim=16, qk_gain=3.0).to(device, dtype)
    model.requires_grad_(False)
    leank.enable(model)
    return model


def _sample(gen, total: int, context_end: int, device="cpu"):
    ids = torch.randint(3, 97, (1, total), generator=gen).to(device)
    answer = torch.zeros(total, dtype=torch.bool)
    answer[context_end + int(torch.randint(1, total - context_end - 2, (1,), generator=gen)):] = True
    return ids, answer.to(device)


def _loss_and_grad(model, ids, context_end, answer, alpha0, binary, **kw):
    alpha = alpha0.clone().requires_grad_(True)
    scale, empty = binary_scale(alpha, 0.5, 4) if binary else (alpha, None)
    loss = distill_loss(model, ids, context_end, answer, scale, sink=4, recent=8, empty_heads=empty, **kw)
    loss.backward()
    return loss.detach(), alpha.grad


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # plain; QKV bias; q/k norms
@pytest.mark.parametrize("binary", [False, True])
def test_padded_passes_give_the_eager_objective(arch, binary):
    """Fresh random tokens, prompt and region lengths and α: the loss and α's gradient of the padded passes
    (prompt padded to 16, region to 8 tokens) equal the eager objective's within fp32 rounding, and bit for bit
    when nothing needs padding; the padding is real (it changes the shapes) and invisible (a padding key made
    visible changes the loss)."""
    model = _setup(arch)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    shape = leank.masks.kv_shape(model.config)
    for context_end, total, padded in ((37, 50, True), (48, 64, False)):
        ids, answer = _sample(gen, total, context_end)
        alpha0 = torch.rand(shape, generator=gen)
        alpha0[0, 1] = 0.0  # an emptied head in the binary stage
        eager = _loss_and_grad(model, ids, context_end, answer, alpha0, binary)
        region = StaticRegion(model, sink=4, recent=8, capture=False, prompt_bucket=16, query_bucket=8)
        inputs = region.inputs(ids, context_end, alpha0, None)
        assert inputs[2].shape[1] == (48 + 16 if padded else total)  # keys: prompt to 48, region 13 -> 16
        static = _loss_and_grad(model, ids, context_end, answer, alpha0, binary, region=region)
        assert eager[0] > 0 and eager[1].abs().sum() > 0
        if padded:
            torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-8)
        else:
            assert torch.equal(static[0], eager[0]) and torch.equal(static[1], eager[1])

    # a padding key made visible must change the result (the masks, not luck, hide it)
    ids, answer = _sample(gen, 50, 37)
    alpha0 = torch.rand(shape, generator=gen)
    region = StaticRegion(model, sink=4, recent=8, capture=False, prompt_bucket=16, query_bucket=8)
    leaky = region.inputs

    def leak(*a):
        out = list(leaky(*a))
        out[3] = out[3].clone()
        out[3][:, 37:48] = True  # the prompt's padding keys
        return tuple(out)

    region.inputs = leak
    wrong = _loss_and_grad(model, ids, 37, answer, alpha0, binary, region=region)
    right = _loss_and_grad(model, ids, 37, answer, alpha0, binary)
    assert not torch.allclose(wrong[0], right[0], rtol=1e-4)


def test_static_inputs_share_one_prompt_store():
    """The static inputs a shape's graphs read: the prompt K/V are views of one store sized for the longest prompt
    seen (shared by every shape), the rest the shape's own copies; the passes over them (copied in, as a replay
    does) give the passes over the inputs themselves, bit for bit."""
    model = _setup("llama")
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    shape = leank.masks.kv_shape(model.config)
    region = StaticRegion(model, sink=4, recent=8, capture=False, prompt_bucket=16, query_bucket=8)
    statics = []
    for context_end, total in ((60, 75), (37, 50)):  # the longer prompt first, as the memory check does
        ids, _ = _sample(gen, total, context_end)
        inputs = region.inputs(ids, context_end, torch.rand(shape, generator=gen), None)
        static = region._static(inputs)
        for s, x in zip(static, inputs, strict=True):
            s.copy_(x)
        passes = region._passes(False)
        for got, want in zip(passes(*static), passes(*inputs), strict=True):
            assert torch.equal(got, want)
        statics.append(static)
    (long, short), k = statics, 6
    assert short[k].untyped_storage().data_ptr() == long[k].untyped_storage().data_ptr()  # one store
    assert short[k].shape[2] == 48 and long[k].shape[2] == 64 and not short[k].is_contiguous()
    assert short[4].data_ptr() != long[4].data_ptr()  # each shape's own scale
    # a longer prompt than the store holds: a new, larger store (the shapes captured before keep theirs)
    ids, _ = _sample(gen, 95, 80)
    longer = region._static(region.inputs(ids, 80, torch.rand(shape, generator=gen), None))
    assert longer[k].shape[2] == 80 and longer[k].untyped_storage().data_ptr() != long[k].untyped_storage().data_ptr()
    # max_prompt sizes the store up front
    sized = StaticRegion(model, sink=4, recent=8, capture=False, prompt_bucket=16, query_bucket=8, max_prompt=90)
    first = sized._static(sized.inputs(ids[:, :50], 37, torch.rand(shape, generator=gen), None))
    assert first[k].shape[2] == 48 and first[k].untyped_storage().nbytes() == 96 * first[k].shape[1] * 16 * 4


@pytest.mark.parametrize("arch, reason", [("gemma2", "sliding-window"), ("mixtral", "experts"),
                                          ("qwen3_moe", "experts")])
def test_models_the_graphs_cannot_capture_are_refused(arch, reason):
    """Sliding-window layers (Gemma 2) keep only their window: the padded prompt pass would be wrong there;
    mixture-of-experts routing sizes tensors by the data (a host sync inside a capture)."""
    with pytest.raises(LeanKError, match=f"{reason}.*--no-cuda-graphs"):
        StaticRegion(_setup(arch), sink=4, recent=8, capture=False)


def test_cuda_graphs_option_is_checked():
    from leank.train import TrainConfig

    with pytest.raises(LeanKError, match="--cuda-graphs"):
        TrainConfig(cuda_graphs=True, fsdp=True)
    with pytest.raises(LeanKError, match="cuda_graphs must be True, False or None"):
        TrainConfig(cuda_graphs=1)
    # not a resume key: a run told to continue with --no-cuda-graphs (after a failed capture) may
    assert "cuda_graphs" not in TrainConfig.RESUME_KEYS


def test_region_brings_its_own_prompt_teacher_and_split():
    """``distill_loss(region=...)``: the region makes the prompt K/V and the teacher with its own sink and recent;
    giving others is refused rather than silently ignored."""
    model = _setup("llama")
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids, answer = _sample(gen, 50, 37)
    region = StaticRegion(model, sink=4, recent=8, capture=False)
    alpha = torch.rand(leank.masks.kv_shape(model.config), generator=gen)
    for kw in (dict(prompt=prompt_cache(model, ids, 37)), dict(teacher=torch.zeros(1, 13, 64)), dict(recent=9)):
        args = dict(sink=4, recent=8, region=region) | kw
        with pytest.raises(ValueError, match="a region makes its own"):
            distill_loss(model, ids, 37, answer, alpha, **args)


@pytest.mark.parametrize("message", ["boom\nsecond line", ""])
def test_a_failed_capture_is_one_clear_error(message, monkeypatch):
    """A capture that fails (anything but running out of memory, which the trainer's knobs handle) is one line
    naming --no-cuda-graphs, the captured shapes are dropped, and the cause stays attached."""
    import contextlib

    import leank.train.graphs as graphs

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())

    def fail(*a, **k):
        raise RuntimeError(message)

    model = _setup("llama")
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids, _ = _sample(gen, 50, 37)
    region = StaticRegion(model, sink=4, recent=8, capture=True, prompt_bucket=16, query_bucket=8)
    region.graphs["old"], old_pool = "a shape", region.pool
    monkeypatch.setattr(graphs, "_Captured", fail)
    expect = r"CUDA graph failed \((boom|RuntimeError)\): train with --no-cuda-graphs"
    with pytest.raises(LeanKError, match=expect) as err:
        region(ids, 37, torch.rand(leank.masks.kv_shape(model.config), generator=gen), None)
    assert "\n" not in str(err.value) and isinstance(err.value.__cause__, RuntimeError)
    assert region.graphs == {} and region.pool is not old_pool

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("out of memory")

    monkeypatch.setattr(graphs, "_Captured", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # the trainer turns this into its knobs message
        region(ids, 37, torch.rand(leank.masks.kv_shape(model.config), generator=gen), None)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphs_replay_the_padded_passes(dtype):
    """On a GPU: several samples over three shapes, in an order that returns to captured shapes, both stages,
    recomputation on and off: every loss and gradient of the replayed graphs equals the padded passes run
    eagerly, bit for bit, and one graph pair is captured per shape (and recompute setting)."""
    model = _setup("llama", "cuda", dtype)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    shape = leank.masks.kv_shape(model.config)
    eager = StaticRegion(model, sink=4, recent=8, capture=False, prompt_bucket=16, query_bucket=8)
    graphed = StaticRegion(model, sink=4, recent=8, capture=True, prompt_bucket=16, query_bucket=8)
    lengths = [(37, 50), (60, 75), (40, 52), (33, 41), (61, 70), (38, 50)]  # shapes A B A C B A
    for i, (context_end, total) in enumerate(lengths):
        ids, answer = _sample(gen, total, context_end, "cuda")
        alpha0 = torch.rand(shape, generator=gen).cuda()
        for binary in (False, True):
            for checkpoint in (False, True) if i < 2 else (False,):
                kw = dict(checkpoint=checkpoint)
                want = _loss_and_grad(model, ids, context_end, answer, alpha0, binary, region=eager, **kw)
                got = _loss_and_grad(model, ids, context_end, answer, alpha0, binary, region=graphed, **kw)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (i, binary, checkpoint)
                assert want[1].abs().sum() > 0
    assert len(graphed.graphs) == 5  # A, B (each with and without recompute), C
    with torch.no_grad():  # the validation passes: forward graphs only, a shape seen (A) and a new one
        for context_end, total in ((37, 50), (70, 100)):
            ids, answer = _sample(gen, total, context_end, "cuda")
            alpha0 = torch.rand(shape, generator=gen).cuda()
            want = distill_loss(model, ids, context_end, answer, alpha0, sink=4, recent=8, region=eager)
            got = distill_loss(model, ids, context_end, answer, alpha0, sink=4, recent=8, region=graphed)
            assert torch.equal(got, want)
    assert len(graphed.graphs) == 6


@pytest.mark.parametrize("case", ["small", "large", "windows", "moe", "cpu", "torchrun", "forced-on", "forced-off",
                                  "forced-on-cpu"])
def test_auto_cuda_graphs(case, monkeypatch):
    """``cuda_graphs`` None (auto): on for a model under 1B parameters on one GPU, whose prompt pass can be
    padded; off for a larger model, sliding-window layers, experts, the CPU, torchrun; an explicit setting is kept, and
    asking for graphs without a GPU is one clear error."""
    from types import SimpleNamespace

    import leank.train.graphs as graphs
    import leank.train.trainer as trainer_module

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")  # the CPU has no graph pools
    model = _setup({"windows": "gemma2", "moe": "qwen2_moe"}.get(case, "llama"))
    if case == "large":
        monkeypatch.setattr(trainer_module, "GRAPHS_AUTO_PARAMS", sum(p.numel() for p in model.parameters()))
    requested = {"forced-on": True, "forced-on-cpu": True, "forced-off": False}.get(case)
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(cuda_graphs=requested, sink=4, recent=8, max_length=100), model=model,
        device=torch.device("cpu" if case in ("cpu", "forced-on-cpu") else "cuda"),
        dist=SimpleNamespace(enabled=case == "torchrun"),
    )
    if case == "forced-on-cpu":  # checked before the model loads (tests/test_faults.py runs that path)
        with pytest.raises(LeanKError, match="--cuda-graphs needs one CUDA GPU"):
            trainer_module.Trainer._check_graphs_device(trainer)
        return
    region = trainer_module.Trainer._static_region(trainer)
    on = case in ("small", "forced-on")
    assert isinstance(region, graphs.StaticRegion) if on else region is None
    if on:
        assert region.capture and region.pool == "pool" and region.max_prompt == 100


@pytest.mark.parametrize("flags, graphs, recompute", [([], None, None), (["--cuda-graphs"], True, None),
                                                      (["--no-cuda-graphs", "--recompute"], False, True),
                                                      (["--no-recompute"], None, False)])
def test_cli_on_off_auto_flags(flags, graphs, recompute):
    """``--cuda-graphs`` / ``--no-cuda-graphs`` (and the recompute pair): True / False, neither: None (auto)."""
    from leank.cli import build_parser

    args = build_parser("train").parse_args(["train", "--out", "x", *flags])
    assert (args.cuda_graphs, args.recompute) == (graphs, recompute)
    with pytest.raises(SystemExit):
        build_parser("train").parse_args(["train", "--out", "x", "--cuda-graphs", "--no-cuda-graphs"])


def test_prompt_the_model_cannot_pad_is_padded_with_masked_zeros():
    """A prompt whose padding would run past the model's context is passed unpadded; its K/V are then padded
    with zeros to the bucket (masked keys), so the shapes stay few — and the objective is unchanged."""
    model = _setup("llama")
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids, answer = _sample(gen, 50, 37)
    model.config.max_position_embeddings = 40  # 37 -> 48 would pass it
    alpha0 = torch.rand(leank.masks.kv_shape(model.config), generator=gen)
    region = StaticRegion(model, sink=4, recent=8, capture=False, prompt_bucket=16, query_bucket=8)
    inputs = region.inputs(ids, 37, alpha0, None)
    assert inputs[6].shape[2] == 48 and inputs[6][:, :, 37:].abs().sum() == 0
    torch.testing.assert_close(_loss_and_grad(model, ids, 37, answer, alpha0, False, region=region),
                               _loss_and_grad(model, ids, 37, answer, alpha0, False), rtol=1e-5, atol=1e-8)


def test_a_backward_after_another_replay_is_refused():
    """Shapes share the graphs' memory: a sample's backward pass after another sample's forward replay would read
    overwritten activations, so it is refused (the trainer runs backward once per sample)."""
    from types import SimpleNamespace

    from leank.train.graphs import _Replay

    region = SimpleNamespace(replays=0)
    scale = torch.zeros(2, 3, requires_grad=True)
    captured = SimpleNamespace(
        inputs=(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(2, 3), torch.zeros(1)),
        forward=SimpleNamespace(replay=lambda: None), backward=SimpleNamespace(replay=lambda: None),
        student=torch.ones(4), teacher=torch.ones(4), grad_student=torch.zeros(4), grad_scale=torch.full((2, 3), 7.0))
    args = (torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), scale, torch.zeros(1))
    first, _ = _Replay.apply(region, captured, *args)
    second, _ = _Replay.apply(region, captured, *args)
    with pytest.raises(RuntimeError, match="backpropagated before the next sample"):
        first.sum().backward()
    second.sum().backward()  # its own replay is the last one: fine
    assert torch.equal(scale.grad, torch.full((2, 3), 7.0))

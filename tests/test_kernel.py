"""The Triton decode kernel against an independent float64 reference.

On a CPU these run under ``TRITON_INTERPRET=1`` (set in conftest.py) in fp32 and fp16 (the
interpreter mishandles bf16 arithmetic); on a GPU they run compiled, in bf16 and fp16 too.
Each case builds a LeanK layer from random K/V with left padding, decodes several steps
(moving tokens from the window into the compressed middle) and compares, at every step,
the kernel and a same-dtype SDPA computation with a float64 masked-dense reference built
from the full K/V history — not from the cache's storage.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from leank.cache import LeanKLayer  # noqa: E402
from leank.errors import LeanKError  # noqa: E402
from leank.kernels import decode_attention, pick_backend  # noqa: E402
from leank.kernels import triton_decode as td  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def random_kept(H: int, D: int, counts: list[int], gen: torch.Generator) -> torch.Tensor:
    kept = torch.zeros(H, D, dtype=torch.bool)
    for h, c in enumerate(counts):
        kept[h, torch.randperm(D, generator=gen)[:c]] = True
    return kept


class History:
    """A LeanK layer fed with random K/V, and every K/V it was given (the reference's input)."""

    def __init__(self, *, B, H, D, kept, sink, recent, chunk, pads, prompt, dtype, gen):
        self.gen, self.dtype, self.pads = gen, dtype, pads
        self.layer = LeanKLayer(kept.to(DEVICE), sink=sink, recent=recent, chunk=chunk)
        self.k = self._rand(B, H, prompt, D)
        self.v = self._rand(B, H, prompt, D)
        self.layer.update(self.k, self.v)
        self.layer.finish_prefill(torch.tensor(pads))

    def _rand(self, *shape):
        return (torch.randn(*shape, generator=self.gen) * 2).to(DEVICE, self.dtype)

    def step(self):
        """Append one token's K/V (the state attention sees); call ``layer.evict()`` after."""
        B, H, _, D = self.k.shape
        k, v = self._rand(B, H, 1, D), self._rand(B, H, 1, D)
        self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
        self.layer.update(k, v)

    def visibility(self):
        """(use_full [B, 1, T], visible [B, H, T]) for the newest query, from the definition."""
        layer, (B, H, T, _) = self.layer, self.k.shape
        p = torch.arange(T, device=DEVICE)
        has_channels = layer.kept.any(-1)
        use_full = torch.zeros(B, 1, T, dtype=torch.bool, device=DEVICE)
        visible = torch.zeros(B, H, T, dtype=torch.bool, device=DEVICE)
        for b, pad in enumerate(self.pads):
            full = (p - pad < layer.sink) | (p >= layer.w0)
            use_full[b, 0] = full
            visible[b] = (p >= pad) & (full | has_channels[:, None])
        return use_full, visible

    def attention(self, query: torch.Tensor, scaling: float, dtype) -> torch.Tensor:
        """Masked dense attention of ``query`` [B, Hq, 1, D] in ``dtype`` (float64: the reference)."""
        B, H, T, D = self.k.shape
        G = query.shape[1] // H
        use_full, visible = self.visibility()
        k = self.k.to(dtype)
        k_masked = k * self.layer.kept[None, :, None, :].to(dtype)
        k_eff = torch.where(use_full[..., None], k, k_masked).repeat_interleave(G, 1)
        v = self.v.to(dtype).repeat_interleave(G, 1)
        attn_mask = visible.repeat_interleave(G, 1)[:, :, None, :]
        return F.scaled_dot_product_attention(query.to(dtype), k_eff, v, attn_mask=attn_mask, scale=scaling)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def run_case(*, B, H, G, D, counts, sink, recent, chunk, pads, prompt, steps, dtype, budget, seed):
    gen = torch.Generator().manual_seed(seed)
    kept = random_kept(H, D, counts, gen)
    hist = History(B=B, H=H, D=D, kept=kept, sink=sink, recent=recent, chunk=chunk, pads=pads, prompt=prompt,
                   dtype=dtype, gen=gen)
    scaling = 1 / math.sqrt(D)
    moved = False
    for _ in range(steps):
        hist.step()
        query = hist._rand(B, H * G, 1, D)
        ref = hist.attention(query, scaling, torch.float64)
        same = hist.attention(query, scaling, dtype)
        out = torch.full((B, H * G, 1, D), float("nan"), dtype=dtype, device=DEVICE)  # poisoned
        for o, lse in td._WORKSPACE.values():
            o.fill_(float("nan"))
            lse.fill_(float("nan"))
        td.decode_attention_triton(query, hist.layer, scaling, out=out, budget_override=budget)
        assert torch.isfinite(out).all(), "unwritten or NaN outputs"
        err, err_same = rel_err(out, ref), rel_err(same, ref)
        # fp16/bf16: at most ~2x a same-dtype SDPA's error. fp32: the exp2 online softmax and
        # the merge of split partials cost a few ulps more than SDPA's one softmax: 1e-5.
        assert err <= 2 * err_same + (1e-5 if dtype == torch.float32 else 1e-6), (err, err_same)
        moved |= hist.layer.middle_len > 0
        hist.layer.evict()
    assert moved, "the case never used the compressed middle store"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "case",
    [
        # D 64, alignment 16: heads keeping 0, 16, 32, 48, 64 channels; G=3 (SmolLM2-like)
        dict(B=2, H=5, G=3, D=64, counts=[0, 16, 32, 48, 64], sink=4, recent=8, chunk=4, pads=[0, 37], prompt=150,
             steps=5, budget=1),
        # D 128, alignment 32, G=4 (Llama-like), no sink, one split
        dict(B=1, H=4, G=4, D=128, counts=[32, 0, 128, 96], sink=0, recent=16, chunk=8, pads=[0], prompt=83,
             steps=9, budget=None),
        # unaligned counts (any alignment is correct, only slower), G=1, many splits
        dict(B=3, H=3, G=1, D=64, counts=[5, 23, 0], sink=2, recent=5, chunk=1, pads=[7, 0, 60], prompt=141,
             steps=3, budget=1),
    ],
    ids=["d64-align16", "d128-align32", "unaligned"],
)
def test_kernel_matches_reference(case, dtype):
    run_case(**case, dtype=dtype, seed=torch.seed() % 2**31)


def test_every_kept_count_d128():
    """Each of a D=128 head's tile widths (16, 32, 64, 128) and the empty head, in one layer."""
    run_case(B=2, H=9, G=2, D=128, counts=[0, 16, 32, 48, 64, 80, 96, 112, 128], sink=3, recent=6, chunk=3,
             pads=[11, 0], prompt=77, steps=2, dtype=torch.float32, budget=1, seed=torch.seed() % 2**31)


@pytest.mark.parametrize("counts", [[0, 0], [16, 64]], ids=["all-empty", "kept"])
def test_prompt_shorter_than_the_window(counts):
    """Sink tokens still in the window must be seen once (as window tokens), and a row with
    a single real token; with every head pruned there is no middle store at all."""
    run_case(B=2, H=2, G=2, D=64, counts=counts, sink=2, recent=6, chunk=2, pads=[3, 0], prompt=4, steps=8,
             dtype=torch.float32, budget=None, seed=torch.seed() % 2**31)


@pytest.mark.parametrize(
    "batch, counts, middle",
    [(1, [0, 32, 64, 96, 32, 32, 0, 64], 131072), (8, [32, 32, 64, 0, 96, 32, 64, 32], 32768),
     (64, [96, 96, 32, 64, 0, 0, 32, 32], 32768), (1, [16], 100), (3, [0, 0], 7000)],
)
def test_split_plan_covers_the_middle_with_balanced_programs(batch, counts, middle):
    D, block, target = 128, 64, 528
    budget, splits = td.split_plan(batch, counts, middle, D, block, target)
    programs = 0
    for c in (c for c in counts if c > 0):
        split_len = math.ceil(math.ceil(budget / (c + D)) / block) * block  # as the kernel computes it
        n = -(-middle // split_len)
        assert n <= splits and n * split_len >= middle  # the grid covers every head's middle
        assert split_len * (c + D) < budget + block * (c + D)  # each program reads about `budget`
        programs += batch * n
    if any(counts):
        assert programs <= 2 * target + batch * len(counts)


def test_backend_dispatch_and_errors():
    q_cpu = torch.zeros(1, 2, 1, 64)
    assert pick_backend(q_cpu) == "torch"
    assert pick_backend(q_cpu, "triton") == "triton"
    with pytest.raises(LeanKError, match="unknown"):
        pick_backend(q_cpu, "cuda-magic")
    gen = torch.Generator().manual_seed(0)
    hist = History(B=1, H=2, D=64, kept=random_kept(2, 64, [16, 0], gen), sink=2, recent=4, chunk=2, pads=[0],
                   prompt=20, dtype=torch.float32, gen=gen)
    hist.step()
    two_tokens = torch.zeros(1, 4, 2, 64, device=DEVICE)
    with pytest.raises(LeanKError, match="one token"):
        decode_attention(two_tokens, hist.layer, 0.1, backend="triton")
    if CUDA:
        assert pick_backend(two_tokens) == "torch"
        assert pick_backend(torch.zeros(1, 4, 1, 64, device="cuda")) == "triton"


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_and_replay():
    """A captured decode call replays correctly after the cache contents change in place."""
    gen = torch.Generator().manual_seed(0)
    hist = History(B=2, H=4, D=128, kept=random_kept(4, 128, [32, 0, 64, 128], gen), sink=4, recent=16, chunk=4,
                   pads=[0, 5], prompt=500, dtype=torch.bfloat16, gen=gen)
    hist.step()
    query = hist._rand(2, 16, 1, 128)
    out = torch.empty_like(query)
    td.decode_attention_triton(query, hist.layer, 0.1, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        td.decode_attention_triton(query, hist.layer, 0.1, out=out)
    for _ in range(2):
        query.copy_(hist._rand(2, 16, 1, 128))
        hist.layer.mid_v.mul_(-1)  # contents change, layout and lengths stay
        graph.replay()
        expect = td.decode_attention_triton(query, hist.layer, 0.1)
        assert torch.equal(out, expect)

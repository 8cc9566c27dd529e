"""Decode-attention backends for LeanK caches, behind one dispatch point and one op.

A backend takes the query ``[B, H_q, 1, D]``, a :class:`~leank.contract.DecodeView` and the
model's score terms (``scaling``, ``softcap``, ``sinks``) and returns ``[B, H_q, 1, D]``:

* ``"auto"`` (default): the custom op ``torch.ops.leank.decode_attention`` — the Triton
  kernel on CUDA, the torch reference on CPU. ``torch.compile(fullgraph=True)`` takes it
  as one opaque node, and CUDA graphs capture it (lengths are device tensors);
* ``"torch"``: the reference, called directly (exact, any device, eager);
* ``"triton"``: the Triton kernel, launched directly (CUDA, or ``TRITON_INTERPRET=1``).

``LEANK_ATTENTION_BACKEND`` overrides the default; a cache resolves it once when built.
Triton is imported only when the Triton kernel first runs, so ``import leank`` never loads it.
"""

from __future__ import annotations

import os

import torch

from ..contract import DecodeView
from ..errors import LeanKError
from .torch_decode import decode_attention_torch

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str | None = None) -> str:
    backend = backend or os.environ.get("LEANK_ATTENTION_BACKEND") or "auto"
    if backend not in BACKENDS:
        raise LeanKError(f"unknown LeanK attention backend {backend!r}: use one of {', '.join(BACKENDS)}")
    return backend


def _triton(module: str = "triton_decode"):
    try:
        import importlib

        return importlib.import_module(f"{__name__}.{module}")
    except ImportError as e:  # pragma: no cover - depends on the install
        raise LeanKError(f"the triton LeanK kernel needs the package triton ({e}): pip install triton") from None


def _view(args: tuple, sink: int, recent: int, slots: int, head_counts,
          quant: tuple = (None, None, None, 0, 0, False)) -> DecodeView:
    mid_kp, mid_vp, head_kpoff, bits, group, symmetric = quant
    return DecodeView(*args, sink=sink, recent=recent, slots=slots, head_counts=tuple(head_counts), mid_kp=mid_kp,
                      mid_vp=mid_vp, head_kpoff=head_kpoff, quant_bits=bits, quant_group=group,
                      quant_symmetric=symmetric)


def _quant_args(view: DecodeView) -> tuple:
    """The quantised store's part of the ops' arguments (None / 0 when not quantised)."""
    return view.mid_kp, view.mid_vp, view.head_kpoff, view.quant_bits, view.quant_group, view.quant_symmetric


@torch.library.custom_op("leank::decode_attention", mutates_args=())
def _decode_op(
    query: torch.Tensor, sink_k: torch.Tensor, sink_v: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor,
    mid_k: torch.Tensor, mid_v: torch.Tensor, head_c: torch.Tensor, head_koff: torch.Tensor, head_voff: torch.Tensor,
    head_chan: torch.Tensor, pads: torch.Tensor, seen: torch.Tensor, c0: torch.Tensor, sinks: torch.Tensor | None,
    scaling: float, softcap: float, sink: int, recent: int, slots: int, head_counts: list[int],
    mid_kp: torch.Tensor | None, mid_vp: torch.Tensor | None, head_kpoff: torch.Tensor | None, quant_bits: int,
    quant_group: int, quant_symmetric: bool,
) -> torch.Tensor:
    view = _view((sink_k, sink_v, ring_k, ring_v, mid_k, mid_v, head_c, head_koff, head_voff, head_chan, pads, seen,
                  c0), sink, recent, slots, head_counts,
                 (mid_kp, mid_vp, head_kpoff, quant_bits, quant_group, quant_symmetric))
    return decode_attention_torch(query, view, scaling, softcap=softcap or None, sinks=sinks)


@_decode_op.register_kernel("cuda")
def _decode_op_cuda(query, *args):
    *tensors, sinks, scaling, softcap, sink, recent, slots, head_counts = args[:-6]
    view = _view(tuple(tensors), sink, recent, slots, head_counts, args[-6:])
    return _triton().decode_attention_triton(query, view, scaling, softcap=softcap or None, sinks=sinks)


@_decode_op.register_fake
def _decode_op_fake(query, *args):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


@torch.library.custom_op(
    "leank::store_step",
    mutates_args=("sink_k", "sink_v", "ring_k", "ring_v", "mid_k", "mid_v", "seen", "mid_kp", "mid_vp"),
)
def _store_op(
    key: torch.Tensor, value: torch.Tensor, sink_k: torch.Tensor, sink_v: torch.Tensor, ring_k: torch.Tensor,
    ring_v: torch.Tensor, mid_k: torch.Tensor, mid_v: torch.Tensor, head_c: torch.Tensor, head_koff: torch.Tensor,
    head_voff: torch.Tensor, head_chan: torch.Tensor, pads: torch.Tensor, seen: torch.Tensor, c0: torch.Tensor,
    sink: int, recent: int, slots: int, head_counts: list[int], sink_write: bool, mid_kp: torch.Tensor | None,
    mid_vp: torch.Tensor | None, head_kpoff: torch.Tensor | None, quant_bits: int, quant_group: int,
    quant_symmetric: bool,
) -> None:
    view = _view((sink_k, sink_v, ring_k, ring_v, mid_k, mid_v, head_c, head_koff, head_voff, head_chan, pads, seen,
                  c0), sink, recent, slots, head_counts,
                 (mid_kp, mid_vp, head_kpoff, quant_bits, quant_group, quant_symmetric))
    _triton("triton_store").store_step_triton(key, value, view, sink_write=sink_write)


@_store_op.register_fake
def _store_op_fake(*args) -> None:
    return None


def fused_store(device: torch.device, backend: str) -> bool:
    """Whether a decode step's cache update runs as the Triton store kernel (:func:`store_step`)
    rather than the cache's torch ops: on CUDA unless the backend is ``"torch"``, and always
    for ``"triton"`` (on a CPU: the interpreter, for tests)."""
    return backend == "triton" or (backend == "auto" and device.type == "cuda")


def store_step(key: torch.Tensor, value: torch.Tensor, view: DecodeView, *, sink_write: bool, backend: str) -> None:
    """A decode step's cache update (one new token per row, then ``seen += 1``) as one kernel;
    see :mod:`leank.kernels.triton_store`. ``"auto"`` goes through the op ``leank::store_step``
    (CUDA only), which ``torch.compile`` keeps as one node that updates the buffers in place."""
    if backend == "triton":
        _triton("triton_store").store_step_triton(key, value, view, sink_write=sink_write)
    else:
        _store_op(key, value, *view.tensors(), view.sink, view.recent, view.slots, list(view.head_counts), sink_write,
                  *_quant_args(view))


def decode_attention(query: torch.Tensor, view: DecodeView, scaling: float, *, softcap: float | None = None,
                     sinks: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """LeanK attention of one new token per row, ``query`` ``[B, H_q, 1, D]`` → ``[B, H_q, 1, D]``;
    ``softcap`` (score soft-capping) and ``sinks`` ``[H_q]`` (learned sink logits): the model's, or None."""
    if backend == "torch":
        return decode_attention_torch(query, view, scaling, softcap=softcap, sinks=sinks)
    if backend == "triton":
        return _triton().decode_attention_triton(query, view, scaling, softcap=softcap, sinks=sinks)
    return _decode_op(query, *view.tensors(), sinks, float(scaling), float(softcap or 0.0), view.sink, view.recent,
                      view.slots, list(view.head_counts), *_quant_args(view))

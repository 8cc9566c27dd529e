"""The decode contract: what a LeanK cache hands to a decode-attention backend.

One rule says which keys a query sees in full (:func:`in_full`); the cache, ThinK, the
training objective and the tests' reference all use it. One frozen :class:`DecodeView`
of plain tensors and ints describes a layer's stores; both backends (the torch reference
and the Triton kernel) read it, and neither imports the cache.

**The rule.** Query position ``t`` sees key position ``p <= t`` of its row in full (every
K channel) when ``p`` is among the row's first ``sink`` real tokens or ``t - p <= recent``
(the query itself and the ``recent`` tokens before it); every other key is seen through
its KV head's kept channels only, and not at all by a head that keeps none.
Prompt queries (prefill) see every prompt key in full: that is the method's prefill.

**The stores** (per layer; positions are absolute, left padding included; row ``b`` has
``pads[b]`` leading pad tokens; ``seen`` tokens are stored, positions ``[0, seen)``):

* ``ring_k``/``ring_v`` ``[B, H, W, D]``: the last ``min(seen, W)`` positions; position
  ``p`` lives in slot ``p % W``. ``W = R + 1`` (what a decode query needs in full), or
  fewer while the sequence is known to stay shorter (then nothing ever leaves it). A slot
  is valid for row ``b`` when its position is ``>= pads[b]``.
* every position ``< seen - W`` (``n_out``) has left the ring:
  - ``sink_k``/``sink_v`` ``[B, H, S + 1, D]``: slot ``s`` holds position ``pads[b] + s``;
    valid while ``s < clamp(n_out - pads[b], 0, S)``. Slot ``S`` is scratch (writes that
    belong nowhere go there).
  - the middle store, slot ``i`` = position ``c0 + i`` for ``i < M = max(0, n_out - c0)``,
    valid for row ``b`` when ``c0 + i >= pads[b] + S``. It is packed head-major in two
    flat buffers with ``slots`` token slots per head (the last one scratch):
    ``mid_k`` ``[B, slots * sum(c)]``: head ``h`` keeping ``c = head_c[h]`` channels
    (``head_chan[h, :c]``, ascending) stores slot ``i`` at
    ``head_koff[h] * slots + i * c`` (``c`` contiguous values);
    ``mid_v`` ``[B, slots * n_v * D]``: head ``h`` with ``c > 0`` stores slot ``i`` at
    ``head_voff[h] * slots * D + i * D``. Heads keeping nothing store no middle token.
  - **quantised** (``quant_bits`` 8 or 4, :mod:`leank.quant`; 0: not quantised): the same
    head-major layout with a row's values replaced by its codes and a second buffer of its
    groups' ``(scale, zero)`` pairs (cache dtype; ``quant_symmetric``: scales only, ``p = 1``
    param per group, else ``p = 2``). A K row of ``c`` values has ``kb = ceil(c * bits / 8)``
    code bytes and ``kp = p * ceil(c / group)`` params; a V row ``vb = D * bits / 8`` and
    ``vp = p * ceil(D / group)``. ``mid_k`` (uint8) holds head ``h``'s
    slot ``i`` at ``head_koff[h] * slots + i * kb`` (``head_koff``: the sum of ``kb`` over the
    heads before), ``mid_kp`` at ``head_kpoff[h] * slots + i * kp``; ``mid_v`` (uint8) at
    ``head_voff[h] * slots * vb + i * vb``, ``mid_vp`` at ``head_voff[h] * slots * vp + i * vp``.
    Sink and ring are never quantised. A key is seen quantised exactly when it is seen through
    its kept channels (not in full): its kept K channels and its V both dequantised.

**The scores** are the model's: ``scaling`` as the model passes it, then soft-capping
(:func:`capped`) when the model caps, and learned sinks (one logit per query head that
joins the softmax denominator and carries no value) when it has them.

In a decode step the new token has already been written (``seen`` counts it), so its
query ``t = seen - 1`` sees the whole ring in full and sink/middle as stored. Lengths
live in device tensors (``seen``, ``c0``, ``pads``), so a step needs no host value and a
captured CUDA graph stays valid as the sequence grows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def in_full(key_pos: torch.Tensor, query_pos: torch.Tensor, pads: torch.Tensor, *, sink: int, recent: int):
    """bool ``[B, q, T]``: query ``query_pos`` ``[q]`` sees key ``key_pos`` ``[T]`` in full (see the
    module docstring), for rows with ``pads`` ``[B]`` leading pad tokens. Visibility (causality,
    padding) is the caller's."""
    first = (key_pos[None, :] - pads[:, None]) < sink  # [B, T]
    recent_keys = (query_pos[:, None] - key_pos[None, :]) <= recent  # [q, T]
    return first[:, None, :] | recent_keys[None]


def capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Soft-capped scaled scores ``softcap * tanh(scores / softcap)`` (unchanged for None or 0)."""
    return softcap * torch.tanh(scores / softcap) if softcap else scores


@dataclass(frozen=True)
class DecodeView:
    """One layer's LeanK stores, as the decode backends read them (module docstring)."""

    sink_k: torch.Tensor  # [B, H, S + 1, D]
    sink_v: torch.Tensor
    ring_k: torch.Tensor  # [B, H, W, D], W <= R + 1
    ring_v: torch.Tensor
    mid_k: torch.Tensor  # [B, slots * sum(c)]
    mid_v: torch.Tensor  # [B, slots * n_v * D]
    head_c: torch.Tensor  # int32 [H]
    head_koff: torch.Tensor  # int32 [H]
    head_voff: torch.Tensor  # int32 [H]
    head_chan: torch.Tensor  # int32 [H, D]
    pads: torch.Tensor  # int64 [B]
    seen: torch.Tensor  # int64 []
    c0: torch.Tensor  # int64 []
    sink: int
    recent: int
    slots: int
    head_counts: tuple[int, ...]
    # The quantised middle store (module docstring); None / 0 when it is not quantised.
    mid_kp: torch.Tensor | None = None  # [B, slots * sum(kp)], (scale, zero) pairs, or scales (symmetric)
    mid_vp: torch.Tensor | None = None  # [B, slots * n_v * vp]
    head_kpoff: torch.Tensor | None = None  # int32 [H]
    quant_bits: int = 0
    quant_group: int = 0
    quant_symmetric: bool = False

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensor fields, in declaration order (the decode op's arguments)."""
        return (self.sink_k, self.sink_v, self.ring_k, self.ring_v, self.mid_k, self.mid_v, self.head_c,
                self.head_koff, self.head_voff, self.head_chan, self.pads, self.seen, self.c0)

    def quant(self):
        """The :class:`~leank.quant.KVQuant` of the middle store, or None."""
        from .quant import KVQuant

        return KVQuant(self.quant_bits, self.quant_group, self.quant_symmetric) if self.quant_bits else None

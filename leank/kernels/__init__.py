"""Decode-attention backends for LeanK caches, behind one dispatch point.

``"torch"`` (exact, any device) is always there; faster backends register themselves in
:data:`BACKENDS`. ``"auto"`` picks the fastest one for the query's device; the
``backend`` argument or ``LEANK_ATTENTION_BACKEND`` overrides it (tests use this).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..errors import LeanKError
from .torch_decode import decode_attention_torch

if TYPE_CHECKING:
    from ..cache import LeanKLayer

BACKENDS: dict[str, Callable[[torch.Tensor, LeanKLayer, float], torch.Tensor]] = {"torch": decode_attention_torch}

try:  # Triton is optional: without it (or on CPU) the torch backend serves every query.
    from .triton_decode import decode_attention_triton
except ImportError:  # pragma: no cover - depends on the install
    pass
else:
    BACKENDS["triton"] = decode_attention_triton


def pick_backend(query: torch.Tensor, backend: str | None = None) -> str:
    backend = backend or os.environ.get("LEANK_ATTENTION_BACKEND") or "auto"
    if backend == "auto":
        one_token = query.shape[-2] == 1
        return "triton" if query.is_cuda and one_token and "triton" in BACKENDS else "torch"
    if backend not in BACKENDS:
        raise LeanKError(f"unknown LeanK attention backend {backend!r}: use one of auto, {', '.join(BACKENDS)}")
    return backend


def decode_attention(
    query: torch.Tensor, layer: LeanKLayer, scaling: float, *, backend: str | None = None
) -> torch.Tensor:
    """LeanK attention of new queries ``[B, H_q, q, D]`` over a layer's cache → ``[B, H_q, q, D]``."""
    return BACKENDS[pick_backend(query, backend)](query, layer, scaling)

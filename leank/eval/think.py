"""ThinK (Xu et al., 2024, arXiv 2407.21018) as an evaluation baseline: K-channel pruning
chosen per prompt from its queries, simulated exactly.

After the dense prompt attention, each (row, KV head) keeps the ``round((1 - s) * D)``
channels with the largest ``||Q_win[:, c]|| * ||K[:, c]||``: ``Q_win`` is the last
``window`` prompt queries of the query heads sharing the KV head, ``K`` every real prompt
key. Decode queries then see a row's first ``sink`` real tokens and its last ``recent``
tokens before the query (and itself) in full, and every other key (prompt or generated)
through the row's kept channels only: the same split as LeanK (the rule
:func:`leank.contract.in_full`), with a mask per prompt instead of a static one.

The cache stores full K and V (storing them compactly is not what this baseline
measures); :meth:`ThinKCache.ideal_nbytes` is what a compact store would hold.

    cache = ThinKCache(model, sparsity=0.7)         # model with the "leank" attention
    model.generate(**inputs, **leank.cache_kwargs(cache))
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from ..architectures import check_supported, layer_windows
from ..attention import ATTN_NAME, Handle
from ..contract import capped, in_full
from ..errors import LeanKError
from ..masks import DEFAULT_RECENT, DEFAULT_SINK, check_sparsity, check_window, kv_shape

DEFAULT_WINDOW = 32


def kept_channel_count(sparsity: float, head_dim: int) -> int:
    """Channels ThinK keeps per head: ``round((1 - sparsity) * head_dim)``, at least one."""
    keep = round((1 - check_sparsity(sparsity)) * head_dim)
    if keep < 1:
        raise LeanKError(f"ThinK at sparsity {sparsity} keeps no channel of {head_dim}: use a lower sparsity")
    return keep


def select_channels(
    query: torch.Tensor, keys: torch.Tensor, pads: torch.Tensor, *, keep: int, window: int
) -> torch.Tensor:
    """ThinK's kept channels per row and KV head, bool ``[B, H_kv, D]``.

    ``query`` ``[B, H_q, T, D]`` and ``keys`` ``[B, H_kv, T, D]`` are the prompt's post-RoPE
    queries and keys; ``pads`` ``[B]`` each row's leading pad tokens (never scored).
    """
    B, Hq, T, D = query.shape
    H = keys.shape[1]
    real = torch.arange(T, device=keys.device)[None] >= pads[:, None]  # [B, T]
    q = query[:, :, -window:].float() * real[:, None, -window:, None]
    q_norm = q.view(B, H, Hq // H, -1, D).pow(2).sum(dim=(2, 3)).sqrt()
    k_norm = (keys.float() * real[:, None, :, None]).pow(2).sum(dim=2).sqrt()
    top = (q_norm * k_norm).topk(keep, dim=-1).indices
    return torch.zeros(B, H, D, dtype=torch.bool, device=keys.device).scatter_(-1, top, True)


def masked_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, pads: torch.Tensor,
    *, sink: int, recent: int, scaling: float, softcap: float | None = None, sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the last ``q`` tokens ``[B, H_q, q, D]`` over all ``T`` cached tokens → ``[B, H_q, q, D]``.

    Keys the rule :func:`leank.contract.in_full` does not give a query in full count only
    through their ``kept`` ``[B, H_kv, D]`` channels. The model's ``softcap`` and ``sinks``
    ``[H_q]`` (see :mod:`leank.contract`) apply. Computed in fp32.
    """
    B, Hq, q, D = query.shape
    H, T = keys.shape[1], keys.shape[2]
    qf = query.float().view(B, H, Hq // H, q, D)
    k = keys.float()
    full = torch.einsum("bhgqd,bhtd->bhgqt", qf, k)
    pruned = torch.einsum("bhgqd,bhtd->bhgqt", qf * kept[:, :, None, None, :], k)
    pos = torch.arange(T, device=keys.device)
    qpos = T - q + torch.arange(q, device=keys.device)
    use_full = in_full(pos, qpos, pads, sink=sink, recent=recent)  # [B, q, T]
    visible = (pos[None, None] >= pads[:, None, None]) & (pos[None, :] <= qpos[:, None])[None]
    scores = capped(torch.where(use_full[:, None, None], full, pruned) * scaling, softcap)
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    if sinks is not None:  # one more logit per query head, with no value
        scores = torch.cat([scores, sinks.float().view(1, H, Hq // H, 1, 1).expand(B, -1, -1, q, 1)], -1)
    out = torch.einsum("bhgqt,bhtd->bhgqd", torch.softmax(scores, dim=-1)[..., :T], values.float())
    return out.reshape(B, Hq, q, D).to(query.dtype)


class ThinKLayer(DynamicLayer):
    """Full K/V (as :class:`DynamicLayer`) plus each row's kept channels ``kept`` ``[B, H_kv, D]``
    and leading pads ``pads`` ``[B]``, both set by the prompt's attention."""

    is_croppable = False

    def __init__(self, *, keep: int, window: int, sink: int, recent: int):
        super().__init__()
        self.keep, self.window, self.sink, self.recent = keep, window, sink, recent
        self.kept: torch.Tensor | None = None
        self.pads: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        first = self.get_seq_length() == 0
        super().update(key_states, value_states)
        handle = Handle(self, prompt=(self.keys, self.values) if first else None)
        return handle, handle

    def after_prefill(self, query: torch.Tensor, pads: torch.Tensor) -> None:
        """Pick each row's channels from the prompt's queries and keys."""
        self.pads = pads
        self.kept = select_channels(query, self.keys, pads, keep=self.keep, window=self.window)

    def attend(self, query: torch.Tensor, scaling: float, attention_mask=None, *, softcap=None,
               sinks=None) -> torch.Tensor:
        return masked_attention(query, self.keys, self.values, self.kept, self.pads, sink=self.sink,
                                recent=self.recent, scaling=scaling, softcap=softcap, sinks=sinks)

    def reset(self) -> None:
        # Dropped, not zeroed: transformers 5.17's DynamicLayer.reset keeps stale lengths.
        self.keys = self.values = self.kept = self.pads = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise LeanKError("a ThinK cache cannot be cropped (assisted/speculative decoding): use a DynamicCache")

    def _map_rows(self, fn) -> None:
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.kept is not None:
            self.kept, self.pads = fn(self.kept), fn(self.pads)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length():
            self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length():
            self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length():
            self._map_rows(lambda t: t[indices])

    def ideal_nbytes(self) -> int:
        """Bytes a compact ThinK store would hold: per row, sink and recent tokens in full, the
        other tokens with ``keep`` K channels and full V."""
        if not self.get_seq_length() or self.pads is None:
            return 0
        _, H, seen, D = self.keys.shape
        total = 0
        for pad in self.pads.tolist():
            n = seen - pad
            full = min(self.sink, n) + min(self.recent, max(0, n - self.sink))
            total += full * 2 * H * D + (n - full) * H * (self.keep + D)
        return total * self.keys.element_size()

    def dense_nbytes(self) -> int:
        """Bytes of the full K and V held (padding included, as a DynamicCache)."""
        if not self.get_seq_length():
            return 0
        return 2 * self.keys.numel() * self.keys.element_size()


class ThinKCache(Cache):
    """A transformers ``Cache`` of :class:`ThinKLayer` for a model with the ``"leank"`` attention.

    ``sparsity``: fraction of K channels pruned per head for middle tokens; ``window``:
    prompt queries scored (default 32); ``sink``/``recent``: LeanK's defaults.
    """

    def __init__(
        self, model_or_config, *, sparsity: float, window: int = DEFAULT_WINDOW, sink: int = DEFAULT_SINK,
        recent: int = DEFAULT_RECENT,
    ):
        config = getattr(model_or_config, "config", model_or_config)
        check_supported(config)
        impl = getattr(config, "_attn_implementation", None)
        if impl != ATTN_NAME:
            raise LeanKError(f"ThinKCache needs the 'leank' attention, but the model uses {impl!r}: "
                             "call leank.enable(model) first")
        check_window(sink, recent)
        if not isinstance(window, int) or window < 1:
            raise LeanKError(f"ThinK's query window must be a positive number of tokens, got {window!r}")
        head_dim = kv_shape(config)[2]
        self.sparsity, self.window, self.sink, self.recent = sparsity, window, sink, recent
        keep = kept_channel_count(sparsity, head_dim)
        # As in LeanKCache: a hybrid model's sliding-window layers keep transformers' own layer.
        super().__init__(layers=[
            ThinKLayer(keep=keep, window=window, sink=sink, recent=recent) if w is None
            else DynamicSlidingWindowLayer(sliding_window=w) for w in layer_windows(config)
        ])

    def _bytes(self, method: str) -> int:
        return sum(getattr(layer, method)() if isinstance(layer, ThinKLayer)
                   else 2 * layer.keys.numel() * layer.keys.element_size() if layer.is_initialized else 0
                   for layer in self.layers)

    def ideal_nbytes(self) -> int:
        return self._bytes("ideal_nbytes")

    def dense_nbytes(self) -> int:
        return self._bytes("dense_nbytes")

"""The LeanK KV cache for Hugging Face transformers (5.x cache contract).

Per layer and sequence, tokens live in three stores:

* **sink** ``[B, H_kv, S, D]`` — the first ``S`` *real* tokens of each row (left padding
  skipped), full K and V;
* **window** ``[B, H_kv, cap, D]`` — the most recent tokens, full K and V. It holds
  between ``recent`` and ``recent + chunk - 1`` tokens after each step: tokens leave it
  ``chunk`` at a time, so the cost of moving them is paid once per chunk, not per step;
* **middle** — everything in between, stored *compressed*: KV heads are grouped by their
  kept-channel count ``c``; each group's K ``[B, n_heads, cap, c]`` (only its kept
  channels, packed) and V ``[B, n_heads, cap, D]`` are views of one flat buffer per layer
  (``mid_k`` ``[B, cap * sum(c)]``, ``mid_v`` ``[B, cap * n_kept_heads * D]``, heads in group
  order), so one kernel launch reads every group through per-head offset tables. Heads that
  keep no channel store nothing for middle tokens: they attend to sink and window only.

Positions are absolute (padding included). Row ``b`` has ``pads[b]`` leading pad tokens;
the window covers positions ``[w0, seen)``, middle slot ``i`` is position ``c0 + i``.
A middle slot is valid for row ``b`` iff its position is ``>= pads[b] + S`` (the row's
sink and pads are never counted there), a sink slot ``s`` iff ``pads[b] + s < w0`` (it has
left the window), a window slot iff its position is ``>= pads[b]``.

The first ``update`` (the prompt) returns a handle whose attention is plain SDPA over
the full prompt; the handle then learns each row's padding from the mask, and the layer
compresses everything but the window. Later updates append to the window and attend
with :func:`leank.kernels.decode_attention`.

    cache = LeanKCache(model, mask)
    model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=32)
    print(cache.nbytes(), cache.dense_nbytes())
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .errors import LeanKError
from .kernels import decode_attention
from .masks import ChannelMask, check_window
from .models import check_supported


class LeanKHandle:
    """What ``update`` returns instead of K/V tensors; the ``"leank"`` attention function
    calls :meth:`attend` on it."""

    __slots__ = ("layer",)

    def __init__(self, layer: LeanKLayer):
        self.layer = layer

    def attend(self, module, query: torch.Tensor, attention_mask, *, scaling: float, dropout: float = 0.0):
        """Attention output ``[B, q, H_q, D]`` for ``query`` ``[B, H_q, q, D]``."""
        layer = self.layer
        if layer.prefill_pending:
            out, _ = sdpa_attention_forward(
                module, query, layer.window_k, layer.window_v, attention_mask, scaling=scaling, dropout=dropout
            )
            layer.finish_prefill(pads_from_mask(attention_mask, query.shape[0], query.device))
            return out
        out = decode_attention(query, layer, scaling)
        layer.evict()
        return out.transpose(1, 2).contiguous()


def pads_from_mask(attention_mask: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """Leading pad tokens per row, read from the last query row of the prompt's mask."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    row = attention_mask[:, 0, -1, :]
    visible = row if row.dtype == torch.bool else row == 0
    return visible.int().argmax(-1).expand(batch).to(torch.long)


@dataclass
class MiddleGroup:
    """KV heads of one layer that keep the same number of channels (``c > 0``)."""

    heads: torch.Tensor  # long [n]
    channels: torch.Tensor  # long [n, c], ascending per head
    koff: int  # first channel of this group in a token's packed K (sum of c over earlier heads)
    voff: int  # first head of this group among the heads that keep V
    keys: torch.Tensor | None = None  # [B, n, cap, c], a view of the layer's mid_k
    values: torch.Tensor | None = None  # [B, n, cap, D], a view of the layer's mid_v

    @property
    def kept(self) -> int:
        return self.channels.shape[1]


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class LeanKLayer(DynamicLayer):
    """One decoder layer's LeanK cache; see the module docstring for the layout."""

    is_croppable = False
    is_compileable = False

    def __init__(self, kept: torch.Tensor, *, sink: int, recent: int, chunk: int, max_length: int | None = None):
        super().__init__()
        self.kept = kept.to(torch.bool)  # [H_kv, D]
        self.sink, self.recent, self.chunk, self.max_length = sink, recent, chunk, max_length
        self._clear()

    # ---- state -------------------------------------------------------------------
    def _clear(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0  # tokens seen, padding included
        self.pads: torch.Tensor | None = None  # long [B]
        self.pad_list: list[int] | None = None
        self.w0 = 0  # absolute position of window slot 0
        self.c0 = 0  # absolute position of middle slot 0
        self.window_k = self.window_v = None
        self.window_len = 0
        self.sink_k = self.sink_v = None
        self.groups: list[MiddleGroup] = []
        self.mid_k = self.mid_v = None  # flat middle buffers; groups hold views of them
        self.head_tables: tuple[torch.Tensor, ...] = ()
        self.middle_len = 0
        self.prefill_pending = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.batch, self.num_kv_heads, _, self.head_dim = key_states.shape
        if tuple(self.kept.shape) != (self.num_kv_heads, self.head_dim):
            raise LeanKError(
                f"mask rows {tuple(self.kept.shape)} do not match this layer's K "
                f"{(self.num_kv_heads, self.head_dim)}: use a mask made for this model"
            )
        counts = self.kept.sum(-1)
        self.groups = []
        # Per-head tables for kernels: kept count, K offset (channels), V offset (heads) in
        # the flat middle buffers, and the kept channel indices (padded with 0).
        head_c = torch.zeros(self.num_kv_heads, dtype=torch.int32)
        head_koff = torch.zeros_like(head_c)
        head_voff = torch.zeros_like(head_c)
        head_chan = torch.zeros(self.num_kv_heads, self.head_dim, dtype=torch.int32)
        koff = voff = 0
        for c in sorted(set(counts.tolist()) - {0}):
            heads = (counts == c).nonzero().flatten()
            channels = torch.stack([self.kept[h].nonzero().flatten() for h in heads.tolist()])
            for i, h in enumerate(heads.tolist()):
                head_c[h], head_koff[h], head_voff[h] = c, koff + i * c, voff + i
                head_chan[h, :c] = channels[i]
            self.groups.append(MiddleGroup(heads.to(self.device), channels.to(self.device), koff, voff))
            koff, voff = koff + c * len(heads), voff + len(heads)
        self.middle_k_width, self.middle_v_heads = koff, voff
        self.head_counts: list[int] = counts.tolist()
        self.head_tables = tuple(t.to(self.device) for t in (head_c, head_koff, head_voff, head_chan))
        self.is_initialized = True

    # ---- the transformers contract --------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if self.seen == 0:
            # The prompt: keep the tensors as they are; attention runs dense over them and
            # compresses right after (see `finish_prefill`).
            self.window_k, self.window_v, self.window_len = key_states, value_states, q
            self.prefill_pending = True
        else:
            self._reserve_window(self.window_len + q)
            self.window_k[:, :, self.window_len : self.window_len + q] = key_states
            self.window_v[:, :, self.window_len : self.window_len + q] = value_states
            self.window_len += q
        self.seen += q
        handle = LeanKHandle(self)
        return handle, handle

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise LeanKError("a LeanK cache cannot be cropped (assisted/speculative decoding): use a DynamicCache")

    def offload(self):
        raise LeanKError("LeanK caches do not support offloading: create the cache without offloading=True")

    prefetch = offload

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every per-row tensor, by attribute path (for the batch operations)."""
        named = {"window_k": self.window_k, "window_v": self.window_v, "sink_k": self.sink_k,
                 "sink_v": self.sink_v, "pads": self.pads, "mid_k": self.mid_k, "mid_v": self.mid_v}
        return {k: v for k, v in named.items() if v is not None}

    def _map_batch(self, fn) -> None:
        for name, tensor in self._tensors().items():
            setattr(self, name, fn(tensor))
        self._set_group_views()
        if self.pads is not None:
            self.pad_list = self.pads.tolist()
        if self.window_k is not None:
            self.batch = self.window_k.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.seen:
            self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.seen:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.seen:
            self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    # ---- compression --------------------------------------------------------------
    def finish_prefill(self, pads: torch.Tensor) -> None:
        """Called by the attention function after the dense prompt attention."""
        self.pads = pads.to(self.device, torch.long)
        self.pad_list = self.pads.tolist()
        self.c0 = min(self.pad_list) + self.sink
        self.prefill_pending = False
        if self.sink:
            shape = (self.batch, self.num_kv_heads, self.sink, self.head_dim)
            self.sink_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.sink_v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # Compress the prompt's head, then copy its tail into the window's own buffer (the
        # prompt's K/V tensors belong to the model's forward pass and are dropped here).
        n = self._evict_head()
        k, v, remaining = self.window_k, self.window_v, self.window_len - n
        self.window_k = self.window_v = None
        self.window_len = 0
        self._reserve_window(max(remaining, self.recent + self.chunk))
        self.window_k[:, :, :remaining] = k[:, :, n : n + remaining]
        self.window_v[:, :, :remaining] = v[:, :, n : n + remaining]
        self.window_len = remaining

    def evict(self) -> None:
        """Move the oldest window tokens, ``chunk`` at a time, to the sink and middle stores."""
        n = self._evict_head()
        if n:
            remaining = self.window_len - n
            for buf in (self.window_k, self.window_v):
                tail = buf[:, :, n : n + remaining]
                buf[:, :, :remaining] = tail.clone() if n < remaining else tail
            self.window_len = remaining

    def _evict_head(self) -> int:
        """Copy the window's oldest tokens that must leave it to sink/middle; return how many."""
        excess = self.window_len - self.recent
        if excess < self.chunk:
            return 0
        n = excess // self.chunk * self.chunk
        k, v = self.window_k[:, :, :n], self.window_v[:, :, :n]
        if self.w0 < max(self.pad_list) + self.sink:
            self._to_sink(k, v)
        start = max(self.w0, self.c0) - self.w0
        if start < n:
            self._to_middle(k[:, :, start:], v[:, :, start:])
        self.w0 += n
        return n

    def _to_sink(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy the evicted tokens that are some row's first ``sink`` real tokens."""
        n = k.shape[2]
        for b, pad in enumerate(self.pad_list):
            lo, hi = max(self.w0, pad), min(self.w0 + n, pad + self.sink)
            if lo < hi:
                self.sink_k[b, :, lo - pad : hi - pad] = k[b, :, lo - self.w0 : hi - self.w0]
                self.sink_v[b, :, lo - pad : hi - pad] = v[b, :, lo - self.w0 : hi - self.w0]

    def _to_middle(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        self._reserve_middle(self.middle_len + n)
        end = self.middle_len + n
        for g in self.groups:
            kg = k.index_select(1, g.heads)
            idx = g.channels[None, :, None, :].expand(kg.shape[0], -1, n, -1)
            g.keys[:, :, self.middle_len : end] = kg.gather(-1, idx)
            g.values[:, :, self.middle_len : end] = v.index_select(1, g.heads)
        self.middle_len = end

    # ---- buffers -------------------------------------------------------------------
    def _reserve_window(self, needed: int) -> None:
        if self.window_k is not None and self.window_k.shape[2] >= needed:
            return
        shape = (self.batch, self.num_kv_heads, max(needed, self.recent + self.chunk), self.head_dim)
        new_k = torch.empty(shape, dtype=self.dtype, device=self.device)
        new_v = torch.empty(shape, dtype=self.dtype, device=self.device)
        if self.window_len:
            new_k[:, :, : self.window_len] = self.window_k[:, :, : self.window_len]
            new_v[:, :, : self.window_len] = self.window_v[:, :, : self.window_len]
        self.window_k, self.window_v = new_k, new_v

    def middle_capacity(self) -> int:
        return self.mid_k.shape[1] // self.middle_k_width if self.mid_k is not None else 0

    def _set_group_views(self) -> None:
        """Point every group's ``keys``/``values`` at its part of the flat middle buffers."""
        cap = self.middle_capacity()
        for g in self.groups:
            n, c, D = g.heads.numel(), g.kept, self.head_dim
            g.keys = self.mid_k[:, cap * g.koff : cap * (g.koff + n * c)].view(-1, n, cap, c)
            g.values = self.mid_v[:, cap * D * g.voff : cap * D * (g.voff + n)].view(-1, n, cap, D)

    def _reserve_middle(self, needed: int) -> None:
        cap = self.middle_capacity()
        if needed <= cap or not self.groups:
            return
        # Exact at the prompt (or the announced max_length), then geometric growth by 1/4:
        # amortised O(1) copies per token with at most 25% slack.
        new_cap = needed if cap == 0 else max(needed, cap + cap // 4)
        if cap == 0 and self.max_length is not None:
            new_cap = max(needed, self.max_length - self.c0 - self.recent)
        old = [(g.keys, g.values) for g in self.groups]
        kw = {"dtype": self.dtype, "device": self.device}
        self.mid_k = torch.empty(self.batch, new_cap * self.middle_k_width, **kw)
        self.mid_v = torch.empty(self.batch, new_cap * self.middle_v_heads * self.head_dim, **kw)
        self._set_group_views()
        if self.middle_len:
            for g, (keys, values) in zip(self.groups, old, strict=True):
                g.keys[:, :, : self.middle_len] = keys[:, :, : self.middle_len]
                g.values[:, :, : self.middle_len] = values[:, :, : self.middle_len]

    # ---- validity (per row) ----------------------------------------------------------
    def sink_valid(self) -> torch.Tensor:
        """bool ``[B, S]``: sink slot holds a real token that has left the window."""
        slots = torch.arange(self.sink, device=self.device)
        return self.pads[:, None] + slots[None] < self.w0

    def middle_valid(self) -> torch.Tensor:
        """bool ``[B, M]``: middle slot holds a middle token of that row."""
        pos = self.c0 + torch.arange(self.middle_len, device=self.device)
        return pos[None] >= self.pads[:, None] + self.sink

    def window_valid(self, q_len: int) -> torch.Tensor:
        """bool ``[B, q, W]``: window slot is a real token visible to each of the last ``q`` queries."""
        pos = self.w0 + torch.arange(self.window_len, device=self.device)
        qpos = self.seen - q_len + torch.arange(q_len, device=self.device)
        causal = pos[None, :] <= qpos[:, None]
        return causal[None] & (pos[None, None, :] >= self.pads[:, None, None])

    # ---- accounting -----------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds (capacity, not just the used part)."""
        if self.prefill_pending:
            return _nbytes(self.window_k, self.window_v)
        total = _nbytes(self.window_k, self.window_v, self.sink_k, self.sink_v, self.pads, self.mid_k, self.mid_v)
        return total + _nbytes(*self._index_tensors())

    def _index_tensors(self) -> list[torch.Tensor]:
        return [*self.head_tables, *[t for g in self.groups for t in (g.heads, g.channels)]]

    def overhead_nbytes(self) -> dict[str, int]:
        """Where allocated bytes exceed :meth:`ideal_nbytes`, by cause (documented bound):

        * ``window``: the window buffer's capacity beyond ``recent`` tokens (up to
          ``chunk`` + new tokens, full K and V);
        * ``middle_slack``: middle capacity not yet filled (0 right after the prompt,
          at most 1/4 after growth);
        * ``padding``: middle slots of left-padded rows that precede the row's sink
          (``max(pads) - min(pads)`` tokens at most);
        * ``index``: channel/head index tensors, kernel tables and per-row pad counts.
        """
        if not self.seen or self.prefill_pending:
            return {}
        full_token = 2 * self.num_kv_heads * self.head_dim * self.window_k.element_size()
        middle_token = sum(_nbytes(g.keys[:, :, :1], g.values[:, :, :1]) for g in self.groups) // self.batch
        window_extra = max(0, self.window_k.shape[2] - self.recent) * full_token * self.batch
        cap = self.middle_capacity()
        padding_slots = int(sum(min(self.middle_len, max(0, pad + self.sink - self.c0)) for pad in self.pad_list))
        return {
            "window": window_extra,
            "middle_slack": (cap - self.middle_len) * middle_token * self.batch,
            "padding": padding_slots * middle_token,
            "index": _nbytes(self.pads, *self._index_tensors()),
        }

    def ideal_nbytes(self) -> int:
        """Bytes the method needs at the current length: per row, min(S, n) + min(R, rest) tokens
        full, the remaining middle tokens with only kept K channels and V of non-empty heads."""
        if not self.seen:
            return 0
        elem = torch.empty((), dtype=self.dtype).element_size()
        counts = self.kept.sum(-1)
        middle_token = int(counts.sum()) + self.head_dim * int((counts > 0).sum())
        full_token = 2 * self.num_kv_heads * self.head_dim
        total = 0
        for pad in self.pad_list or [0] * self.batch:
            n = self.seen - pad
            full = min(self.sink, n) + min(self.recent, max(0, n - self.sink))
            total += full * full_token + (n - full) * middle_token
        return total * elem

    def dense_nbytes(self) -> int:
        """Bytes a DynamicCache holds for the same tokens (padding included)."""
        if not self.seen:
            return 0
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.batch * self.num_kv_heads * self.seen * self.head_dim * elem


class LeanKCache(Cache):
    """A transformers ``Cache`` of :class:`LeanKLayer` built from a :class:`ChannelMask`.

    ``model_or_config``: the model (or its config) whose attention implementation is
    ``"leank"`` (see :func:`leank.enable`). ``sink``/``recent`` default to the mask's.
    ``chunk``: tokens moved out of the window at a time (default ``recent // 4`` within
    [1, 64]: the window buffer holds ``recent + chunk`` tokens, and moving a chunk shifts
    the ``recent`` tokens left behind, so ``recent / chunk`` tokens are copied per step).
    ``max_length``: expected total tokens per row, to allocate the middle store once.
    """

    def __init__(
        self, model_or_config, mask: ChannelMask, *, sink: int | None = None, recent: int | None = None,
        chunk: int | None = None, max_length: int | None = None,
    ):
        config = getattr(model_or_config, "config", model_or_config)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        check_supported(config)
        mask.check_config(config)
        sink = mask.sink if sink is None else sink
        recent = mask.recent if recent is None else recent
        check_window(sink, recent)
        chunk = max(1, min(64, recent // 4)) if chunk is None else chunk
        if not isinstance(chunk, int) or chunk < 1:
            raise LeanKError(f"chunk must be a positive number of tokens, got {chunk!r}")
        self.config, self.mask = config, mask
        self.sink, self.recent, self.chunk = sink, recent, chunk
        self._check_attention()
        layers = [
            LeanKLayer(mask.kept[i], sink=sink, recent=recent, chunk=chunk, max_length=max_length)
            for i in range(mask.num_layers)
        ]
        super().__init__(layers=layers)

    def _check_attention(self) -> None:
        impl = getattr(self.config, "_attn_implementation", None)
        if impl != "leank":
            raise LeanKError(
                f"LeanKCache needs the 'leank' attention, but the model uses {impl!r}: "
                "call leank.enable(model) first"
            )

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        self._check_attention()
        return self.layers[layer_idx].update(key_states, value_states)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def ideal_nbytes(self) -> int:
        return sum(layer.ideal_nbytes() for layer in self.layers)

    def overhead_nbytes(self) -> dict[str, int]:
        """Allocated bytes beyond the ideal, by cause, summed over layers (see LeanKLayer)."""
        total: dict[str, int] = {}
        for layer in self.layers:
            for key, value in layer.overhead_nbytes().items():
                total[key] = total.get(key, 0) + value
        return total

    def dense_nbytes(self) -> int:
        return sum(layer.dense_nbytes() for layer in self.layers)


def cache_kwargs(cache: Cache) -> dict:
    """``generate()`` keyword for a cache object: ``cache=`` where transformers has renamed
    it (``ALL_CACHE_NAMES`` lists ``"cache"``), else ``past_key_values=`` (5.17 and others)."""
    from transformers.generation import utils as generation_utils

    names = getattr(generation_utils, "ALL_CACHE_NAMES", ())
    return {"cache": cache} if "cache" in names else {"past_key_values": cache}


def dense_cache_nbytes(cache: Cache) -> int:
    """Bytes held by a transformers DynamicCache (for comparisons)."""
    return sum(_nbytes(layer.keys, layer.values) for layer in cache.layers)

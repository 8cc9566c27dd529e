"""The LeanK KV cache for Hugging Face transformers (5.x cache contract).

Each layer keeps the stores of :mod:`leank.contract`: a **ring** of the last ``R + 1``
tokens (full K and V), the **sink** (each row's first ``S`` real tokens, full K and V),
and the **middle** (every other token, only its KV head's kept K channels, and V only for
heads that keep some), packed head-major in one flat K and one flat V buffer.

* The prompt (the first update) is attended with plain SDPA, then stored (see
  :mod:`leank.attention` for the protocol).
* A **decode step** (one token per row) is a fixed-shape, tensor-indexed update: the token
  in the ring slot the new token takes (``R + 1`` positions back) moves to the sink or the
  middle store, the new token is written there, ``seen`` is incremented — all on device
  tensors, so a step never reads a host value, never branches on the length and allocates
  nothing that outlives it (only temporaries, from the graph's pool under CUDA graphs): it
  can be captured in a CUDA graph (``is_compileable``) and
  ``generate()`` compiles it on CUDA when the cache is built with ``max_length``.
* A multi-token step after the prompt is attended exactly (torch path), then stored.

Memory: with ``max_length`` every buffer is allocated at the prompt for that many tokens
per row (the ideal LeanK bytes at ``max_length`` plus the overhead itemised by
:meth:`LeanKLayer.overhead_nbytes`). Without it the middle store is sized exactly at the
prompt and grows when full, by a sixteenth (16 slots at least) but never past the dense cache's size, and the
ring starts at the prompt's length: the cache never holds more than a ``DynamicCache``
for the same tokens plus ``S + R + 2`` full tokens per row (sink and ring capacity,
scratch slots) and its index tables.

    cache = LeanKCache(model, mask, max_length=8192)
    model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=32)
    print(cache.nbytes(), cache.dense_nbytes())
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, StaticSlidingWindowLayer

from .architectures import check_supported, layer_windows, text_config
from .attention import Handle
from .contract import DecodeView
from .errors import LeanKError
from .kernels import decode_attention, decode_attention_torch, fused_store, resolve_backend, store_step
from .masks import ChannelMask, check_window
from .parallel import kv_head_rows
from .quant import KVQuant, hadamard, quantize, rotation_block


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _mark_static(*tensors: torch.Tensor) -> None:
    """Tell torch.compile these buffers keep their address (updated in place), as
    transformers' StaticLayer does: CUDA graphs then read them without copies."""
    if not torch.compiler.is_compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t)


class LeanKLayer(DynamicLayer):
    """One decoder layer's LeanK cache; see the module docstring and :mod:`leank.contract`."""

    is_croppable = False

    def __init__(self, kept: torch.Tensor, *, sink: int, recent: int, max_length: int | None = None,
                 backend: str = "auto", quant: KVQuant | None = None):
        super().__init__()
        self.kept = kept.to(torch.bool)  # [H_kv, D]
        self.sink, self.recent, self.max_length, self.backend = sink, recent, max_length, backend
        self.quant = quant
        self.is_compileable = max_length is not None
        counts = self.kept.sum(-1)
        self.head_counts = tuple(int(c) for c in counts)
        self.kv_heads = sum(c > 0 for c in self.head_counts)  # heads whose middle V is stored
        self.middle_width = sum(self.head_counts)  # K elements per middle token
        self._clear()

    # ---- state -------------------------------------------------------------------
    def _clear(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.view: DecodeView | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # K/V stored after their attention
        self.length = 0  # tokens stored (host copy of `seen`; not kept up by compiled steps)
        self.capacity = 0  # middle token slots, scratch excluded
        self.sink_k = self.sink_v = self.ring_k = self.ring_v = self.mid_k = self.mid_v = self.pads = None
        self.mid_kp = self.mid_vp = self.rotation = None
        self.sink_full = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.batch, self.num_kv_heads, _, self.head_dim = key_states.shape
        H, D = self.num_kv_heads, self.head_dim
        if tuple(self.kept.shape) != (H, D):
            raise LeanKError(
                f"mask rows {tuple(self.kept.shape)} do not match this layer's K {(H, D)}: use a mask made for "
                "this model (under tensor parallelism, build the cache from the model, not its config)"
            )
        # Per-head tables (the contract's head_c/koff/voff/chan) and, for storing tokens,
        # where each packed K channel and each stored V element comes from in a token's
        # flattened [H * D] K/V.
        head_c = torch.tensor(self.head_counts, dtype=torch.int32)
        head_koff = torch.zeros(H, dtype=torch.int32)
        head_voff = torch.zeros(H, dtype=torch.int32)
        head_chan = torch.zeros(H, D, dtype=torch.int32)
        head_kpoff = torch.zeros(H, dtype=torch.int32)
        k_src, k_head, k_col, v_head = [], [], [], []
        koff = voff = kpoff = 0
        for h, c in enumerate(self.head_counts):
            if not c:
                continue
            channels = self.kept[h].nonzero().flatten()
            head_koff[h], head_voff[h], head_kpoff[h] = koff, voff, kpoff
            head_chan[h, :c] = channels
            k_src += (h * D + channels).tolist()
            k_head += [koff] * c
            k_col += list(range(c))
            v_head.append(voff)
            koff, voff, kpoff = koff + self._k_row(c), voff + 1, kpoff + self._kp_row(c)
        dev = self.device
        self.tables = tuple(t.to(dev) for t in (head_c, head_koff, head_voff, head_chan))
        self.head_kpoff = head_kpoff.to(dev) if self.quant else None
        self.quant_rows = self._quant_rows(head_koff, head_kpoff) if self.quant else []
        long = dict(dtype=torch.long, device=dev)
        kept_heads = [h for h, c in enumerate(self.head_counts) if c]
        self.k_src = torch.tensor(k_src, **long)
        self.k_head_off = torch.tensor(k_head, **long)  # the head's K offset (channels), per packed channel
        self.k_col = torch.tensor(k_col, **long)  # position within the head's kept channels
        self.k_step = torch.tensor([c for c in self.head_counts for _ in range(c)], **long)  # the head's count
        self.v_src = (torch.tensor(kept_heads, **long)[:, None] * D + torch.arange(D, device=dev)).flatten()
        self.v_head_off = torch.tensor(v_head, **long).repeat_interleave(D)
        self.v_col = torch.arange(D, device=dev).repeat(len(kept_heads))
        self.seen = torch.zeros((), **long)
        self.c0 = torch.zeros((), **long)
        self._c0 = 0
        # KVQuant(rotate=True): a Hadamard block over the packed kept channels (leank.quant)
        block = rotation_block(self.head_counts, self.quant.group) if self.quant and self.quant.rotate else 1
        self.rotation = hadamard(block, device=dev) if block > 1 else None
        # Static too: CUDA graphs copy every non-static tensor input in at each replay.
        _mark_static(*self.tables, self.k_src, self.k_head_off, self.k_col, self.k_step, self.v_src,
                     self.v_head_off, self.v_col, *self._quant_index(), *self._rotation())
        self.is_initialized = True

    # ---- rotated K (KVQuant(rotate=True); leank.quant) ---------------------------------
    def _rotation(self) -> list[torch.Tensor]:
        return [self.rotation] if self.rotation is not None else []

    def _rotated(self, x: torch.Tensor) -> torch.Tensor:
        """K ``[B, H, T, D]`` or queries ``[B, H * G, T, D]`` with every KV head's kept channels
        rotated (block Hadamard; the others as they are); unchanged without rotation."""
        if self.rotation is None:
            return x
        B, HG, T, D = x.shape
        H, block = self.num_kv_heads, self.rotation.shape[0]
        flat = x.view(B, H, HG // H, T, D).permute(0, 2, 3, 1, 4).reshape(B, HG // H, T, H * D)
        kept = flat.index_select(-1, self.k_src).float()  # [B, G, T, sum(c)]: the heads' kept channels in order
        turned = (kept.unflatten(-1, (-1, block)) @ self.rotation).flatten(-2).to(x.dtype)
        flat = flat.index_copy(-1, self.k_src, turned)
        return flat.view(B, HG // H, T, H, D).permute(0, 3, 1, 2, 4).reshape(B, HG, T, D)

    # ---- the quantised middle store (leank.contract; leank.quant) -----------------------
    def _k_row(self, c: int) -> int:
        """``mid_k`` elements per slot of a head keeping ``c`` channels (codes when quantised)."""
        return self.quant.row_bytes(c) if self.quant else c

    def _kp_row(self, c: int) -> int:
        """``mid_kp`` elements (scale, zero pairs) per slot of such a head."""
        return self.quant.row_params(c) if self.quant else 0

    def _v_rows(self) -> tuple[int, int]:
        """``mid_v`` and ``mid_vp`` elements per slot of a head that keeps channels."""
        D = self.head_dim
        return (self.quant.row_bytes(D), self.quant.row_params(D)) if self.quant else (D, 0)

    def _quant_rows(self, head_koff: torch.Tensor, head_kpoff: torch.Tensor) -> list[dict]:
        """The rows a token's quantised middle write is made of, one entry per kind (K rows by kept
        count, then V): ``src`` ``[heads, n]`` indices into the token's flattened ``[H * D]``, each
        head's code and params offsets (per slot units), the row widths and the target buffers."""
        D, dev = self.head_dim, self.device
        rows = []
        for c in sorted({c for c in self.head_counts if c}):
            heads = [h for h, hc in enumerate(self.head_counts) if hc == c]
            src = torch.stack([h * D + self.kept[h].nonzero().flatten() for h in heads])
            rows.append(dict(src=src.to(dev), n=c, codes="mid_k", params="mid_kp", code_off=head_koff[heads].tolist(),
                             param_off=head_kpoff[heads].tolist(), code_w=self._k_row(c), param_w=self._kp_row(c)))
        kept_heads = [h for h, c in enumerate(self.head_counts) if c]
        if kept_heads:
            vb, vp = self._v_rows()
            src = torch.tensor(kept_heads, device=dev)[:, None] * D + torch.arange(D, device=dev)
            rows.append(dict(src=src, n=D, codes="mid_v", params="mid_vp", code_off=[i * vb for i in range(len(src))],
                             param_off=[i * vp for i in range(len(src))], code_w=vb, param_w=vp))
        return rows

    def _quant_index(self) -> list[torch.Tensor]:
        return [t for row in self.quant_rows for t in (row["src"], row.get("code_base"), row.get("param_base"))
                if t is not None] + ([self.head_kpoff] if self.head_kpoff is not None else [])

    # ---- the transformers contract --------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        stored = self._rotated(key_states)  # what the stores hold (rotated K: attend() rotates the queries)
        if self.view is None:  # the prompt: SDPA over it (as the model gave it), then `after_prefill` stores it
            self.batch = key_states.shape[0]
            self.pending = (stored, value_states)
            handle = Handle(self, prompt=(key_states, value_states))
        elif q == 1:
            if not torch.compiler.is_compiling():
                self._reserve(self.length + 1)
                self.length += 1
            self._step(stored, value_states)
            handle = Handle(self)
        else:
            self._reserve(int(self.seen) + q)
            self.pending = (stored, value_states)
            handle = Handle(self)
        return handle, handle

    def after_prefill(self, query: torch.Tensor, pads: torch.Tensor) -> None:
        """Called by the attention function after the dense prompt attention: allocate the
        stores for this batch and its padding, and store the prompt."""
        k, v = self.pending
        self.pending = None
        self._allocate(pads.to(self.device, torch.long), k.shape[2])
        self._commit(k, v)

    def attend(self, query: torch.Tensor, scaling: float, attention_mask: torch.Tensor | None = None, *,
               softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """LeanK attention ``[B, H_q, q, D]`` of the step's queries ``[B, H_q, q, D]`` with the model's
        score terms (``softcap``, ``sinks`` ``[H_q]``; see :mod:`leank.contract`). Padding is taken
        from the prompt (left padding); later steps must not add any."""
        sinks = sinks.detach() if sinks is not None else None
        query = self._rotated(query)
        if self.pending is not None:  # several tokens after the prompt: exact torch path, then store
            self._refuse_new_padding(attention_mask, self.pending[0].shape[2])
            out = decode_attention_torch(query, self.view, scaling, softcap=softcap, sinks=sinks, pending=self.pending)
            self._commit(*self.pending)
            self.pending = None
            return out
        return decode_attention(query, self.view, scaling, softcap=softcap, sinks=sinks, backend=self.backend)

    def _refuse_new_padding(self, attention_mask: torch.Tensor | None, q: int) -> None:
        """A multi-token step whose mask hides some of its own tokens (padding inside a later
        chunk, e.g. a batched continuation of rows of different lengths) is refused: the
        stores know each row's padding from the prompt only."""
        if attention_mask is None:
            return
        start = int(self.seen)
        new = attention_mask[:, 0, -1, start : start + q]  # the last query's view of the new tokens
        hidden = ~new if new.dtype == torch.bool else new != 0
        if bool(hidden.any()):
            raise LeanKError(
                "a LeanK cache takes padding from the prompt only (left padding): this step pads some rows "
                "inside the new tokens; continue rows of different lengths in separate caches or one row at a time"
            )

    def get_seq_length(self):
        # A copy: the stored count keeps changing in place.
        return self.seen.clone() if self.view is not None else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The decode path reads no mask (padding is known from the prompt); a fixed size keeps
        # the mask's shape static under torch.compile.
        if self.view is None:
            return query_length, 0
        return max(self.max_length or self.length + query_length, query_length), 0

    def get_max_length(self) -> int:
        return self.max_length if self.max_length is not None else -1

    def reset(self) -> None:
        """Forget the sequence. The buffers are kept, and the next prompt of the same batch size
        reuses them: a compiled decode step (captured with their addresses) stays valid."""
        if self.is_initialized:
            self.seen.zero_()
        self.view, self.pending, self.length = None, None, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise LeanKError("a LeanK cache cannot be cropped (assisted/speculative decoding): use a DynamicCache")

    def offload(self):
        raise LeanKError("LeanK caches do not support offloading: create the cache without offloading=True")

    prefetch = offload

    # ---- batch operations (beam search, batch expansion) ------------------------------
    def _rows(self) -> tuple[str, ...]:
        quantised = ("mid_kp", "mid_vp") if self.quant else ()
        return ("sink_k", "sink_v", "ring_k", "ring_v", "mid_k", "mid_v", *quantised, "pads")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.view is not None:  # in place: the buffers keep their addresses (CUDA graphs)
            for name in self._rows():
                t = getattr(self, name)
                t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def _map_rows(self, fn) -> None:
        if self.view is None:
            return
        for name in self._rows():
            setattr(self, name, fn(getattr(self, name)))
        self.batch = self.pads.shape[0]
        _mark_static(*(getattr(self, name) for name in self._rows()))
        self._set_view()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    # ---- storage -------------------------------------------------------------------
    def _allocate(self, pads: torch.Tensor, prompt: int) -> None:
        B, H, D, S = self.batch, self.num_kv_heads, self.head_dim, self.sink
        total = self.max_length if self.max_length is not None else prompt
        if total < prompt:
            raise LeanKError(f"the prompt has {prompt} tokens, more than this cache's max_length {total}")
        ring = min(self.recent + 1, total)
        # With max_length the middle is sized for a row without padding (c0 = S), whatever the
        # padding: the same shapes for every prompt of this batch size, so buffers are reused.
        c0 = int(pads.min()) + S
        capacity = max(0, total - (self.recent + 1) - (S if self.max_length is not None else c0))
        self.seen.zero_()
        self.c0.fill_(c0)
        self._c0 = c0  # its host copy: an eager step sizes the stores without reading the device
        self.length = 0
        self.sink_full = False
        if self.ring_k is not None and self.ring_k.shape == (B, H, ring, D) and self.capacity == capacity \
                and self.mid_k.shape[0] == B:
            self.pads.copy_(pads)
            self._set_view()
            return
        kw = dict(dtype=self.dtype, device=self.device)
        self.sink_k = torch.zeros(B, H, S + 1, D, **kw)
        self.sink_v = torch.zeros(B, H, S + 1, D, **kw)
        self.ring_k = torch.zeros(B, H, ring, D, **kw)
        self.ring_v = torch.zeros(B, H, ring, D, **kw)
        self.pads = pads.clone()  # its own storage: reorders write it in place
        self.capacity = 0
        self._layout_middle(capacity)
        _mark_static(self.sink_k, self.sink_v, self.ring_k, self.ring_v, self.pads, self.seen, self.c0)

    def _layout_middle(self, capacity: int) -> None:
        """(Re)allocate the middle store for ``capacity`` token slots (plus one scratch slot)
        and copy what it holds."""
        old_slots = self.capacity + 1
        slots, B = capacity + 1, self.batch
        for name, dtype, heads in self._middle_buffers():
            old = getattr(self, name) if self.capacity else None
            width = sum(w for _, w in heads)
            setattr(self, name, torch.zeros(B, max(1, slots * width), dtype=dtype, device=self.device))
            if old is not None:  # each head's used slots move to its new place
                new, used = getattr(self, name), old_slots - 1
                for off, w in heads:
                    new[:, off * slots : off * slots + used * w] = old[:, off * old_slots : off * old_slots + used * w]
        self.capacity = capacity
        # Where slot 0 of each packed K channel / stored V element (or code byte and scale/zero
        # pair of each quantised row) lives; slot i adds i * the row's width.
        self.k_base = self.k_head_off * slots + self.k_col
        self.v_base = self.v_head_off * slots * self.head_dim + self.v_col
        for row in self.quant_rows:
            off = torch.tensor(row["code_off"], dtype=torch.long, device=self.device)
            row["code_base"] = (off[:, None] * slots + torch.arange(row["code_w"], device=self.device)).flatten()
            off = torch.tensor(row["param_off"], dtype=torch.long, device=self.device)
            row["param_base"] = (off[:, None] * slots + torch.arange(row["param_w"], device=self.device)).flatten()
        _mark_static(*(getattr(self, name) for name, _, _ in self._middle_buffers()), self.k_base, self.v_base,
                     *self._quant_index())
        self._set_view()

    def _middle_buffers(self) -> list[tuple[str, torch.dtype, list[tuple[int, int]]]]:
        """The middle store's flat buffers: (name, dtype, per head that keeps channels: (offset,
        width) in the buffer's elements per slot); see :mod:`leank.contract`."""
        kept = [(h, c) for h, c in enumerate(self.head_counts) if c]
        koff, voff = self.tables[1].tolist(), self.tables[2].tolist()
        v_w, vp_w = self._v_rows()
        code = torch.uint8 if self.quant else self.dtype
        out = [("mid_k", code, [(koff[h], self._k_row(c)) for h, c in kept]),
               ("mid_v", code, [(voff[h] * v_w, v_w) for h, _ in kept])]
        if self.quant:
            kpoff = self.head_kpoff.tolist()
            out += [("mid_kp", self.dtype, [(kpoff[h], self._kp_row(c)) for h, c in kept]),
                    ("mid_vp", self.dtype, [(voff[h] * vp_w, vp_w) for h, _ in kept])]
        return out

    def _set_view(self) -> None:
        quant = self.quant
        self.view = DecodeView(
            self.sink_k, self.sink_v, self.ring_k, self.ring_v, self.mid_k, self.mid_v, *self.tables,
            self.pads, self.seen, self.c0, sink=self.sink, recent=self.recent, slots=self.capacity + 1,
            head_counts=self.head_counts, mid_kp=self.mid_kp, mid_vp=self.mid_vp, head_kpoff=self.head_kpoff,
            quant_bits=quant.bits if quant else 0, quant_group=quant.group if quant else 0,
            quant_symmetric=quant.symmetric if quant else False,
        )

    def _reserve(self, tokens: int) -> None:
        """Room for ``tokens`` tokens per row (eager only): grow the ring (up to ``R + 1``) and
        the middle store; a cache built with ``max_length`` refuses to pass it instead."""
        if self.max_length is not None:
            if tokens > self.max_length:
                raise LeanKError(
                    f"this LeanK cache was built for max_length={self.max_length} tokens per row and the "
                    f"sequence reaches {tokens}: build it with a larger max_length"
                )
            return
        ring = self.ring_k.shape[2]
        if tokens > ring and ring < self.recent + 1:  # nothing has left the ring yet: slot = position
            size = min(self.recent + 1, max(tokens, ring + ring // 4))
            for name in ("ring_k", "ring_v"):
                old = getattr(self, name)
                new = old.new_zeros(*old.shape[:2], size, old.shape[3])
                new[:, :, :ring] = old
                setattr(self, name, new)
            self._set_view()
        needed = tokens - (self.recent + 1) - self._c0
        if needed > self.capacity:
            # A sixteenth more, at least 16 slots (amortised: 16 token copies per step against the
            # M tokens attention reads), never more middle bytes than the dense cache's for `tokens`.
            full_token, middle_token = self._token_bytes()
            dense_bound = tokens * full_token // max(1, middle_token)
            self._layout_middle(max(needed, min(self.capacity + max(16, self.capacity // 16), dense_bound)))

    def _store(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write tokens at positions ``pos`` ``[m]`` (K/V ``[B, H, m, D]``) that leave the ring
        into the sink (rows where they are among the first ``S`` real tokens) and the middle
        store; writes that belong nowhere go to scratch slots. Fixed shapes, no host values."""
        B, H, m, D = k.shape
        S = self.sink
        if not self.sink_full:
            idx = pos[None, :] - self.pads[:, None]  # [B, m] sink slot
            idx = torch.where((idx >= 0) & (idx < S), idx, S)[:, None, :, None].expand(B, H, m, D)
            self.sink_k.scatter_(2, idx, k)
            self.sink_v.scatter_(2, idx, v)
        if not self.middle_width:
            return
        slot = pos - self.c0
        slot = torch.where((slot >= 0) & (slot < self.capacity), slot, self.capacity)[:, None]  # [m, 1]
        k_tok = k.transpose(1, 2).reshape(B, m, H * D)
        v_tok = v.transpose(1, 2).reshape(B, m, H * D)
        if self.quant:  # each row quantised on its own (leank.quant), codes and scale/zero pairs written
            for row in self.quant_rows:
                codes, params = quantize((k_tok if row["codes"] == "mid_k" else v_tok)[:, :, row["src"]], self.quant)
                for name, base, width, data in ((row["codes"], row["code_base"], row["code_w"], codes),
                                                (row["params"], row["param_base"], row["param_w"], params)):
                    getattr(self, name).index_copy_(1, (base + slot * width).flatten(), data.flatten(1))
            return
        self.mid_k.index_copy_(1, (self.k_base + slot * self.k_step).flatten(), k_tok[:, :, self.k_src].flatten(1))
        self.mid_v.index_copy_(1, (self.v_base + slot * D).flatten(), v_tok[:, :, self.v_src].flatten(1))

    def _step(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """A decode step's update: the token ``W`` positions back leaves the ring slot the new
        token takes (to sink/middle; nothing when it does not exist), then the new one is written.
        On CUDA one kernel does it (:func:`leank.kernels.store_step`); these torch ops are its
        reference."""
        if fused_store(self.device, self.backend):
            store_step(k, v, self.view, sink_write=not self.sink_full, backend=self.backend)
            return
        ring = self.ring_k.shape[2]
        slot = (self.seen % ring).view(1)
        self._store((self.seen - ring).view(1), self.ring_k.index_select(2, slot), self.ring_v.index_select(2, slot))
        self.ring_k.index_copy_(2, slot, k)
        self.ring_v.index_copy_(2, slot, v)
        self.seen.add_(1)

    def _commit(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``m`` new tokens (eager: prompt or a multi-token step), attended already."""
        ring, start = self.ring_k.shape[2], int(self.seen)  # (compiled steps do not keep `length`)
        end = start + k.shape[2]
        dev = self.device
        pos = torch.arange(max(0, start - ring), end, device=dev)  # the ring's tokens, then the new ones
        old = pos[pos < start] % ring
        keys = torch.cat([self.ring_k[:, :, old], k], 2)
        values = torch.cat([self.ring_v[:, :, old], v], 2)
        leave = pos < end - ring
        if bool(leave.any()):
            self._store(pos[leave], keys[:, :, leave], values[:, :, leave])
        stay = ~leave
        self.ring_k.index_copy_(2, pos[stay] % ring, keys[:, :, stay])
        self.ring_v.index_copy_(2, pos[stay] % ring, values[:, :, stay])
        self.seen.fill_(end)
        self.length = end
        # Every row's sink has left the ring: later steps write no sink slot (a constant for
        # a compiled step, so it has no sink write at all).
        self.sink_full = end - ring >= int(self.pads.max()) + self.sink

    # ---- accounting -----------------------------------------------------------------
    def _stored(self) -> int:
        return int(self.seen) if self.view is not None else 0

    def middle_length(self) -> int:
        """Tokens in the compressed middle store (slots ``[0, M)``; see :mod:`leank.contract`)."""
        return max(0, self._stored() - self.ring_k.shape[2] - int(self.c0)) if self.view is not None else 0

    def _index_tensors(self) -> list[torch.Tensor]:
        return [*self.tables, self.pads, self.seen, self.c0, self.k_src, self.k_head_off, self.k_col, self.k_step,
                self.v_src, self.v_head_off, self.v_col, self.k_base, self.v_base, *self._quant_index(),
                *self._rotation()]

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds (capacity, not just the used part; after
        :meth:`reset` the buffers kept for the next prompt)."""
        if self.ring_k is None:
            return _nbytes(*self.pending) if self.pending is not None else 0
        return _nbytes(self.sink_k, self.sink_v, self.ring_k, self.ring_v, self.mid_k, self.mid_v, self.mid_kp,
                       self.mid_vp, *self._index_tensors())

    def _token_bytes(self) -> tuple[int, int]:
        """(bytes of a full token, bytes of a middle token) per row; a quantised middle token counts
        its codes and its scale/zero pairs."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        full = 2 * self.num_kv_heads * self.head_dim * elem
        if not self.quant:
            return full, (self.middle_width + self.kv_heads * self.head_dim) * elem
        v_w, vp_w = self._v_rows()
        kept = [c for c in self.head_counts if c]
        return full, sum(self._k_row(c) + self._kp_row(c) * elem for c in kept) + len(kept) * (v_w + vp_w * elem)

    def ideal_nbytes(self) -> int:
        """Bytes the method needs at the current length: per row, its first ``S`` real tokens and
        the ``R`` most recent in full, every other real token with only the kept K channels and
        the V of heads that keep some."""
        seen = self._stored()
        if not seen:
            return 0
        full_token, middle_token = self._token_bytes()
        total = 0
        for pad in self.pads.tolist():
            n = seen - pad
            full = min(self.sink, n) + min(self.recent, max(0, n - self.sink))
            total += full * full_token + (n - full) * middle_token
        return total

    def overhead_nbytes(self) -> dict[str, int]:
        """Where allocated bytes exceed :meth:`ideal_nbytes`, by cause (they sum to the difference):

        * ``middle_slack``: middle slots not yet filled, plus the scratch slot (no unfilled
          slot right after a prompt without ``max_length``; up to a sixteenth or 16 slots after
          growth) and the 1-element placeholders when no head keeps a channel;
        * ``padding``: middle slots of left-padded rows that precede the row's sink
          (``max(pads) - min(pads)`` tokens at most);
        * ``index``: the contract's tables, per-row pads, lengths and the store index tensors;
        * ``window``: the rest — sink and ring slots beyond the ideal's full tokens (scratch
          slot, the ring's ``R + 1``-th token, slots of rows shorter than ``S + R``): at most
          ``S + R + 2`` full tokens per row.
        """
        seen = self._stored()
        if not seen:
            return {}
        _, middle_token = self._token_bytes()
        M = self.middle_length()
        c0 = int(self.c0)
        padding = sum(min(M, max(0, pad + self.sink - c0)) for pad in self.pads.tolist()) * middle_token
        out = {
            "middle_slack": _nbytes(self.mid_k, self.mid_v, self.mid_kp, self.mid_vp) - M * middle_token * self.batch,
            "padding": padding,
            "index": _nbytes(*self._index_tensors()),
        }
        out["window"] = self.nbytes() - self.ideal_nbytes() - sum(out.values())
        return out

    def dense_nbytes(self) -> int:
        """Bytes a DynamicCache holds for the same tokens (padding included)."""
        seen = self._stored()
        return self.batch * seen * self._token_bytes()[0] if seen else 0


class LeanKCache(Cache):
    """A transformers ``Cache`` of :class:`LeanKLayer` built from a :class:`ChannelMask`.

    Full-attention layers are LeanK layers (mask row ``i`` for the ``i``-th of them); the
    sliding-window layers of a hybrid model are transformers' own sliding layers
    (``DynamicSlidingWindowLayer``, or ``StaticSlidingWindowLayer`` with ``max_length``), never
    compressed (:mod:`leank.architectures`). ``compressed``: the indices of the LeanK layers.
    Byte accounting counts a sliding layer's bytes in :meth:`nbytes`, :meth:`ideal_nbytes` and
    :meth:`dense_nbytes` alike (transformers' default cache holds the same).

    ``model_or_config``: the model (or its config) whose attention implementation is
    ``"leank"`` (see :func:`leank.enable`). ``sink``/``recent`` default to the mask's.
    ``max_length``: tokens per row (prompt, padding included, plus new tokens) to allocate
    every buffer for at the prompt; a cache with it is static (``is_compileable``: on CUDA
    ``generate()`` captures each decode step in a CUDA graph). Eager steps refuse to go past
    it; a compiled step cannot check on the host (its writes past the capacity land in scratch
    slots, memory-safe, and attention would miss those tokens): size it for the whole generation.
    Without it the stores grow as needed (eager decoding only).
    ``backend``: decode attention (``"auto"``, ``"torch"``, ``"triton"``; see
    :mod:`leank.kernels`), resolved once here.
    ``quant``: a :class:`~leank.quant.KVQuant` to store the middle tokens' kept K channels and V
    as int8 or packed int4 codes with per-group scales and zero points (sink and recent window
    stay in the model's dtype; byte accounting counts codes, scales and zero points).

    Under tensor parallelism (``from_pretrained(..., tp_plan=...)``, one cache per process,
    built from the model) each process's cache holds its own KV heads with their mask rows
    (:mod:`leank.parallel`); byte counts are per process (:func:`leank.parallel.sum_over_ranks`).
    """

    def __init__(
        self, model_or_config, mask: ChannelMask, *, sink: int | None = None, recent: int | None = None,
        max_length: int | None = None, backend: str | None = None, quant: KVQuant | None = None,
    ):
        config = getattr(model_or_config, "config", model_or_config)
        config = text_config(config)
        check_supported(config)
        mask.check_config(config)
        sink = mask.sink if sink is None else sink
        recent = mask.recent if recent is None else recent
        check_window(sink, recent)
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise LeanKError(f"max_length must be a positive number of tokens, got {max_length!r}")
        if quant is not None and not isinstance(quant, KVQuant):
            raise LeanKError(f"quant must be a leank.KVQuant (e.g. KVQuant(bits=4)) or None, got {quant!r}")
        self.config, self.mask, self.quant = config, mask, quant
        self.sink, self.recent, self.max_length = sink, recent, max_length
        self._check_attention()
        backend = resolve_backend(backend)
        heads = kv_head_rows(model_or_config, mask.kept.shape[1])  # this process's KV heads (tensor parallelism)
        layers = []
        for window in layer_windows(config):
            if window is None:
                kept = mask.kept[sum(isinstance(x, LeanKLayer) for x in layers)][heads]
                layers.append(LeanKLayer(kept, sink=sink, recent=recent, max_length=max_length, backend=backend,
                                         quant=quant))
            elif max_length is None:
                layers.append(DynamicSlidingWindowLayer(sliding_window=window))
            else:
                layers.append(StaticSlidingWindowLayer(max_cache_len=max_length, sliding_window=window))
        self.compressed = tuple(i for i, layer in enumerate(layers) if isinstance(layer, LeanKLayer))
        super().__init__(layers=layers)

    def _check_attention(self) -> None:
        impl = getattr(self.config, "_attn_implementation", None)
        if impl != "leank":
            raise LeanKError(
                f"LeanKCache needs the 'leank' attention, but the model uses {impl!r}: "
                "call leank.enable(model) first"
            )

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if not torch.compiler.is_compiling():
            self._check_attention()
            first = self.layers[self.compressed[0]]
            if layer_idx == self.compressed[0] and first.view is not None:
                # Compiled steps do not keep the host count: one read per eager step brings it back
                # (every layer stores the same tokens), so the max_length check stays exact.
                length = int(first.seen)
                for layer in self.leank_layers():
                    layer.length = length
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def reset(self) -> None:
        """Forget the sequence (LeanK layers keep their buffers). A growing cache's sliding layers
        start afresh: transformers 5.17's ``DynamicLayer.reset`` zeroes its tensors in place, and
        the next prompt would be appended to those zeros."""
        super().reset()
        for i, layer in enumerate(self.layers):
            if isinstance(layer, DynamicSlidingWindowLayer):
                self.layers[i] = DynamicSlidingWindowLayer(sliding_window=layer.sliding_window)

    def leank_layers(self) -> list[LeanKLayer]:
        """The compressed layers, in model order."""
        return [self.layers[i] for i in self.compressed]

    def _sliding_nbytes(self) -> int:
        return sum(_nbytes(layer.keys, layer.values) for layer in self.layers
                   if not isinstance(layer, LeanKLayer) and layer.is_initialized)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.leank_layers()) + self._sliding_nbytes()

    def ideal_nbytes(self) -> int:
        return sum(layer.ideal_nbytes() for layer in self.leank_layers()) + self._sliding_nbytes()

    def overhead_nbytes(self) -> dict[str, int]:
        """Allocated bytes beyond the ideal, by cause, summed over layers (see LeanKLayer)."""
        total: dict[str, int] = {}
        for layer in self.leank_layers():
            for key, value in layer.overhead_nbytes().items():
                total[key] = total.get(key, 0) + value
        return total

    def dense_nbytes(self) -> int:
        return sum(layer.dense_nbytes() for layer in self.leank_layers()) + self._sliding_nbytes()


def cache_kwargs(cache: Cache) -> dict:
    """``generate()`` keyword for a cache object: ``cache=`` where transformers has renamed
    it (``ALL_CACHE_NAMES`` lists ``"cache"``), else ``past_key_values=`` (5.17 and others)."""
    from transformers.generation import utils as generation_utils

    names = getattr(generation_utils, "ALL_CACHE_NAMES", ())
    return {"cache": cache} if "cache" in names else {"past_key_values": cache}


def dense_cache_nbytes(cache: Cache) -> int:
    """Bytes held by a transformers DynamicCache (for comparisons)."""
    return sum(_nbytes(layer.keys, layer.values) for layer in cache.layers)

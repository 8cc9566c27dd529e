"""The distillation objective: the frozen model with channel scales on middle keys.

Prompt queries attend with full K (as the deployed cache does), so the student's hidden
states on the prompt equal the teacher's, and only the *decode region* (question and
answer, positions ``>= context_end``) differs. One training example therefore costs a
no-grad teacher pass over the whole sequence plus a student pass over the decode region
only, attending to the teacher's prompt K/V:

* query ``i`` sees key ``j <= i`` with full K when the rule :func:`leank.contract.in_full`
  says so (``j < sink`` or ``i - j <= recent``: relative to each query, like the cache),
  and through ``scale ⊙ K`` otherwise;
* in the binary stage, KV heads whose mask keeps no channel ignore middle keys entirely
  (as the deployed cache does), instead of attending to them with zero logits.

A hybrid model's sliding-window layers are not compressed: they attend densely (the model's
own mask keeps their window), so α exists only for the compressed layers.

Loss = ||h_student − h_teacher||² / ||h_teacher||² over the final hidden states that
predict the answer tokens (relative MSE: the same λ suits any hidden size).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from ..architectures import layer_windows
from ..attention import Handle
from ..cache import cache_kwargs
from ..contract import capped, in_full
from ..masks import aligned_counts, mask_from_counts


class ScaledPromptLayer(DynamicLayer):
    """Holds the teacher's prompt K/V of one layer; the decode-region forward attends to them
    and its own K/V (kept for that forward only) with ``scale`` on middle keys (None: the teacher,
    every key in full). ``masks``: the pass's (``use_full``, ``visible``) ``[q, T]``, made once for
    all layers by :func:`decode_hidden`.

    ``checkpoint``: recompute the attention in the backward pass instead of keeping its
    ``[q, T]`` scores, probabilities and fp32 copies of K/V for every layer (activation
    checkpointing; the same arithmetic, so the same loss and gradients): the student's
    memory then grows with one layer's attention, not all of them."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        scale: torch.Tensor | None,
        masks: tuple[torch.Tensor, torch.Tensor],
        *,
        empty_heads: torch.Tensor | None,
        checkpoint: bool = False,
    ):
        super().__init__()
        self.prompt_k, self.prompt_v, self.scale, self.masks = keys, values, scale, masks
        self.empty_heads, self.checkpoint = empty_heads, checkpoint
        self.is_initialized = True
        self.length = keys.shape[2]

    def update(self, key_states, value_states, *args, **kwargs):
        self.current = key_states, value_states
        handle = Handle(self)
        return handle, handle

    def attend(self, query: torch.Tensor, scaling: float, attention_mask=None, *, softcap=None,
               sinks=None) -> torch.Tensor:
        (k_new, v_new), self.current = self.current, None  # [B, H, q, D]; not kept past this forward
        args = (query, self.prompt_k, self.prompt_v, k_new, v_new, self.scale, sinks)
        kw = dict(scaling=scaling, softcap=softcap, masks=self.masks, empty_heads=self.empty_heads)
        if self.checkpoint and torch.is_grad_enabled():
            # Inputs are saved by reference (the prompt K/V are the prompt cache's own tensors). No RNG state to
            # restore: the attention draws no random numbers, and reading it inside a CUDA graph capture fails
            # before torch 2.10.
            return torch.utils.checkpoint.checkpoint(scaled_attention, *args, use_reentrant=False,
                                                     preserve_rng_state=False, **kw)
        return scaled_attention(*args, **kw)

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0


def scaled_attention(query, prompt_k, prompt_v, k_new, v_new, scale, sinks, *, scaling, softcap, masks,
                     empty_heads) -> torch.Tensor:
    """The student's attention ``[B, H_q, q, D]`` of the decode-region queries over the prompt
    K/V and their own (module docstring), in fp32. ``scale`` ``[H, D]`` on the middle keys (None:
    every key in full, the teacher); ``empty_heads`` ``[H]``; ``masks``: (``use_full``, ``visible``) bool
    ``[q, T]``."""
    B, Hq, q, D = query.shape
    K, V = torch.cat([prompt_k, k_new], 2), torch.cat([prompt_v, v_new], 2)  # [B, H, T, D]
    H = K.shape[1]
    qf = query.float().view(B, H, Hq // H, q, D)
    kf = K.float()
    use_full, visible = masks
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qf, kf) * scaling
    if scale is not None:
        scaled = torch.einsum("bhgqd,bhkd->bhgqk", qf * scale.float()[None, :, None, None, :], kf) * scaling
        scores = torch.where(use_full, scores, scaled)
    scores = capped(scores, softcap)
    if empty_heads is not None:  # binary stage: heads keeping nothing skip middle keys
        visible = visible & (use_full | ~empty_heads[:, None, None, None])  # [H, 1, q, T]
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:  # the model's learned sink logits: one more softmax term per query head, no value
        scores = torch.cat([scores, sinks.float().view(1, H, -1, 1, 1).expand(B, H, -1, q, 1)], -1)
    probs = torch.softmax(scores, dim=-1)[..., : K.shape[2]]
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, V.float())
    return out.view(B, Hq, q, D).to(query.dtype)


def binary_scale(alpha: torch.Tensor, sparsity: float, alignment: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through binarisation of α ``[L, H, D]``: forward value the aligned binary
    mask (the rule of :func:`leank.masks.binarize`), gradient the identity to α.
    Returns (scale, empty_heads bool [L, H])."""
    counts = aligned_counts(alpha, sparsity, alignment)
    hard = mask_from_counts(alpha, counts).to(alpha.device, alpha.dtype)
    return hard + (alpha - alpha.detach()), (counts == 0).to(alpha.device)


PROMPT_BUCKET = 512


def prompt_cache(model, sample_ids: torch.Tensor, context_end: int, *, bucket: int | None = None,
                 keep_padding: bool = False) -> DynamicCache:
    """The frozen model's K/V for the prompt ``[:, :context_end]`` (no grad).

    On a GPU (``bucket`` None: :data:`PROMPT_BUCKET` there, 1 elsewhere) the pass runs over the prompt
    padded at its end to a multiple of ``bucket`` tokens (copies of its last token), and the K/V are
    cut back to ``context_end``: in a causal model later tokens do not change a position's K/V, so this
    is the unpadded pass's result up to rounding (kernels may block a longer sequence differently).
    Why: cuDNN attention (torch's SDPA backend on Hopper GPUs) builds a graph for every new sequence
    length, ~3 ms per layer on an H200, and training draws a new length every step — on SmolLM2 ~85 ms
    of a ~0.4 s step (benchmarks/results/train_scale_h200/). Models with sliding-window layers (whose
    cache keeps only the window), models whose RoPE depends on the sequence length (dynamic NTK,
    LongRoPE: the padding could change every position's frequencies) and prompts the padding would
    take past the model's context run unpadded. ``keep_padding``: the K/V of the padded pass, padding
    included (its length tells whether the pass was padded)."""
    ids = sample_ids[:, :context_end]
    bucket = bucket or (PROMPT_BUCKET if ids.is_cuda else 1)
    pad = -context_end % bucket
    limit = getattr(model.config, "max_position_embeddings", None) or context_end + pad
    if pad and context_end + pad <= limit and _length_independent(model):
        ids = torch.cat([ids, ids[:, -1:].expand(-1, pad)], 1)
    cache = DynamicCache()
    with torch.no_grad():
        _decoder(model)(input_ids=ids, use_cache=True, **cache_kwargs(cache))
    if ids.shape[1] > context_end and not keep_padding:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :context_end], layer.values[:, :, :context_end]
    return cache


def _length_independent(model) -> bool:
    """A position's K/V do not depend on how many tokens follow it: no sliding-window layer (its cache
    keeps only the last window) and no RoPE whose frequencies follow the sequence length."""
    if any(w is not None for w in layer_windows(model.config)):
        return False
    for module in model.modules():
        kind = getattr(module, "rope_type", None)
        kinds = kind.values() if isinstance(kind, dict) else [kind]
        if any(isinstance(k, str) and ("dynamic" in k or k == "longrope") for k in kinds):
            return False
    return True


def region_masks(key_pos: torch.Tensor, key_valid: torch.Tensor, query_pos: torch.Tensor, *, sink: int,
                 recent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode-region pass's (``use_full``, ``visible``) bool ``[q, T]``, shared by every layer: query
    ``query_pos`` ``[q]`` sees key ``key_pos`` ``[T]`` when the key is valid (``key_valid``: not padding) and
    not after it, in full by :func:`leank.contract.in_full`."""
    use_full = in_full(key_pos, query_pos, torch.zeros(1, dtype=torch.long, device=key_pos.device), sink=sink,
                       recent=recent)[0]
    return use_full, key_valid[None, :] & (key_pos[None, :] <= query_pos[:, None])


def decode_hidden(
    model,
    sample_ids: torch.Tensor,
    prompt: DynamicCache,
    scale: torch.Tensor | None,
    *,
    sink: int,
    recent: int,
    empty_heads: torch.Tensor | None = None,
    checkpoint: bool = False,
) -> torch.Tensor:
    """Final hidden states ``[1, T - P, hidden]`` of the decode region with ``scale`` ``[rows, H, D]``
    on middle keys (row ``i``: the ``i``-th compressed layer; None: every key in full, the teacher)."""
    context_end = prompt.get_seq_length()
    device, total = sample_ids.device, sample_ids.shape[1]
    i = torch.arange(context_end, total, device=device)  # query positions
    j = torch.arange(total, device=device)  # key positions
    masks = region_masks(j, torch.ones(total, dtype=torch.bool, device=device), i, sink=sink, recent=recent)
    kv = [(layer.keys, layer.values) for layer in prompt.layers]
    return region_hidden(model, sample_ids[:, context_end:], i, kv, masks, scale, empty_heads, checkpoint=checkpoint)


def region_hidden(model, region_ids: torch.Tensor, positions: torch.Tensor, prompt_kv, masks, scale, empty_heads, *,
                  checkpoint: bool = False) -> torch.Tensor:
    """The decode-region forward behind :func:`decode_hidden`: tokens ``region_ids`` ``[1, q]`` at
    ``positions`` ``[q]`` over each layer's prompt K/V ``prompt_kv`` (``(keys, values)`` ``[1, H, P, D]`` per
    layer, P keys at positions ``0 … P-1``) and their own, with :func:`region_masks`' ``masks`` ``[q, P + q]``;
    ``scale``/``empty_heads`` per compressed layer. No host sync: a CUDA graph can capture it (:mod:`.graphs`)."""
    layers, row = [], 0
    for window, (keys, values) in zip(layer_windows(model.config), prompt_kv, strict=True):
        if window is not None:  # a sliding-window layer: dense, over a copy of the prompt K/V
            dense = DynamicLayer()
            dense.update(keys, values)
            layers.append(dense)
            continue
        layer_scale = None if scale is None else scale[row]
        layer_empty = None if empty_heads is None else empty_heads[row]
        layers.append(ScaledPromptLayer(keys, values, layer_scale, masks, empty_heads=layer_empty,
                                        checkpoint=checkpoint))
        row += 1
    out = _decoder(model)(
        input_ids=region_ids,
        position_ids=positions[None],
        use_cache=True,
        **cache_kwargs(Cache(layers=layers)),
    )
    return out.last_hidden_state


def distill_loss(
    model,
    sample_ids: torch.Tensor,
    context_end: int,
    answer_mask: torch.Tensor,
    scale: torch.Tensor,
    *,
    sink: int,
    recent: int,
    empty_heads: torch.Tensor | None = None,
    prompt: DynamicCache | None = None,
    teacher: torch.Tensor | None = None,
    checkpoint: bool = False,
    region=None,
) -> torch.Tensor:
    """Relative hidden-state MSE of one sample ``[1, T]``, differentiable w.r.t. ``scale``
    ``[L, H, D]``, on the positions that predict answer tokens.

    The teacher is the same decode-region computation with every key in full (exactly the full
    attention, through the same arithmetic: a scale of 1 gives the same scores bit for bit), so
    the loss is 0 at α = 1 in any dtype.
    ``prompt``/``teacher`` may be passed in to reuse them across calls on one sample;
    ``checkpoint``: recompute each layer's attention in the backward pass (less memory, same result);
    ``region`` (a :class:`leank.train.graphs.StaticRegion`, which brings its own prompt pass, sink and
    recent): both decode-region passes at padded shapes, replayed as CUDA graphs on a GPU (the same loss up
    to rounding).
    """
    predict = answer_mask[1:].nonzero().flatten()
    predict = predict[predict >= context_end] - context_end
    if predict.numel() == 0:
        raise ValueError("the sample has no answer token after its context")
    if region is not None:
        if prompt is not None or teacher is not None or (sink, recent) != (region.sink, region.recent):
            raise ValueError("a region makes its own prompt K/V and teacher, with its own sink and recent")
        student, teacher = region(sample_ids, context_end, scale, empty_heads, checkpoint=checkpoint)
        return relative_mse(student, teacher, predict)
    prompt = prompt if prompt is not None else prompt_cache(model, sample_ids, context_end)
    if teacher is None:
        with torch.no_grad():
            teacher = decode_hidden(model, sample_ids, prompt, None, sink=sink, recent=recent)
    student = decode_hidden(model, sample_ids, prompt, scale, sink=sink, recent=recent, empty_heads=empty_heads,
                            checkpoint=checkpoint)
    return relative_mse(student, teacher, predict)


def relative_mse(student: torch.Tensor, teacher: torch.Tensor, predict: torch.Tensor) -> torch.Tensor:
    """The loss on the decode-region rows ``predict`` of hidden states ``[1, q, hidden]``."""
    s = student[0, predict].float()
    t = teacher[0, predict].float()
    return (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)


def _decoder(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model

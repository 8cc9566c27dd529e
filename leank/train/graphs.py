"""A training sample's decode-region passes at fixed shapes, captured as CUDA graphs.

On a small model (SmolLM2-135M) a training step is bound by the host: ~11,000 small kernels
launched one by one from Python while the GPU idles (benchmarks/results/train_smollm2_time_h200).
:class:`StaticRegion` pads each sample to a few shapes and replays, per shape, one CUDA graph
for the teacher's and the student's decode-region forward passes and one for the student's
backward pass (:func:`leank.train.distill.region_hidden`; the prompt pass stays eager):

* the prompt pass runs over the prompt padded to a multiple of ``prompt_bucket`` tokens (as on
  any GPU, :func:`~leank.train.distill.prompt_cache`), and its K/V are kept padded: the padding
  keys are invisible to every query (:func:`~leank.train.distill.region_masks`);
* the decode region is padded at its end to a multiple of ``query_bucket`` tokens: later tokens
  are never seen by earlier ones, and the loss reads the real rows only.

So a sample's loss and α's gradient are the eager objective's up to rounding (reductions over
padded lengths), bit for bit when nothing is padded. Each shape is captured on first use (one
warm-up pass, then the capture). The graphs share one memory pool (about the largest shape's
activations) and one prompt K/V store: safe because a sample's backward replay always comes
before the next sample's forward replay (:class:`_Replay` refuses anything else). On the CPU
(``capture=False``) the same padded passes run eagerly: that is what the CPU tests check.

Not for models whose prompt pass cannot be padded (sliding-window layers, RoPE that follows
the sequence length) or that route tokens to experts: :func:`unsupported` says why.
"""

from __future__ import annotations

import torch

from ..errors import LeanKError
from .distill import PROMPT_BUCKET, _length_independent, prompt_cache, region_hidden, region_masks

QUERY_BUCKET = 64  # SmolLM2's training samples have 26-66 question + answer tokens: two shapes per prompt length
_SCALE, _KV = 4, 6  # inputs: ids, positions, use_full, visible, scale, empty_heads, then each layer's K and V


def unsupported(model) -> str | None:
    """Why the model's training passes cannot be captured this way, or None: a prompt pass that cannot be
    padded (sliding-window layers keep only their window; RoPE that follows the sequence length), or
    mixture-of-experts layers (their routing sizes tensors by the data, a host sync inside the capture)."""
    if not _length_independent(model):
        return "it has sliding-window layers or a RoPE that follows the sequence length"
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    if any(getattr(config, name, None) for name in ("num_local_experts", "num_experts", "n_routed_experts",
                                                     "moe_num_experts")):
        return "it routes tokens to experts (mixture of experts)"
    return None


class StaticRegion:
    """Callable ``(sample_ids [1, T], context_end, scale, empty_heads, *, checkpoint)`` → (student, teacher)
    final hidden states ``[1, T - context_end, hidden]`` of the decode region, as
    :func:`~leank.train.distill.decode_hidden` gives them (module docstring). ``max_prompt``: the longest
    prompt expected (sizes the shared K/V store up front; a longer one grows it)."""

    def __init__(self, model, *, sink: int, recent: int, capture: bool, prompt_bucket: int = PROMPT_BUCKET,
                 query_bucket: int = QUERY_BUCKET, max_prompt: int = 0):
        reason = unsupported(model)
        if reason is not None:
            raise LeanKError(f"cannot train this model with CUDA graphs: {reason} (use --no-cuda-graphs)")
        self.model, self.sink, self.recent, self.capture = model, sink, recent, capture
        self.prompt_bucket, self.query_bucket, self.max_prompt = prompt_bucket, query_bucket, max_prompt
        self.replays = 0  # forward replays so far: a backward must follow its own forward's replay
        self.reset()

    def reset(self) -> None:
        """Drop every captured shape and its memory (e.g. before capturing again with recomputation)."""
        self.graphs: dict[tuple, _Captured] = {}
        self.kv_store: list[torch.Tensor] | None = None
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def __call__(self, sample_ids: torch.Tensor, context_end: int, scale: torch.Tensor,
                 empty_heads: torch.Tensor | None, *, checkpoint: bool = False):
        inputs = self.inputs(sample_ids, context_end, scale, empty_heads)
        q = sample_ids.shape[1] - context_end
        if not self.capture:
            student, teacher = self._passes(checkpoint)(*inputs)
            return student[:, :q], teacher[:, :q]
        with torch.cuda.device(sample_ids.device):  # streams, capture and replay on the sample's GPU
            key = (inputs[0].shape[1], inputs[2].shape[1], checkpoint)  # (padded region, keys, recompute)
            if key not in self.graphs:
                self.graphs[key] = self._capture(checkpoint, inputs)
            student, teacher = _Replay.apply(self, self.graphs[key], *inputs)
        return student[:, :q], teacher[:, :q]

    def _capture(self, checkpoint: bool, inputs) -> _Captured:
        try:
            with torch.enable_grad():  # a shape first met in a validation pass (no grad) is captured all the same
                return _Captured(self._passes(checkpoint), self._static(inputs), self.pool)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:  # a capture that fails leaves nothing usable (and may hide running out of memory)
            self.reset()
            cause = (str(e).splitlines() or [type(e).__name__])[0]
            raise LeanKError(f"capturing a training step as a CUDA graph failed ({cause}): train with "
                             "--no-cuda-graphs (add --resume to continue this run)") from e

    def inputs(self, sample_ids: torch.Tensor, context_end: int, scale: torch.Tensor,
               empty_heads: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The padded passes' inputs: region ids ``[1, q']`` and positions ``[q']``, masks ``[q', P' + q']``,
        ``scale``, ``empty_heads`` (all False in stage 1), each layer's prompt keys and values ``[1, H, P', D]``."""
        device, total = sample_ids.device, sample_ids.shape[1]
        prompt = prompt_cache(self.model, sample_ids, context_end, bucket=self.prompt_bucket, keep_padding=True)
        kv = [t for layer in prompt.layers for t in (layer.keys, layer.values)]
        padded = self._prompt_length(context_end)
        if kv[0].shape[2] < padded:  # the pass ran unpadded (the model's context ends first): zero keys, masked
            kv = [torch.nn.functional.pad(t, (0, 0, 0, padded - t.shape[2])) for t in kv]
        q = total - context_end
        region = sample_ids[:, context_end:]
        region = torch.cat([region, region[:, -1:].expand(-1, -q % self.query_bucket)], 1)
        positions = torch.arange(context_end, context_end + region.shape[1], device=device)
        prompt_pos = torch.arange(padded, device=device)
        key_pos = torch.cat([prompt_pos, positions])
        key_valid = torch.cat([prompt_pos < context_end,
                               torch.ones(region.shape[1], dtype=torch.bool, device=device)])
        use_full, visible = region_masks(key_pos, key_valid, positions, sink=self.sink, recent=self.recent)
        if empty_heads is None:
            empty_heads = torch.zeros(scale.shape[:2], dtype=torch.bool, device=scale.device)
        return (region, positions, use_full, visible, scale, empty_heads, *kv)

    def _prompt_length(self, tokens: int) -> int:
        """A prompt of ``tokens`` tokens, padded: the next multiple of ``prompt_bucket``."""
        return -(-tokens // self.prompt_bucket) * self.prompt_bucket

    def _static(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """A new shape's own copies of the inputs; its prompt K/V are views of one store shared by every shape
        (sized for ``max_prompt`` or the longest prompt seen), so the graphs hold one prompt's K/V, not one per
        shape."""
        kv = inputs[_KV:]
        length = kv[0].shape[2]
        if self.kv_store is None or self.kv_store[0].shape[2] < length:  # graphs captured before keep the old one
            size = max(length, self._prompt_length(self.max_prompt))
            self.kv_store = [x.new_empty(x.shape[:2] + (size,) + x.shape[3:]) for x in kv]
        return (*(x.detach().clone() for x in inputs[:_KV]), *(s[:, :, :length] for s in self.kv_store))

    def _passes(self, checkpoint: bool):
        model = self.model

        def passes(region, positions, use_full, visible, scale, empty_heads, *kv):
            prompt_kv = list(zip(kv[0::2], kv[1::2], strict=True))
            masks = (use_full, visible)
            with torch.no_grad():  # the teacher: every key in full
                teacher = region_hidden(model, region, positions, prompt_kv, masks, None, None)
            student = region_hidden(model, region, positions, prompt_kv, masks, scale, empty_heads,
                                    checkpoint=checkpoint)
            return student, teacher

        return passes


class _Captured:
    """One shape's graphs: the forward passes (student and teacher) and the student's backward to ``scale``,
    over ``inputs`` (static tensors that each replay's inputs are copied into)."""

    def __init__(self, passes, inputs: tuple[torch.Tensor, ...], pool):
        self.inputs = inputs
        self.inputs[_SCALE].requires_grad_(True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy initialisation (cuBLAS workspaces, …) outside the capture
            student, _ = passes(*self.inputs)
            torch.autograd.grad(student, self.inputs[_SCALE], torch.ones_like(student))
        torch.cuda.current_stream().wait_stream(side)
        del student
        self.forward, self.backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.forward, pool=pool):
            self.student, self.teacher = passes(*self.inputs)
        self.grad_student = torch.empty_like(self.student)
        with torch.cuda.graph(self.backward, pool=pool):
            (self.grad_scale,) = torch.autograd.grad(self.student, self.inputs[_SCALE], self.grad_student)


class _Replay(torch.autograd.Function):
    """Copies a sample's inputs into a captured shape's, replays its forward graph, and in the backward pass
    its backward graph. Outputs and the gradient are copied out of the graphs' memory (the next replay of
    any shape may reuse it); a backward pass must come before the next forward replay of any shape (they
    share memory): summing two samples' losses before one backward is refused."""

    @staticmethod
    def forward(ctx, region: StaticRegion, captured: _Captured, *inputs):
        for static, x in zip(captured.inputs, inputs, strict=True):
            static.copy_(x)
        captured.forward.replay()
        region.replays += 1
        ctx.region, ctx.replay, ctx.captured = region, region.replays, captured
        teacher = captured.teacher.clone()
        ctx.mark_non_differentiable(teacher)
        return captured.student.clone(), teacher

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_student, _grad_teacher):
        if ctx.region.replays != ctx.replay:
            raise RuntimeError("a CUDA-graph training sample must be backpropagated before the next sample's "
                               "forward pass (its activations are reused): call backward once per sample")
        captured = ctx.captured
        captured.grad_student.copy_(grad_student)
        captured.backward.replay()
        grads = [None] * len(captured.inputs)
        grads[_SCALE] = captured.grad_scale.clone()
        return (None, None, *grads)

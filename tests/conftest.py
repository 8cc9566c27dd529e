"""Shared fixtures: tiny random models of every supported architecture (CPU, fp32)."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter (must be set before leank imports them).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
}


def tiny_model(
    arch: str = "llama", *, layers: int = 2, kv_heads: int = 2, groups: int = 2, head_dim: int = 16,
    vocab: int = 97, seed: int = 0, qk_gain: float = 1.0, attn: str = "sdpa",
):
    """A random model small enough for CPU tests. ``qk_gain`` scales the Q and K
    projections: peaked attention, so which keys a query sees changes its output more."""
    config_cls, model_cls, extra = ARCHS[arch]
    config = config_cls(
        vocab_size=vocab, hidden_size=kv_heads * groups * head_dim, intermediate_size=64,
        num_hidden_layers=layers, num_attention_heads=kv_heads * groups, num_key_value_heads=kv_heads,
        head_dim=head_dim, max_position_embeddings=1024,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False, **extra,
    )
    if arch == "qwen2":
        config.use_sliding_window = False
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(qk_gain)
            layer.self_attn.k_proj.weight.mul_(qk_gain)
    return model


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    return request.param


def left_padded(batch_lengths: list[int], vocab: int, generator: torch.Generator):
    """Random prompts of the given real lengths, left-padded with token 0 to the longest."""
    width = max(batch_lengths)
    ids = torch.zeros(len(batch_lengths), width, dtype=torch.long)
    attention_mask = torch.zeros_like(ids)
    for row, n in enumerate(batch_lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=generator)
        attention_mask[row, width - n :] = 1
    return ids, attention_mask

"""Shared fixtures: tiny random models of every supported architecture (CPU, fp32)."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter (must be set before leank imports them).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import transformers

# name -> (config class, model class, config extras, default attention): every supported
# architecture, hybrid ones with a window short enough to slide within a test's generation.
# GPT-OSS and Gemma 2 default to eager attention (SDPA cannot express sinks or soft-capping).
_HYBRID = {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"]}
ARCH_SPECS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "sdpa"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False}, "sdpa"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}, "sdpa"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}, "sdpa"),
    # A window covering the whole context is full attention: compressed.
    "mistral_window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 1024}, "sdpa"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}, "sdpa"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 32}, "sdpa"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}, "sdpa"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, "sdpa"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}, "sdpa"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {**_HYBRID, "attn_logit_softcapping": 4.0, "final_logit_softcapping": 30.0,
                "query_pre_attn_scalar": 24}, "eager"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**_HYBRID, "query_pre_attn_scalar": 24}, "sdpa"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, "sdpa"),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                {"attention_multiplier": 0.3, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                 "logits_scaling": 2.0}, "sdpa"),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", {**_HYBRID, "layer_types": ["full_attention",
                                                                                    "sliding_attention"]}, "sdpa"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                {**_HYBRID, "num_local_experts": 4, "num_experts_per_tok": 2}, "eager"),
}
# Architectures this transformers lacks are skipped (the GPU machine's 5.17 has all of these).
ARCHS = {name: spec for name, spec in ARCH_SPECS.items()
         if hasattr(transformers, spec[0]) and hasattr(transformers, spec[1])}
BASIC_ARCHS = ("llama", "qwen2", "qwen3", "mistral")


def default_attention(arch: str) -> str:
    return ARCHS[arch][3]


def tiny_model(
    arch: str = "llama", *, layers: int = 2, kv_heads: int = 2, groups: int = 2, head_dim: int = 16,
    vocab: int = 97, seed: int = 0, qk_gain: float = 1.0, attn: str | None = None,
):
    """A random model small enough for CPU tests. ``qk_gain`` scales the Q and K
    projections: peaked attention, so which keys a query sees changes its output more.
    ``attn``: the attention implementation (default: the architecture's own default)."""
    config_name, model_name, extra, default_attn = ARCHS[arch]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    extra = dict(extra)
    if "layer_types" in extra:  # the pattern, repeated over the layers
        extra["layer_types"] = [extra["layer_types"][i % 2] for i in range(layers)]
    config = config_cls(
        vocab_size=vocab, hidden_size=kv_heads * groups * head_dim, intermediate_size=64,
        num_hidden_layers=layers, num_attention_heads=kv_heads * groups, num_key_value_heads=kv_heads,
        head_dim=head_dim, max_position_embeddings=1024,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False, **extra,
    )
    config._attn_implementation = attn or default_attn
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            attn_module = layer.self_attn
            if hasattr(attn_module, "qkv_proj"):  # Phi-3: fused, Q rows then K rows
                q_and_k = attn_module.num_heads * head_dim + kv_heads * head_dim if hasattr(
                    attn_module, "num_heads") else (kv_heads * groups + kv_heads) * head_dim
                attn_module.qkv_proj.weight[:q_and_k].mul_(qk_gain)
            else:
                attn_module.q_proj.weight.mul_(qk_gain)
                attn_module.k_proj.weight.mul_(qk_gain)
            if hasattr(attn_module, "sinks"):  # GPT-OSS initialises its sinks to 0: make them matter
                attn_module.sinks.normal_(0.0, 1.0)
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

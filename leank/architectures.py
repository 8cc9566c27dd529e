"""Which transformers architectures LeanK runs on, and which of their layers it compresses.

Every supported model reaches LeanK through the registered ``"leank"`` attention function
and the cache contract (no model file is copied or edited). Some add a term to the
attention scores that LeanK's decode path honours, as the model passes it to every
attention function:

* a **scaling** other than ``1/sqrt(head_dim)`` (Gemma 2/3 ``query_pre_attn_scalar``,
  Granite ``attention_multiplier``): the ``scaling`` argument;
* **soft-capping** ``cap * tanh(score / cap)`` (Gemma 2 ``attn_logit_softcapping``): ``softcap``;
* **learned sinks**, one logit per query head in the softmax denominator (GPT-OSS): ``s_aux``.

**Layers.** A full-attention layer is compressed (a :class:`~leank.cache.LeanKLayer`); a
sliding-window layer is never compressed — it keeps transformers' own sliding cache layer
inside the same ``LeanKCache`` (LeanK's saving is on long-range keys, which only the global
layers keep). A window that covers the model's whole context (``max_position_embeddings``)
is full attention. A model whose every layer slides has nothing to compress and is refused.
"""

from __future__ import annotations

from .errors import LeanKError

# model_type -> the name users know
SUPPORTED = {
    "llama": "Llama", "mistral": "Mistral", "mixtral": "Mixtral", "qwen2": "Qwen2", "qwen2_moe": "Qwen2-MoE",
    "qwen3": "Qwen3", "qwen3_moe": "Qwen3-MoE", "phi3": "Phi-3", "gemma": "Gemma", "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3", "olmo2": "OLMo 2", "granite": "Granite", "cohere2": "Cohere2", "gpt_oss": "GPT-OSS",
}
# model_type -> why LeanK cannot run it (the common ones people ask about)
UNSUPPORTED = {
    "deepseek_v2": "its multi-head latent attention caches a shared latent, not per-head post-RoPE K",
    "deepseek_v3": "its multi-head latent attention caches a shared latent, not per-head post-RoPE K",
    "llama4": "its chunked-attention layers are a third layer kind the LeanK cache does not hold",
    "gemma3n": "its layers share KV caches, which a per-layer LeanK store cannot provide",
    "gemma3": "pass the text model (Gemma3ForCausalLM, model type gemma3_text): image tokens attend "
              "bidirectionally in the multimodal model",
    "mistral3": "a multimodal wrapper whose image tokens LeanK has not been tested with: pass the text model",
}
UNSUPPORTED["llama4_text"] = UNSUPPORTED["llama4"]
UNSUPPORTED["gemma3n_text"] = UNSUPPORTED["gemma3n"]


def text_config(config):
    """The decoder's config (multimodal wrappers hold it inside)."""
    if hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True)
    return config


def model_name(config) -> str:
    model_type = getattr(config, "model_type", None)
    return SUPPORTED.get(model_type, repr(model_type))


def layer_windows(config) -> list[int | None]:
    """Per decoder layer: ``None`` for full attention, else its sliding window (tokens)."""
    config = text_config(config)
    window = getattr(config, "sliding_window", None) or None  # Qwen2-MoE stores 0 for "none"
    types = getattr(config, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers
    context = getattr(config, "max_position_embeddings", None)
    out = []
    for i, kind in enumerate(types):
        if kind == "full_attention":
            out.append(None)
        elif kind == "sliding_attention" and window:
            out.append(None if context is not None and window >= context else window)
        else:
            raise LeanKError(f"layer {i} of this {model_name(config)} config has attention type {kind!r} "
                             f"(sliding_window={window}), which LeanK does not support")
    return out


def kv_heads_and_dim(config) -> tuple[int, int]:
    """(KV heads, head_dim) of a decoder config (``head_dim`` defaults to hidden / heads)."""
    c = text_config(config)
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return kv_heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def compressed_layers(config) -> tuple[int, ...]:
    """Indices of the layers LeanK compresses (the full-attention layers); a ``LeanKError`` when none."""
    windows = layer_windows(config)
    layers = tuple(i for i, w in enumerate(windows) if w is None)
    if not layers:
        raise LeanKError(
            f"every layer of this {model_name(text_config(config))} config uses sliding-window attention "
            f"(window {windows[0]} tokens): LeanK compresses only full-attention layers, so there is nothing "
            "to compress; use transformers' default cache, or a config with full-attention layers"
        )
    return layers


def check_supported(config) -> None:
    """Refuse architectures whose attention LeanK does not handle, naming the reason (the
    wrapper's model type first: a multimodal wrapper is refused even if its decoder is not)."""
    outer, inner = getattr(config, "model_type", None), getattr(text_config(config), "model_type", None)
    for model_type in (outer, inner):
        if model_type in UNSUPPORTED:
            raise LeanKError(f"model type {model_type!r} is not supported by LeanK: {UNSUPPORTED[model_type]}")
    config = text_config(config)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise LeanKError(
            f"model type {model_type!r} is not supported by LeanK: use one of {', '.join(SUPPORTED)} "
            f"({', '.join(SUPPORTED.values())})"
        )
    compressed_layers(config)

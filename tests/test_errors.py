"""Every user mistake gets a one-line LeanKError naming the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GPT2Config

import leank
from leank.cli import main as cli_main
from leank.errors import LeanKError
from leank.masks import ChannelMask, binarize

from .conftest import left_padded, tiny_model


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_mask_for_another_model():
    model = tiny_model("llama", layers=2, kv_heads=2, head_dim=16)
    leank.enable(model)
    for shape in [(3, 2, 16), (2, 4, 16), (2, 2, 32)]:
        with pytest.raises(LeanKError, match="does not match the model") as e:
            leank.LeanKCache(model, ChannelMask(torch.ones(shape, dtype=torch.bool), model="other"))
        one_line(e)


def test_unreadable_mask_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not safetensors")
    with pytest.raises(LeanKError, match="not a valid .safetensors") as e:
        ChannelMask.load(bad)
    one_line(e)
    with pytest.raises(LeanKError, match="not found"):
        ChannelMask.load(tmp_path / "missing.safetensors")


def test_non_binary_mask_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"mask": torch.tensor([[[0, 1, 2, 1]]], dtype=torch.uint8)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(LeanKError, match="only 0 and 1"):
        ChannelMask.load(tmp_path / "m.safetensors")
    save_file({"mask": torch.rand(1, 1, 4)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(LeanKError, match="boolean"):
        ChannelMask.load(tmp_path / "f.safetensors")
    save_file({"other": torch.ones(1, 1, 4)}, str(tmp_path / "o.safetensors"))
    with pytest.raises(LeanKError, match="no tensor named 'mask'"):
        ChannelMask.load(tmp_path / "o.safetensors")


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(LeanKError, match=r"sparsity must be in \[0, 1\)") as e:
        binarize(torch.rand(1, 1, 16), sparsity=sparsity)
    one_line(e)


@pytest.mark.parametrize("alignment", [0, 3, 7, 32])
def test_alignment_not_dividing_head_dim(alignment):
    with pytest.raises(LeanKError, match="does not divide head_dim") as e:
        binarize(torch.rand(1, 1, 16), sparsity=0.5, alignment=alignment)
    one_line(e)


def test_negative_sink_or_recent():
    model = tiny_model("llama")
    leank.enable(model)
    mask = ChannelMask.full(2, 2, 16)
    with pytest.raises(LeanKError, match="sink must be a non-negative"):
        leank.LeanKCache(model, mask, sink=-1)
    with pytest.raises(LeanKError, match="recent must be a non-negative"):
        leank.LeanKCache(model, mask, recent=-5)
    with pytest.raises(LeanKError, match="non-negative"):
        ChannelMask(torch.ones(1, 1, 4, dtype=torch.bool), sink=-2)


def test_unsupported_architecture():
    with pytest.raises(LeanKError, match="not supported by LeanK") as e:
        leank.models.check_supported(GPT2Config())
    one_line(e)


def test_mistral_sliding_window_refused():
    """Every layer slides (a window shorter than the context): nothing to compress."""
    from transformers import MistralConfig

    with pytest.raises(LeanKError, match="every layer of this Mistral config uses sliding-window attention") as e:
        leank.models.check_supported(MistralConfig(sliding_window=4096, max_position_embeddings=32768))
    one_line(e)
    leank.models.check_supported(MistralConfig(sliding_window=32768, max_position_embeddings=32768))  # = full


def test_unsupported_architecture_names_the_reason():
    from transformers import PretrainedConfig

    config = PretrainedConfig()
    config.model_type = "deepseek_v3"
    with pytest.raises(LeanKError, match="'deepseek_v3' is not supported by LeanK: its multi-head latent") as e:
        leank.models.check_supported(config)
    one_line(e)


def test_mask_for_the_wrong_layers_of_a_hybrid_model():
    model = tiny_model("gemma2", layers=4)  # layers 1 and 3 are full attention
    leank.enable(model)
    with pytest.raises(LeanKError, match=r"\(its 2 full-attention layers \[1, 3\]\)") as e:
        leank.LeanKCache(model, ChannelMask.full(4, 2, 16))
    one_line(e)
    with pytest.raises(LeanKError, match=r"compresses layers \[0, 2\], but the model's full-attention layers "
                                         r"are \[1, 3\]") as e:
        leank.LeanKCache(model, ChannelMask.full(2, 2, 16, layers=(0, 2)))
    one_line(e)
    with pytest.raises(LeanKError, match="ascending model layer indices") as e:
        ChannelMask.full(2, 2, 16, layers=(3, 1))
    one_line(e)
    # a mask of the right shape that does not say which layers its rows are for (e.g. one made for a
    # plain 2-layer model) would be mapped silently to layers 1 and 3
    with pytest.raises(LeanKError, match=r"hybrid \(its full-attention layers are \[1, 3\]\) and the mask does "
                                         r"not record") as e:
        leank.LeanKCache(model, ChannelMask.full(2, 2, 16))
    one_line(e)
    with pytest.raises(LeanKError, match="mask layers must be model layer indices") as e:
        ChannelMask.full(2, 2, 16, layers=5)
    one_line(e)


@pytest.mark.parametrize("name, reason", [
    ("Gemma3Config", "'gemma3' is not supported by LeanK: pass the text model"),
    ("Mistral3Config", "'mistral3' is not supported by LeanK: a multimodal wrapper"),
    ("Llama4TextConfig", "'llama4_text' is not supported by LeanK: its chunked-attention layers"),
    ("Gemma3nTextConfig", "'gemma3n_text' is not supported by LeanK: its layers share KV caches"),
])
def test_wrappers_and_text_configs_are_refused_with_their_reason(name, reason):
    """A multimodal wrapper is refused by its own type (even where its decoder is supported)."""
    import transformers

    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    with pytest.raises(LeanKError, match=reason) as e:
        leank.models.check_supported(getattr(transformers, name)())
    one_line(e)


def test_cache_with_another_attention_backend():
    model = tiny_model("llama")  # sdpa
    with pytest.raises(LeanKError, match=r"call leank.enable\(model\)") as e:
        leank.LeanKCache(model, ChannelMask.full(2, 2, 16))
    one_line(e)
    # switched away after the cache was built: refused at the first update, not deep in torch
    leank.enable(model)
    cache = leank.LeanKCache(model, ChannelMask.full(2, 2, 16))
    model.set_attn_implementation("sdpa")
    ids, am = left_padded([5], 97, torch.Generator().manual_seed(0))
    with pytest.raises(LeanKError, match="needs the 'leank' attention"):
        model(input_ids=ids, attention_mask=am, **leank.cache_kwargs(cache))


def test_leank_attention_without_leank_cache_is_plain_sdpa():
    model = tiny_model("llama", qk_gain=3.0)
    ids, am = left_padded([12, 7], 97, torch.Generator().manual_seed(1))
    ref = model(input_ids=ids, attention_mask=am, **leank.cache_kwargs(DynamicCache())).logits
    leank.enable(model)
    got = model(input_ids=ids, attention_mask=am, **leank.cache_kwargs(DynamicCache())).logits
    torch.testing.assert_close(got, ref)


def test_crop_refused():
    layer = leank.LeanKLayer(torch.ones(2, 16, dtype=torch.bool), sink=1, recent=2)
    with pytest.raises(LeanKError, match="cannot be cropped"):
        layer.crop(-1)


def test_unknown_backend():
    with pytest.raises(LeanKError, match="unknown LeanK attention backend"):
        leank.kernels.resolve_backend("cuda-magic")


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert cli_main(["info", str(tmp_path / "nope.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "error: mask file not found" in err and "Traceback" not in err


def test_static_cache_refuses_to_go_past_max_length():
    model = tiny_model("llama", qk_gain=3.0)
    leank.enable(model)
    mask = leank.ChannelMask.full(2, 2, 16)
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(0))
    kw = dict(do_sample=False, pad_token_id=0, max_new_tokens=20, min_new_tokens=20)
    cache = leank.LeanKCache(model, mask, sink=2, recent=4, max_length=30)
    with pytest.raises(LeanKError, match="built for max_length=30 tokens per row and the sequence reaches 31"):
        model.generate(input_ids=ids, **kw, **leank.cache_kwargs(cache))
    cache = leank.LeanKCache(model, mask, sink=2, recent=4, max_length=10)
    with pytest.raises(LeanKError, match="the prompt has 20 tokens, more than this cache's max_length 10"):
        model.generate(input_ids=ids, **kw, **leank.cache_kwargs(cache))


def test_padding_inside_a_later_step_is_refused():
    """Rows continued with padding inside the new tokens (a batched continuation of rows of
    different lengths): the stores know padding from the prompt only, so this is refused
    rather than attended as if the pads were real tokens."""
    model = tiny_model("llama", qk_gain=3.0)
    leank.enable(model)
    gen = torch.Generator().manual_seed(0)
    ids, more = torch.randint(3, 97, (2, 10), generator=gen), torch.randint(3, 97, (2, 4), generator=gen)
    cache = leank.LeanKCache(model, leank.ChannelMask.full(2, 2, 16), sink=2, recent=3)
    kw = leank.cache_kwargs(cache)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **kw)
        mask = torch.ones(2, 14, dtype=torch.long)
        model(input_ids=more[:, :2], attention_mask=mask[:, :12], use_cache=True, **kw)  # no padding: fine
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[1, 12:14] = 0
        with pytest.raises(LeanKError, match="padding from the prompt only"):
            model(input_ids=more, attention_mask=mask, use_cache=True, **kw)

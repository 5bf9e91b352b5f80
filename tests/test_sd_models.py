"""Tiny SD1/SD2/SDXL parts: build, run, shapes, the diffusers-folder round trip and load errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from higanbana.errors import HiganbanaError
from higanbana.models.sd import SDParts, detect_kind, load_sd
from higanbana.models.tiny import (
    TINY_SD_UNET,
    TINY_SDXL_UNET,
    save_tiny_sd,
    tiny_sd_inputs,
    tiny_sd_parts,
    tiny_sd_unet,
    tiny_unet_inputs,
)

KINDS = ["sd1", "sd2", "sdxl"]


@pytest.fixture(scope="module", params=KINDS)
def parts(request):
    return tiny_sd_parts(request.param, seed=0)


def _state_dicts(p: SDParts) -> list[dict[str, torch.Tensor]]:
    modules = [p.unet, *p.text_encoders] + ([p.vae] if p.vae is not None else [])
    return [m.state_dict() for m in modules]


def _assert_same(a: SDParts, b: SDParts) -> None:
    for sa, sb in zip(_state_dicts(a), _state_dicts(b), strict=True):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def test_parts_run_and_are_deterministic(parts):
    inputs = tiny_sd_inputs(parts, batch=2, seed=0)
    with torch.no_grad():
        out = parts.unet(**inputs).sample
    assert out.shape == inputs["sample"].shape and torch.isfinite(out).all()
    assert detect_kind(parts.unet, parts.text_encoders) == parts.kind
    assert parts.te_prefixes == (["lora_te1", "lora_te2"] if parts.kind == "sdxl" else ["lora_te"])
    state = torch.random.get_rng_state()
    _assert_same(parts, tiny_sd_parts(parts.kind, seed=0))
    assert torch.equal(state, torch.random.get_rng_state()), "the global RNG must be left untouched"
    other = tiny_sd_parts(parts.kind, seed=1)
    assert not torch.equal(other.unet.conv_in.weight, parts.unet.conv_in.weight)


def test_text_encoders_feed_the_unet(parts):
    """Gradients of the UNet output reach every text encoder (adapters there must train)."""
    out = parts.unet(**tiny_sd_inputs(parts, batch=1)).sample
    out.square().mean().backward()
    for te in parts.text_encoders:
        grads = [p.grad for p in te.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
    for module in (parts.unet, *parts.text_encoders):
        module.zero_grad(set_to_none=True)


def test_sdxl_context_and_added_embeddings_line_up():
    p = tiny_sd_parts("sdxl")
    te1, te2 = p.text_encoders
    cfg = p.unet.config
    assert type(te1).__name__ == "CLIPTextModel" and type(te2).__name__ == "CLIPTextModelWithProjection"
    assert te1.config.hidden_size + te2.config.hidden_size == cfg.cross_attention_dim
    assert cfg.addition_time_embed_dim * 6 + te2.config.projection_dim == cfg.projection_class_embeddings_input_dim
    inputs = tiny_sd_inputs(p, batch=3, seq_len=5)
    assert inputs["encoder_hidden_states"].shape == (3, 5, cfg.cross_attention_dim)
    assert inputs["added_cond_kwargs"]["text_embeds"].shape == (3, te2.config.projection_dim)
    assert inputs["added_cond_kwargs"]["time_ids"].shape == (3, 6)
    assert dict(p.unet.config) | TINY_SDXL_UNET == dict(p.unet.config)  # the shared config is unchanged


def test_sd2_differs_from_sd1_in_kind():
    sd1, sd2 = tiny_sd_parts("sd1"), tiny_sd_parts("sd2")
    assert sd2.unet.config.use_linear_projection and not sd1.unet.config.use_linear_projection
    assert sd2.text_encoders[0].config.hidden_act == "gelu" and sd1.text_encoders[0].config.hidden_act == "quick_gelu"
    assert sd2.unet.config.cross_attention_dim == sd2.text_encoders[0].config.hidden_size
    assert detect_kind({"cross_attention_dim": 768}) == "sd1"
    assert detect_kind({"cross_attention_dim": 1024}) == "sd2"
    assert detect_kind({"addition_embed_type": "text_time"}) == "sdxl"


def test_old_tiny_helpers_still_work():
    unet = tiny_sd_unet()
    assert unet.config.cross_attention_dim == TINY_SD_UNET["cross_attention_dim"]
    with torch.no_grad():
        assert unet(**tiny_unet_inputs(batch=1, unet=unet)).sample.shape == (1, 4, 16, 16)


def test_tokenizers_are_real_clip_tokenizers(parts):
    assert parts.tokenizers is not None and len(parts.tokenizers) == len(parts.text_encoders)
    ids = parts.tokenizers[0]("a photo of sks", return_tensors="pt").input_ids
    assert ids[0, 0] == 0 and ids[0, -1] == 1 and int(ids.max()) < parts.text_encoders[0].config.vocab_size
    with torch.no_grad():
        assert parts.text_encoders[0](input_ids=ids).last_hidden_state.shape[1] == ids.shape[1]


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_folder_round_trip(kind, tmp_path):
    original = tiny_sd_parts(kind, seed=3, with_vae=kind != "sd1")
    original.v_parameterization = kind == "sd2"
    folder = save_tiny_sd(original, tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline")
    loaded = load_sd(folder)
    assert loaded.kind == kind and loaded.v_parameterization == (kind == "sd2")
    assert (loaded.vae is None) == (original.vae is None)
    assert [type(t) for t in loaded.text_encoders] == [type(t) for t in original.text_encoders]
    _assert_same(original, loaded)
    text = "a photo of sks"
    assert [t(text).input_ids for t in loaded.tokenizers] == [t(text).input_ids for t in original.tokenizers]
    assert load_sd(folder, kind=kind, dtype=torch.float16).unet.dtype == torch.float16


def test_folder_without_tokenizers_loads_with_none(tmp_path):
    p = tiny_sd_parts("sd1")
    p.tokenizers = None
    loaded = load_sd(save_tiny_sd(p, tmp_path / "m"))
    assert loaded.tokenizers is None and loaded.kind == "sd1"


def test_clear_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(HiganbanaError, match="nope.*does not exist"):
        load_sd(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HiganbanaError, match="empty.*model_index.json"):
        load_sd(empty)
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"not a checkpoint")
    with pytest.raises(HiganbanaError, match=r"model\.ckpt.*\.safetensors"):
        load_sd(pickled)
    other = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, other)
    with pytest.raises(HiganbanaError, match=r"other\.safetensors.*not a recognisable"):
        load_sd(other)
    with pytest.raises(HiganbanaError, match="unknown model kind"):
        load_sd(empty, kind="sd3")
    with pytest.raises(HiganbanaError, match="2 text encoder"):
        SDParts("sdxl", tiny_sd_unet(), [tiny_sd_parts("sd1").text_encoders[0]])


def test_single_file_without_configs_never_downloads(tmp_path):
    """diffusers would fall back to downloading configs; offline that must be a clear error instead."""
    ckpt = tmp_path / "sd15.safetensors"
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(4)}, ckpt)
    with pytest.raises(HiganbanaError, match=r"sd15\.safetensors.*diffusers model folder") as info:
        load_sd(ckpt)
    assert "offline" in str(info.value)


def test_single_file_weights_diffusers_leaves_unread_are_an_error(tmp_path):
    """diffusers picks the SDXL text-encoder converter by width; in the tiny model both encoders are
    16 wide, so it converts the second with the first's rules and leaves its projection on the meta
    device. load_sd must say so instead of returning a model that fails later."""
    from safetensors.torch import save_file

    from higanbana.models.tiny import save_tiny_sd
    from tests.test_checkpoint_and_merge import to_original

    parts = tiny_sd_parts("sdxl", seed=0, with_vae=True)
    folder = save_tiny_sd(parts, tmp_path / "sdxl")
    save_file(to_original(parts), str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(HiganbanaError, match=r"text_encoder_1 was not fully read .*text_projection"):
        load_sd(tmp_path / "sdxl.safetensors", config=folder)
    sd1 = tiny_sd_parts("sd1", seed=0, with_vae=True)
    save_file(to_original(sd1), str(tmp_path / "sd1.safetensors"))
    loaded = load_sd(tmp_path / "sd1.safetensors", config=save_tiny_sd(sd1, tmp_path / "sd1"))
    for a, b in zip(loaded.vae.state_dict().values(), sd1.vae.state_dict().values(), strict=True):
        assert torch.equal(a, b)

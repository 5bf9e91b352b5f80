"""Pretraining of the miniature world's tiny models: tokenizer, the three stages at micro sizes,
saving/loading through the project's loaders, and the prompt-following measurement."""

from __future__ import annotations

import math

import pytest
import torch

from higanbana.errors import ConfigError
from higanbana.miniworld import CONCEPTS, HELD_OUT_WORDS, dataset
from higanbana.miniworld.pretrain import (
    SCALES,
    VaeStyleEncoder,
    encode_latents,
    encode_texts,
    images_to_tensor,
    pretrain,
    prompt_following,
    reconstruction_accuracy,
    save_miniworld,
    text_encoder_of,
    train_clip,
    train_unet,
    train_vae,
)
from higanbana.miniworld.tokenizer import MAX_LENGTH, base_words, world_tokenizer

MICRO_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
MICRO_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8)
MICRO_VAE = dict(block_out_channels=(8, 16), norm_num_groups=8)
MICRO_UNET = dict(block_out_channels=(16, 32, 32), norm_num_groups=8, attention_head_dim=8)


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_every_base_caption_word_is_one_token():
    tok = world_tokenizer()
    assert {"circle", "crosses", "checkered", "background", "pixelated", "the"} <= set(base_words())
    for word in base_words():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    caption = dataset(1)[0][1]
    pieces = tok.convert_ids_to_tokens(tok(caption).input_ids)
    assert pieces[0] == "<|startoftext|>" and pieces[-1] == "<|endoftext|>"
    assert ",</w>" in pieces  # CLIP's pre-tokenizer splits the comma off as its own token
    assert len(pieces) == len(caption.replace(",", " ,").split()) + 2
    assert tok.model_max_length == MAX_LENGTH


def test_held_out_words_are_not_single_tokens():
    tok = world_tokenizer()
    assert not set(base_words()) & HELD_OUT_WORDS
    for concept in CONCEPTS.values():
        assert len(tok(concept.trigger, add_special_tokens=False).input_ids) > 1, concept.trigger
    for word in HELD_OUT_WORDS:
        assert tok.convert_tokens_to_ids(word + "</w>") == tok.unk_token_id  # never a vocabulary word


def test_tokenizer_save_and_reload(tmp_path):
    from transformers import CLIPTokenizer

    tok = world_tokenizer()
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    texts = [c for _, c, _ in dataset(8)] + ["zorb toy, vlek style", ""]
    assert again(texts).input_ids == tok(texts).input_ids
    assert again.model_max_length == MAX_LENGTH and len(again) == len(tok)


# ---------------------------------------------------------------------------------------------
# the stages at micro sizes


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    data = dataset(24, seed=3)
    images = images_to_tensor([im for im, _, _ in data])
    captions = [c for _, c, _ in data]
    tok = world_tokenizer()
    logs = {"clip": [], "vae": [], "unet": []}
    clip = train_clip(images, captions, tok, steps=3, batch_size=8, text_config=MICRO_TEXT,
                      vision_config=MICRO_VISION, projection_dim=16, progress=False, log=logs["clip"])  # fmt: skip
    vae = train_vae(images, steps=3, batch_size=8, config=MICRO_VAE, progress=False, log=logs["vae"])
    te = text_encoder_of(clip)
    latents = encode_latents(vae, images)
    states = encode_texts(te, tok, captions)
    empty = encode_texts(te, tok, [""])[0]
    unet = train_unet(latents, states, empty, steps=3, batch_size=8, config=MICRO_UNET, progress=False,
                      log=logs["unet"])  # fmt: skip
    folder = tmp_path_factory.mktemp("miniworld")
    paths = save_miniworld(folder, clip, vae, unet, tok)
    return dict(images=images, captions=captions, tok=tok, clip=clip, vae=vae, unet=unet, te=te,
                latents=latents, states=states, logs=logs, paths=paths)  # fmt: skip


def test_stages_train_with_finite_losses(micro):
    for stage, losses in micro["logs"].items():
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses), stage
    assert micro["latents"].shape == (24, 4, 16, 16)
    assert micro["states"].shape == (24, MAX_LENGTH, 32)
    assert 0 < micro["vae"].config.scaling_factor < 1e6
    assert abs(float(micro["latents"].std()) - 1.0) < 0.3  # scaling_factor = 1/std on these images
    assert not micro["unet"].training and not micro["clip"].training


def test_text_encoder_is_the_clip_text_tower(micro):
    ids = micro["tok"](micro["captions"][:2], padding=True, return_tensors="pt")
    a = micro["te"](**ids).last_hidden_state
    b = micro["clip"].text_model(**ids).last_hidden_state
    torch.testing.assert_close(a, b)


def test_training_is_deterministic(micro):
    kw = dict(steps=2, batch_size=8, text_config=MICRO_TEXT, vision_config=MICRO_VISION, projection_dim=16,
              progress=False, seed=5)  # fmt: skip
    a = train_clip(micro["images"], micro["captions"], micro["tok"], **kw)
    b = train_clip(micro["images"], micro["captions"], micro["tok"], **kw)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_bad_arguments_are_clear_errors(micro):
    with pytest.raises(ConfigError, match="steps"):
        train_vae(micro["images"], steps=0, progress=False)
    with pytest.raises(ConfigError, match="captions"):
        train_clip(micro["images"], micro["captions"][:3], micro["tok"], steps=1, progress=False)
    with pytest.raises(ConfigError, match="unknown scale"):
        pretrain("/nonexistent", scale="huge")
    assert {"tiny", "full"} <= set(SCALES)


# ---------------------------------------------------------------------------------------------
# saved folders


def test_sd_folder_loads_and_generates(micro):
    from higanbana.models.pipeline import build_pipeline, read_scheduler_config
    from higanbana.models.sd import load_sd

    sd = micro["paths"]["sd"]
    parts = load_sd(sd)
    assert parts.kind == "sd1" and parts.unet.dtype == torch.float32  # stored in fp16, loaded as fp32
    assert len(list(sd.rglob("*.safetensors"))) == 3
    torch.testing.assert_close(parts.unet.conv_in.weight, micro["unet"].conv_in.weight.half().float(), rtol=0, atol=0)
    pipeline = build_pipeline(parts, scheduler_config=read_scheduler_config(sd))
    out = pipeline("a large red circle in the center, plain white background, flat style", height=32, width=32,
                   num_inference_steps=2, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.images[0].size == (32, 32)
    # and it is a plain diffusers folder too
    from diffusers import StableDiffusionPipeline

    plain = StableDiffusionPipeline.from_pretrained(sd, local_files_only=True, dtype=torch.float32)
    assert plain.vae.config.scaling_factor == pytest.approx(micro["vae"].config.scaling_factor)


def test_clip_folder_loads_as_evaluation_encoder(micro):
    from higanbana.evaluate.encoders import load_encoder

    enc = load_encoder("clip", micro["paths"]["clip"])
    images = [im for im, _, _ in dataset(3, seed=9)]
    assert enc.encode_images(images).shape == (3, 16)
    assert enc.encode_texts(["a small red star on the left", "zorb toy"]).shape == (2, 16)
    # the saved model computes what the trained one does (up to fp16 storage)
    pixel_ref = micro["clip"].get_image_features(pixel_values=torch.zeros(1, 3, 32, 32))
    pixel_ref = getattr(pixel_ref, "pooler_output", pixel_ref)
    pixel_new = enc.model.get_image_features(pixel_values=torch.zeros(1, 3, 32, 32))
    torch.testing.assert_close(getattr(pixel_new, "pooler_output", pixel_new), pixel_ref, atol=2e-2, rtol=2e-2)


def test_vae_gram_features(micro):
    enc = VaeStyleEncoder(micro["paths"]["sd"])
    grams = enc.gram_matrices([im for im, _, _ in dataset(3, seed=2)], batch_size=2)
    assert [g.shape for g in grams] == [(3, 8, 8), (3, 8, 8), (3, 16, 16)]
    assert all(torch.isfinite(g).all() for g in grams)
    with pytest.raises(ConfigError, match="AutoencoderKL"):
        VaeStyleEncoder(micro["paths"]["clip"])


def test_prompt_following_returns_fractions(micro):
    from higanbana.models.pipeline import build_pipeline
    from higanbana.models.sd import SDParts

    parts = SDParts("sd1", micro["unet"], [micro["te"]], micro["vae"], [micro["tok"]])
    result = prompt_following(build_pipeline(parts), n=3, steps=2, batch_size=2)
    assert set(result) >= {"colour", "shape", "count", "position", "size"}
    assert all(0.0 <= result[k] <= 1.0 for k in ("colour", "shape", "count", "position", "size"))
    assert result["n"] == 3
    recon = reconstruction_accuracy(micro["vae"], n=3)
    assert set(recon) == {"colour", "shape", "count", "position", "size"}
    assert all(0.0 <= v <= 1.0 for v in recon.values())

"""The shipped miniature-world models: they load from the package, stay within the size budget,
follow prompts (the world checker on a few generated images) and know none of the held-out words."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from higanbana.errors import HiganbanaError
from higanbana.miniworld import HELD_OUT_WORDS, WEIGHTS_DIR, dataset, shipped_model
from higanbana.miniworld.pretrain import folder_size_mb, prompt_following
from higanbana.miniworld.tokenizer import world_tokenizer


@pytest.fixture(scope="module")
def pipeline():
    from higanbana.models.pipeline import build_pipeline, read_scheduler_config
    from higanbana.models.sd import load_sd

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    path = shipped_model("sd")
    parts = load_sd(path)
    assert parts.kind == "sd1"
    pipe = build_pipeline(parts, sampler="ddim", scheduler_config=read_scheduler_config(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_models_are_small_and_documented():
    assert folder_size_mb(WEIGHTS_DIR) <= 30
    record = json.loads((WEIGHTS_DIR / "training.json").read_text(encoding="utf-8"))
    assert record["prompt_following"]["colour"] >= 0.9 and record["prompt_following"]["shape"] >= 0.7
    assert record["prompt_following"]["n"] >= 100


def test_unknown_part_is_a_clear_error():
    with pytest.raises(HiganbanaError, match="unknown shipped model 'vae'"):
        shipped_model("vae")


def test_shipped_model_follows_prompts(pipeline):
    acc = prompt_following(pipeline, n=20, steps=20, cfg=4.0)
    assert acc["colour"] >= 0.9, acc
    assert acc["shape"] >= 0.6, acc  # 8 shapes: chance is 0.125
    assert acc["count"] >= 0.9 and acc["position"] >= 0.9, acc


def test_shipped_tokenizers_are_the_world_tokenizer_without_held_out_words(pipeline):
    from transformers import CLIPTokenizer

    reference = world_tokenizer()
    for tok in (pipeline.tokenizer, CLIPTokenizer.from_pretrained(shipped_model("clip"))):
        assert tok.get_vocab() == reference.get_vocab()
        for word in HELD_OUT_WORDS:
            assert len(tok(word, add_special_tokens=False).input_ids) > 1, word


def test_shipped_clip_matches_world_images_to_their_captions():
    from higanbana.evaluate.encoders import load_encoder

    enc = load_encoder("clip", shipped_model("clip"))
    data = dataset(32, seed=99)
    zi = torch.nn.functional.normalize(enc.encode_images([im for im, _, _ in data]), dim=-1)
    zt = torch.nn.functional.normalize(enc.encode_texts([c for _, c, _ in data]), dim=-1)
    top1 = (zi @ zt.T).argmax(dim=1).numpy()
    assert np.mean(top1 == np.arange(len(data))) >= 0.5  # chance is 1/32

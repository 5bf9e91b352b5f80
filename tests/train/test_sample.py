"""Sample generation during training: prompt files, schedulers, pipelines, saving and logging."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from higanbana.errors import ConfigError, HiganbanaError
from higanbana.formats.sd_network import sd_network
from higanbana.models.pipeline import (
    SAMPLERS,
    build_pipeline,
    default_scheduler_config,
    make_scheduler,
    read_scheduler_config,
    sampler_name,
)
from higanbana.models.tiny import save_tiny_sd, tiny_sd_parts
from higanbana.train.sample import (
    INFO_KEY,
    SamplePrompt,
    generate_samples,
    log_samples,
    parse_prompt_file,
    save_samples,
)

# diffusers' schedulers call np.array on tensors the old way (a torch 2.x / numpy 2 notice, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# ---------------------------------------------------------------------------------------------------
# prompt files


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_options_any_order_negatives_and_comments(tmp_path):
    path = _write(
        tmp_path,
        "prompts.txt",
        "# a comment\n"
        "\n"
        "a photo of a cat, best quality --n low quality, bad hands --w 512 --h 768 --d 42 --l 5.5 --s 28\n"
        "  # indented comment\n"
        "a dog --s 10 --d 3 --ss euler_a --n blurry --l 4\n"
        "plain prompt\n",
    )
    prompts = parse_prompt_file(path)
    assert prompts == [
        SamplePrompt("a photo of a cat, best quality", "low quality, bad hands", 512, 768, 42, 5.5, 28),
        SamplePrompt("a dog", "blurry", seed=3, cfg_scale=4.0, steps=10, sampler="euler_a"),
        SamplePrompt("plain prompt"),
    ]


def test_txt_bad_value_names_file_and_line(tmp_path):
    path = _write(tmp_path, "p.txt", "# c\nok prompt\nbad one --w abc\n")
    with pytest.raises(ConfigError, match=r"p\.txt:3: --w expects an integer, got 'abc'"):
        parse_prompt_file(path)
    path = _write(tmp_path, "q.txt", "x --ss nosuch\n")
    with pytest.raises(ConfigError, match=r"q\.txt:1: --ss: unknown sampler"):
        parse_prompt_file(path)
    path = _write(tmp_path, "r.txt", "x --l much\n")
    with pytest.raises(ConfigError, match=r"r\.txt:1: --l expects a number"):
        parse_prompt_file(path)


def test_txt_unknown_option_warns_and_is_ignored(tmp_path):
    path = _write(tmp_path, "p.txt", "a cat --zz 3 --w 64\n")
    with pytest.warns(UserWarning, match=r"p\.txt:1: ignoring unknown option --zz"):
        prompts = parse_prompt_file(path)
    assert prompts == [SamplePrompt("a cat", width=64)]


@pytest.mark.parametrize("text", ["", "# only comments\n\n   \n"])
def test_empty_txt_is_an_error(tmp_path, text):
    with pytest.raises(ConfigError, match="no prompts"):
        parse_prompt_file(_write(tmp_path, "p.txt", text))


def test_toml_array_with_top_level_defaults(tmp_path):
    path = _write(
        tmp_path,
        "p.toml",
        'width = 256\nsample_steps = 12\nscale = 6\n\n[[prompt]]\nprompt = "a cat"\nnegative_prompt = "ugly, dark"\n'
        'seed = 5\n\n[[prompt]]\nprompt = "a dog"\nwidth = 128\ncfg_scale = 3.5\nsampler = "dpm++_2m_karras"\n',
    )
    assert parse_prompt_file(path) == [
        SamplePrompt("a cat", "ugly, dark", width=256, seed=5, cfg_scale=6.0, steps=12),
        SamplePrompt("a dog", width=128, cfg_scale=3.5, steps=12, sampler="dpm++_2m_karras"),
    ]


def test_toml_kohya_prompt_subset_form(tmp_path):
    path = _write(
        tmp_path,
        "p.toml",
        '[prompt]\nsample_steps = 30\nheight = 640\nsample_sampler = "k_euler_a"\n\n'
        '[[prompt.subset]]\nprompt = "one"\n\n[[prompt.subset]]\nprompt = "two"\nsample_steps = 8\n',
    )
    assert parse_prompt_file(path) == [
        SamplePrompt("one", height=640, steps=30, sampler="euler_a"),
        SamplePrompt("two", height=640, steps=8, sampler="euler_a"),
    ]


def test_toml_and_json_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"p\.toml: prompt 0: 'width' expects an integer"):
        parse_prompt_file(_write(tmp_path, "p.toml", '[[prompt]]\nprompt = "a"\nwidth = "wide"\n'))
    with pytest.raises(ConfigError, match=r"e\.toml: no prompts"):
        parse_prompt_file(_write(tmp_path, "e.toml", ""))
    with pytest.raises(ConfigError, match=r"m\.json: prompt 1: missing the 'prompt' key"):
        parse_prompt_file(_write(tmp_path, "m.json", '[{"prompt": "a"}, {"seed": 1}]'))
    with pytest.raises(ConfigError, match=r"l\.json: the prompt file holds no prompts"):
        parse_prompt_file(_write(tmp_path, "l.json", "[]"))
    with pytest.raises(ConfigError, match=r"b\.json: invalid JSON"):
        parse_prompt_file(_write(tmp_path, "b.json", "[{"))
    with pytest.raises(ConfigError, match=r"unknown prompt file type '\.yaml'"):
        parse_prompt_file(_write(tmp_path, "p.yaml", "x"))


def test_json_prompts(tmp_path):
    data = [
        {"prompt": "a cat", "negative_prompt": "bad", "width": 64, "height": 96, "seed": 1, "scale": 2.5},
        {"prompt": "a dog", "steps": 4, "sample_sampler": "DDIM"},
    ]
    path = _write(tmp_path, "p.json", json.dumps(data))
    assert parse_prompt_file(path) == [
        SamplePrompt("a cat", "bad", 64, 96, 1, 2.5),
        SamplePrompt("a dog", steps=4, sampler="ddim"),
    ]
    path = _write(tmp_path, "w.json", '[{"prompt": "a", "negative": "b"}]')
    with pytest.warns(UserWarning, match="unknown key 'negative'.*negative_prompt"):
        assert parse_prompt_file(path) == [SamplePrompt("a")]


# ---------------------------------------------------------------------------------------------------
# schedulers


def test_default_scheduler_config():
    config = default_scheduler_config("sd1")
    assert config["num_train_timesteps"] == 1000
    assert config["beta_schedule"] == "scaled_linear"
    assert (config["beta_start"], config["beta_end"]) == (0.00085, 0.012)
    assert config["prediction_type"] == "epsilon" and config["steps_offset"] == 1
    assert default_scheduler_config("sdxl", v_parameterization=True)["prediction_type"] == "v_prediction"
    with pytest.raises(ConfigError, match="unknown model kind"):
        default_scheduler_config("sd3")


def test_read_scheduler_config(tmp_path):
    parts = tiny_sd_parts("sd1", seed=0)
    folder = save_tiny_sd(parts, tmp_path / "model")
    config = read_scheduler_config(folder)
    assert config["beta_schedule"] == "scaled_linear" and config["_class_name"] == "DDPMScheduler"
    assert read_scheduler_config(tmp_path / "nowhere") is None
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    assert read_scheduler_config(single) is None
    bad = folder / "scheduler" / "scheduler_config.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="scheduler_config.json"):
        read_scheduler_config(folder)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_make_scheduler_every_sampler(sampler):
    config = default_scheduler_config("sd1", v_parameterization=True)
    if sampler == "lms":
        try:
            import scipy  # noqa: F401
        except ImportError:
            with pytest.raises(HiganbanaError, match="scipy"):
                make_scheduler(sampler, config)
            return
    scheduler = make_scheduler(sampler, {**config, "variance_type": "fixed_small", "_class_name": "X"})
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "scaled_linear"
    scheduler.set_timesteps(4)
    assert len(scheduler.timesteps) >= 4
    if sampler == "dpm++_2m_karras":
        assert scheduler.config.use_karras_sigmas


def test_make_scheduler_unknown_lists_samplers():
    with pytest.raises(ConfigError, match=r"unknown sampler 'eulr'.*did you mean 'euler'.*ddim"):
        make_scheduler("eulr", default_scheduler_config("sd1"))
    assert type(make_scheduler("K_EULER_A", {})).__name__ == "EulerAncestralDiscreteScheduler"
    for sampler in ("ddim", "euler", "dpm++_2m", "dpm++_2m_karras", "pndm", "ddpm"):
        assert sampler_name(make_scheduler(sampler, {})) == sampler


# ---------------------------------------------------------------------------------------------------
# pipelines and generation


@pytest.fixture(scope="module")
def sd1_pipe():
    parts = tiny_sd_parts("sd1", seed=0, with_vae=True)
    return parts, build_pipeline(parts)


def _pixels(images):
    return np.stack([np.asarray(im) for im in images])


def test_build_pipeline_uses_the_same_modules(sd1_pipe):
    parts, pipe = sd1_pipe
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet is parts.unet and pipe.vae is parts.vae
    assert pipe.text_encoder is parts.text_encoders[0] and pipe.tokenizer is parts.tokenizers[0]
    assert pipe.safety_checker is None
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_generate_sd1_deterministic(sd1_pipe):
    _, pipe = sd1_pipe
    prompts = [SamplePrompt("a cat"), SamplePrompt("a dog", "blurry")]
    kw = dict(width=32, height=32, steps=2, cfg_scale=5.0, seed=7)
    first = generate_samples(pipe, prompts, **kw)
    assert [im.size for im in first] == [(32, 32), (32, 32)]
    assert first[1].info[INFO_KEY]["seed"] == 8 and first[1].info[INFO_KEY]["negative_prompt"] == "blurry"
    again = generate_samples(pipe, prompts, **kw)
    np.testing.assert_array_equal(_pixels(first), _pixels(again))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))
    other = generate_samples(pipe, prompts[:1], **{**kw, "seed": 8})
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))
    # an explicit per-prompt seed wins over seed + i
    pinned = generate_samples(pipe, [SamplePrompt("a cat", seed=7)], **{**kw, "seed": 100})
    np.testing.assert_array_equal(np.asarray(first[0]), np.asarray(pinned[0]))


def test_sizes_round_down_to_the_latent_grid(sd1_pipe):
    _, pipe = sd1_pipe
    (image,) = generate_samples(pipe, [SamplePrompt("a", width=38, height=4)], width=32, height=32, steps=1)
    assert image.size == (32, 8)  # multiples of 8, at least one cell
    assert image.info[INFO_KEY]["width"] == 32 and image.info[INFO_KEY]["height"] == 8


def test_sampler_override_and_restore(sd1_pipe):
    _, pipe = sd1_pipe
    original = pipe.scheduler
    seen = []
    unet_forward = pipe.unet.forward

    def spy(*args, **kwargs):
        seen.append(type(pipe.scheduler).__name__)
        return unet_forward(*args, **kwargs)

    pipe.unet.forward = spy
    try:
        prompts = [SamplePrompt("a", sampler="euler_a"), SamplePrompt("b"), SamplePrompt("c", sampler="dpm++_2m")]
        images = generate_samples(pipe, prompts, width=32, height=32, steps=2)
    finally:
        del pipe.unet.forward
    assert seen == ["EulerAncestralDiscreteScheduler"] * 2 + ["DDIMScheduler"] * 2 + ["DPMSolverMultistepScheduler"] * 2
    assert pipe.scheduler is original
    assert [im.info[INFO_KEY]["sampler"] for im in images] == ["euler_a", "ddim", "dpm++_2m"]
    # a call-wide sampler is also put back afterwards
    generate_samples(pipe, [SamplePrompt("a")], width=32, height=32, steps=2, sampler="euler")
    assert pipe.scheduler is original


def test_training_state_restored(sd1_pipe):
    parts, pipe = sd1_pipe
    parts.unet.train()
    parts.text_encoders[0].train()
    parts.unet.conv_in.eval()  # a mixed state must come back exactly
    seen = []
    unet_forward = pipe.unet.forward

    def spy(*args, **kwargs):
        seen.append(pipe.unet.training or any(m.training for m in pipe.unet.modules()))
        return unet_forward(*args, **kwargs)

    pipe.unet.forward = spy
    try:
        with torch.enable_grad():
            rng = torch.get_rng_state()
            generate_samples(pipe, [SamplePrompt("a")], width=32, height=32, steps=2)
            assert torch.is_grad_enabled()
            assert torch.equal(rng, torch.get_rng_state())  # the training RNG is untouched
    finally:
        del pipe.unet.forward
        states = (parts.unet.training, parts.unet.conv_in.training, parts.text_encoders[0].training)
        parts.unet.eval()
        parts.text_encoders[0].eval()
    assert seen and not any(seen)  # sampled in eval mode
    assert states == (True, False, True)
    assert not parts.vae.training


def test_attached_adapters_are_sampled_without_dropout():
    parts = tiny_sd_parts("sd1", seed=0, with_vae=True)
    net = sd_network(parts, "attn-only", "lora", rank=2, dropout=0.5).attach()
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "lora_up" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
    pipe = build_pipeline(parts)
    parts.unet.train()
    kw = dict(width=32, height=32, steps=2, seed=0)
    a = generate_samples(pipe, [SamplePrompt("a cat")], **kw)
    b = generate_samples(pipe, [SamplePrompt("a cat")], **kw)  # no dropout: identical
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert parts.unet.training
    net.set_multiplier(0.0)
    off = generate_samples(pipe, [SamplePrompt("a cat")], **kw)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(off[0]))  # the adapters are in the pipeline


def test_sdxl_pipeline_generates():
    parts = tiny_sd_parts("sdxl", seed=0, with_vae=True)
    pipe = build_pipeline(parts, sampler="euler")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.text_encoder_2 is parts.text_encoders[1] and pipe.tokenizer_2 is parts.tokenizers[1]
    assert pipe.config.force_zeros_for_empty_prompt
    prompts = [SamplePrompt("a cat"), SamplePrompt("a dog", "ugly")]
    a = generate_samples(pipe, prompts, width=32, height=32, steps=2, seed=1)
    b = generate_samples(pipe, prompts, width=32, height=32, steps=2, seed=1)
    assert [im.size for im in a] == [(32, 32), (32, 32)]
    np.testing.assert_array_equal(_pixels(a), _pixels(b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))


def test_missing_vae_or_tokenizers():
    parts = tiny_sd_parts("sd1", seed=0, with_vae=False)
    with pytest.raises(HiganbanaError, match="no a VAE"):
        build_pipeline(parts)
    parts = tiny_sd_parts("sd1", seed=0, with_vae=True)
    parts.tokenizers = None
    with pytest.raises(HiganbanaError, match="tokenizer"):
        build_pipeline(parts)


# ---------------------------------------------------------------------------------------------------
# saving and logging


def test_save_samples_names_and_text_chunks(tmp_path, sd1_pipe):
    from PIL import Image

    _, pipe = sd1_pipe
    prompts = [SamplePrompt("a cat", "dark", seed=3), SamplePrompt("a dog")]
    images = generate_samples(pipe, prompts, width=32, height=32, steps=2, cfg_scale=6.0, seed=10)
    paths = save_samples(images, prompts, tmp_path / "samples", step=120, epoch=3)
    assert [p.name for p in paths] == ["sample_e0003_s0000120_00.png", "sample_e0003_s0000120_01.png"]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [p.name for p in paths]  # no temp files
    with Image.open(paths[0]) as im:
        text = dict(im.text)
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(images[0]))
    assert text["parameters"].startswith("a cat\nNegative prompt: dark\nSteps: 2, ")
    assert "CFG scale: 6.0, Seed: 3, Size: 32x32" in text["parameters"]
    meta = json.loads(text[INFO_KEY])
    assert meta["seed"] == 3 and meta["steps"] == 2 and meta["cfg_scale"] == 6.0 and meta["negative_prompt"] == "dark"
    with Image.open(paths[1]) as im:
        assert json.loads(im.text[INFO_KEY])["seed"] == 11
    named = save_samples(images[:1], prompts[:1], tmp_path / "samples", step=5, name="run")
    assert named[0].name == "run_s0000005_00.png"


def test_save_samples_plain_images(tmp_path):
    from PIL import Image

    image = Image.new("RGB", (16, 8), (255, 0, 0))
    (path,) = save_samples([image], [SamplePrompt("p", seed=4, steps=9)], tmp_path, step=0)
    with Image.open(path) as im:
        assert json.loads(im.text[INFO_KEY])["steps"] == 9 and "Size: 16x8" in im.text["parameters"]
    with pytest.raises(ConfigError, match="2 images but 1 prompts"):
        save_samples([image, image], [SamplePrompt("p")], tmp_path, step=0)


class _FakeWriter:
    def __init__(self):
        self.calls = []

    def add_image(self, tag, array, global_step=None, dataformats="CHW"):
        self.calls.append((tag, array, global_step, dataformats))


def test_log_samples_fake_writer():
    from PIL import Image

    images = [Image.new("RGB", (8, 4), (i * 50, 0, 0)) for i in range(3)]
    writer = _FakeWriter()
    log_samples(writer, images, [SamplePrompt("p")] * 3, step=42)
    assert [c[0] for c in writer.calls] == ["samples/00", "samples/01", "samples/02"]
    assert all(c[2] == 42 and c[3] == "HWC" for c in writer.calls)
    assert writer.calls[1][1].dtype == np.uint8 and writer.calls[1][1].shape == (4, 8, 3)
    assert writer.calls[1][1][0, 0, 0] == 50
    log_samples(None, images, [], step=1)  # no-op

    class Tracker:  # accelerate's TensorBoardTracker keeps the SummaryWriter in .writer
        writer = _FakeWriter()

    log_samples(Tracker(), images[:1], [], step=2)
    assert Tracker.writer.calls[0][0] == "samples/00"
    log_samples(object(), images, [], step=3)  # a tracker without images is ignored

"""Encoders of the evaluation: preprocessing, tiny DINOv2/CLIP/VGG-19 models, Gram matrices, loading errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from higanbana.errors import HiganbanaError
from higanbana.evaluate import encoders as enc
from higanbana.evaluate.encoders import letterbox, load_encoder, resize_short_side
from tests.tiny_encoders import TINY_VGG19_WIDTHS, save_tiny_encoders


def _images(n=5, seed=0):
    """Random RGB images of different sizes and aspect ratios."""
    rng = np.random.RandomState(seed)
    sizes = [(48, 48), (80, 40), (30, 70), (64, 64), (50, 90), (33, 33)]
    return [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_encoders(tmp_path_factory.mktemp("encoders"))


@pytest.fixture(scope="module")
def dino(tiny):
    return load_encoder("dinov2", tiny["dinov2"])


@pytest.fixture(scope="module")
def clip(tiny):
    return load_encoder("clip", tiny["clip"])


@pytest.fixture(scope="module")
def vgg(tiny):
    return load_encoder("vgg19", tiny["vgg19"], short_side=64)


# ---------------------------------------------------------------------------------------------- preprocessing


def test_letterbox_pads_and_centres_wide_image():
    out = letterbox(Image.new("RGB", (100, 50), (255, 0, 0)), 64)
    a = np.asarray(out)
    assert out.size == (64, 64) and out.mode == "RGB"
    red_rows = np.where(a[:, 32, 0] > 128)[0]
    assert len(red_rows) == 32  # aspect kept: 100×50 → 64×32
    assert red_rows[0] == 16 and red_rows[-1] == 47  # centred
    assert (a[:16] == 0).all() and (a[48:] == 0).all()  # black padding
    assert (a[red_rows[0] : red_rows[-1] + 1, :, 0] > 128).all()  # full width


def test_letterbox_tall_image_custom_fill_and_modes():
    out = np.asarray(letterbox(Image.new("L", (20, 80), 255), 40, fill=(0, 0, 255)))
    assert out.shape == (40, 40, 3)
    white_cols = np.where(out[20, :, 0] > 128)[0]
    assert len(white_cols) == 10 and white_cols[0] == 15
    assert (out[:, :15] == [0, 0, 255]).all() and (out[:, 25:] == [0, 0, 255]).all()


def test_letterbox_square_is_plain_resize():
    im = _images(1)[0]
    assert np.array_equal(np.asarray(letterbox(im, 32)), np.asarray(im.resize((32, 32), Image.Resampling.BICUBIC)))


def test_resize_short_side():
    assert resize_short_side(Image.new("RGB", (100, 50)), 25).size == (50, 25)
    assert resize_short_side(Image.new("RGB", (30, 60)), 90).size == (90, 180)
    assert resize_short_side(Image.new("RGBA", (10, 10)), 7).mode == "RGB"


# ---------------------------------------------------------------------------------------------- DINOv2 / CLIP


def test_module_import_does_not_import_transformers():
    code = "import sys, higanbana.evaluate.encoders; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tiny_encoders_are_deterministic_files(tiny, tmp_path):
    again = save_tiny_encoders(tmp_path)
    for key in ("dinov2", "clip"):
        assert (again[key] / "model.safetensors").read_bytes() == (tiny[key] / "model.safetensors").read_bytes()
    assert again["vgg19"].read_bytes() == tiny["vgg19"].read_bytes()


@pytest.mark.parametrize("kind,dim", [("dinov2", 32), ("clip", 16)])
def test_image_features_shape_determinism_and_batching(kind, dim, dino, clip, tiny):
    encoder = {"dinov2": dino, "clip": clip}[kind]
    images = _images(5)
    a = encoder.encode_images(images, batch_size=2)
    assert a.shape == (5, dim) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.allclose(a, encoder.encode_images(images, batch_size=5), atol=1e-5)
    assert torch.equal(a, load_encoder(kind, tiny[kind]).encode_images(images, batch_size=2))
    assert not torch.allclose(a[0], a[1])


def test_dinov2_feature_is_layernormed_cls_token(dino):
    assert dino.image_size == 224 and dino.name == "dinov2"
    im = _images(2)[1]
    x = enc._to_tensor([letterbox(im, 224)], enc.IMAGENET_MEAN, enc.IMAGENET_STD)
    with torch.no_grad():
        out = dino.model(pixel_values=x)
        raw = dino.model.embeddings(x)
        for layer in dino.model.encoder.layer:
            raw = layer(raw)
            raw = raw[0] if isinstance(raw, tuple) else raw
        cls = dino.model.layernorm(raw)[:, 0]
    feats = dino.encode_images([im])
    assert torch.allclose(feats, out.pooler_output, atol=1e-6)
    assert torch.allclose(feats, out.last_hidden_state[:, 0], atol=1e-6)
    assert torch.allclose(feats, cls, atol=1e-5)


def test_dinov2_plain_resize_option(tiny, dino):
    plain = load_encoder("dinov2", tiny["dinov2"], letterbox=False, image_size=56)
    assert plain.image_size == 56
    wide, square = _images(2)[1], _images(1)[0]
    boxed = load_encoder("dinov2", tiny["dinov2"], image_size=56)
    assert not torch.allclose(plain.encode_images([wide]), boxed.encode_images([wide]))
    assert torch.allclose(plain.encode_images([square]), boxed.encode_images([square]), atol=1e-6)


def test_clip_image_features_are_projected(clip):
    assert clip.image_size == 32  # the vision tower's size
    im = _images(2)[1]
    x = enc._to_tensor([letterbox(im, 32)], enc.CLIP_MEAN, enc.CLIP_STD)
    with torch.no_grad():
        ref = clip.model.visual_projection(clip.model.vision_model(pixel_values=x).pooler_output)
    assert torch.allclose(clip.encode_images([im]), ref, atol=1e-6)


def test_clip_text_features(clip):
    texts = ["a photo of a cat", "a watercolor painting of a castle", "a photo of a cat", "x " * 200]
    a = clip.encode_texts(texts, batch_size=3)
    assert a.shape == (4, 16) and a.dtype == torch.float32
    assert not torch.allclose(a[0], a[1])
    assert torch.allclose(a[0], a[2], atol=1e-5)  # padding to a longer batch does not change features
    assert torch.allclose(a, clip.encode_texts(texts, batch_size=64), atol=1e-5)
    with pytest.raises(HiganbanaError):
        clip.encode_texts([])


def test_clip_instance_needs_tokenizer(clip):
    with pytest.raises(HiganbanaError, match="processor_or_path"):
        enc.ClipEncoder(clip.model)
    assert enc.ClipEncoder(clip.model, processor_or_path=clip.tokenizer).encode_texts(["hi"]).shape == (1, 16)


# ---------------------------------------------------------------------------------------------- VGG-19 Grams


def test_gram_shapes_symmetry_psd(vgg):
    grams = vgg.gram_matrices(_images(5), batch_size=2)
    assert [tuple(g.shape) for g in grams] == [(5, c, c) for c in (4, 8, 16, 32, 32)]
    for g in grams:
        assert g.dtype == torch.float32
        assert torch.allclose(g, g.transpose(1, 2), atol=1e-6)
        eig = torch.linalg.eigvalsh(g.double())
        assert (eig > -1e-6 * eig.abs().max()).all()


def test_gram_identical_images_and_batch_invariance(vgg):
    images = _images(5)
    twice = vgg.gram_matrices([images[1], images[2], images[1].copy()], batch_size=8)
    for g in twice:
        assert torch.equal(g[0], g[2])
    a, b = vgg.gram_matrices(images, batch_size=2), vgg.gram_matrices(images, batch_size=5)
    for ga, gb in zip(a, b, strict=True):
        assert torch.allclose(ga, gb, atol=1e-6, rtol=1e-5)


def test_gram_normalisation_matches_einsum_on_hooked_layer(vgg):
    im = _images(3)[2]  # 30×70 → 64×149
    seen = []
    handle = vgg.features[10].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        grams = vgg.gram_matrices([im])
    finally:
        handle.remove()
    psi = seen[0][0]  # conv3_1 output, before ReLU (has negatives)
    assert (psi < 0).any()
    c, h, w = psi.shape
    expected = torch.einsum("ahw,bhw->ab", psi, psi) / (c * h * w)
    assert torch.allclose(grams[2][0], expected, rtol=1e-5, atol=1e-7)


def _torchvision_vgg19_shapes():
    """features.N.weight/bias shapes of torchvision's vgg19, written from the published architecture."""
    shapes, index, in_ch = {}, 0, 3
    for width, convs in ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4)):
        for _ in range(convs):
            shapes[f"features.{index}.weight"] = (width, in_ch, 3, 3)
            shapes[f"features.{index}.bias"] = (width,)
            in_ch, index = width, index + 2
        index += 1  # max-pool
    return shapes


def test_vgg_loads_torchvision_state_dict():
    shapes = _torchvision_vgg19_shapes()
    assert max(int(k.split(".")[1]) for k in shapes) == 34
    sd = {k: torch.full(s, float(i)) for i, (k, s) in enumerate(shapes.items())}
    sd["classifier.0.weight"] = torch.zeros(2, 2)  # ignored
    model = enc.Vgg19StyleEncoder(sd)
    assert torch.equal(model.features[34].bias, sd["features.34.bias"])
    assert torch.equal(model.features[28].weight, sd["features.28.weight"])
    bare = enc.Vgg19StyleEncoder({k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features")})
    assert torch.equal(bare.features[0].weight, sd["features.0.weight"])
    sd["features.19.weight"] = torch.zeros(512, 255, 3, 3)
    with pytest.raises(HiganbanaError, match=r"features\.19\.weight"):
        enc.Vgg19StyleEncoder(sd)
    del sd["features.19.weight"]
    with pytest.raises(HiganbanaError, match="missing keys"):
        enc.Vgg19StyleEncoder(sd)


def test_vgg_loads_pth_file(tmp_path, vgg):
    sd = {f"features.{k}": v for k, v in vgg.features.state_dict().items()}
    torch.save(sd, tmp_path / "vgg.pth")
    loaded = enc.Vgg19StyleEncoder(tmp_path / "vgg.pth", widths=TINY_VGG19_WIDTHS, short_side=64)
    assert torch.equal(loaded.gram_matrices(_images(1))[3], vgg.gram_matrices(_images(1))[3])
    with pytest.raises(HiganbanaError, match=r"features\.0\.weight has shape"):
        enc.Vgg19StyleEncoder(tmp_path / "vgg.pth")  # tiny weights, full-width VGG-19


# ---------------------------------------------------------------------------------------------- errors


def test_missing_models_name_what_to_provide(tmp_path):
    with pytest.raises(HiganbanaError, match="DINOv2 weights not found at .*Dinov2Model folder"):
        load_encoder("dinov2", tmp_path / "nope")
    with pytest.raises(HiganbanaError, match="DINOv2 weights not found at .*offline Hugging Face cache"):
        load_encoder("dinov2", "nobody-xyz/no-such-dinov2")
    with pytest.raises(HiganbanaError, match="CLIP weights not found at .*CLIPModel folder"):
        load_encoder("clip", tmp_path / "nope")
    with pytest.raises(HiganbanaError, match="VGG-19 weights not found at .*vgg19 state dict"):
        load_encoder("vgg19", tmp_path / "vgg19.pth")
    with pytest.raises(HiganbanaError, match="random_init"):
        enc.Vgg19StyleEncoder(None)
    with pytest.raises(HiganbanaError, match="unknown encoder kind"):
        load_encoder("convnext", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HiganbanaError, match="DINOv2 could not be loaded from"):
        load_encoder("dinov2", tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- miniature world


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from higanbana.models.tiny import save_tiny_sd, tiny_sd_parts

    return save_tiny_sd(tiny_sd_parts("sd1", seed=0, with_vae=True), tmp_path_factory.mktemp("sd") / "sd")


def test_encoder_kind_detection(tiny, tiny_sd, tmp_path):
    kind = enc.encoder_kind_of
    assert kind("dinov2", tiny["dinov2"]) == "dinov2"
    assert kind("dinov2", tiny["clip"]) == "clip_image"  # a CLIP folder stands in for DINOv2
    assert kind("dinov2", str(tiny["clip"])) == "clip_image"
    assert kind("clip", tiny["clip"]) == "clip"
    assert kind("vgg19", tiny["vgg19"]) == "vgg19"
    assert kind("vgg19", tiny_sd) == "vae_gram"  # an SD folder: its vae/
    assert kind("vgg19", tiny_sd / "vae") == "vae_gram"  # a bare AutoencoderKL folder
    assert kind("vgg19", tiny_sd / "unet") == "vgg19"  # not an AutoencoderKL: left to the VGG-19 loader
    assert kind("dinov2", tiny_sd) == "dinov2"
    # the offline-cache defaults keep their slot's kind
    assert kind("dinov2", None) == "dinov2" and kind("clip", enc.DEFAULT_MODELS["clip"]) == "clip"
    with pytest.raises(HiganbanaError, match=r"encoders\.vgg19: .*nope.* does not exist"):
        kind("vgg19", tmp_path / "nope")
    with pytest.raises(HiganbanaError, match=r"encoders\.dinov2: .*nope.* does not exist"):
        kind("dinov2", tmp_path / "nope")
    with pytest.raises(HiganbanaError, match="unknown encoder slot"):
        kind("quality", tiny["clip"])


def test_vae_gram_encoder(tiny_sd):
    vae = load_encoder("vae_gram", tiny_sd)
    assert isinstance(vae, enc.VaeStyleEncoder) and vae.image_size == 32
    grams = vae.gram_matrices(_images(3), batch_size=2)
    assert [tuple(g.shape) for g in grams] == [(3, 32, 32)] * 3  # conv_in and two down blocks
    for g in grams:
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        assert torch.allclose(g, g.transpose(1, 2), atol=1e-6)
    again = load_encoder("vae_gram", tiny_sd / "vae").gram_matrices(_images(3), batch_size=3)
    for ga, gb in zip(grams, again, strict=True):
        assert torch.allclose(ga, gb, atol=1e-6, rtol=1e-5)
    with pytest.raises(HiganbanaError, match="AutoencoderKL"):
        load_encoder("vae_gram", tiny_sd / "unet")
    with pytest.raises(HiganbanaError, match="needs a path"):
        load_encoder("vae_gram")


def test_clip_image_kind(tiny, clip):
    encoder = load_encoder("clip_image", tiny["clip"])
    z = encoder.encode_images(_images(3))
    assert z.shape == (3, 16) and z.dtype == torch.float32
    assert torch.equal(z, clip.encode_images(_images(3)))


def test_load_encoders_detects_miniworld_models(tiny, tiny_sd):
    from types import SimpleNamespace

    from higanbana.evaluate.run import _load_encoders

    encoders = SimpleNamespace(
        dinov2=str(tiny["clip"]), clip=str(tiny["clip"]), vgg19=str(tiny_sd), quality="", image_size=224,
        letterbox=True,
    )  # fmt: skip
    config = SimpleNamespace(encoders=encoders, prompts=SimpleNamespace(types=["train", "style"]))
    out = _load_encoders(config, torch.device("cpu"))
    assert isinstance(out["dinov2"], enc.ClipEncoder) and out["dinov2"].image_size == 32  # not image_size=224
    assert isinstance(out["clip"], enc.ClipEncoder)
    assert isinstance(out["vgg19"], enc.VaeStyleEncoder)
    encoders.dinov2, encoders.vgg19 = str(tiny["dinov2"]), str(tiny["vgg19"])
    out = _load_encoders(config, torch.device("cpu"))
    assert isinstance(out["dinov2"], enc.Dinov2Encoder) and out["dinov2"].image_size == 224
    assert isinstance(out["vgg19"], enc.Vgg19StyleEncoder)


def test_shipped_world_models_as_evaluation_encoders():
    from higanbana.miniworld import shipped_model
    from higanbana.miniworld.world import Scene, render

    clip_dir, sd_dir = shipped_model("clip"), shipped_model("sd")
    assert enc.encoder_kind_of("dinov2", clip_dir) == "clip_image"
    assert enc.encoder_kind_of("vgg19", sd_dir) == "vae_gram"
    image_encoder = load_encoder(enc.encoder_kind_of("dinov2", clip_dir), clip_dir)
    style_encoder = load_encoder(enc.encoder_kind_of("vgg19", sd_dir), sd_dir)
    assert isinstance(image_encoder, enc.ClipEncoder) and isinstance(style_encoder, enc.VaeStyleEncoder)

    styles = ("flat", "outlined", "pencil")
    images = [render(Scene(shape="circle", colour="red", style=s), 32, seed) for s in styles for seed in (0, 1)]
    assert image_encoder.encode_images(images).shape[0] == len(images)
    grams = style_encoder.gram_matrices(images)

    def distance(i, j):
        return sum(float(((g[i] - g[j]) ** 2).sum()) for g in grams)

    same = [distance(2 * k, 2 * k + 1) for k in range(len(styles))]  # one style, two seeds
    different = [distance(2 * a, 2 * b) for a in range(len(styles)) for b in range(a + 1, len(styles))]
    assert max(same) < min(different)

"""The trainer's data pipeline: sources, captions, buckets, scanning, epoch order, latent cache."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from higanbana.errors import ConfigError, HiganbanaError
from higanbana.train.buckets import assign_bucket, make_buckets, resize_and_crop
from higanbana.train.data import (
    DatasetSpec,
    SubsetSpec,
    build_training_data,
    specs_from_dataset_toml,
    subsets_from_imagefolder,
    subsets_from_kohya_folder,
)

SMALL = dict(resolution=(64, 64), min_bucket_reso=16, max_bucket_reso=128, bucket_reso_steps=16)


def make_image(path: Path, size: tuple[int, int], color=(200, 30, 60), fmt: str | None = None) -> Path:
    """A small image with a gradient so resizing and flipping change the pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    for x in range(size[0]):
        image.putpixel((x, 0), (x * 5 % 256, 0, 255 - x * 5 % 256))
    for y in range(size[1]):
        image.putpixel((0, y), (0, y * 7 % 256, 0))
    image.save(path, format=fmt)
    return path


def spec_for(*subsets: SubsetSpec, **overrides) -> DatasetSpec:
    return DatasetSpec(subsets=list(subsets), **{**SMALL, **overrides})


def build(*specs: DatasetSpec):
    return build_training_data(list(specs), progress=False)


# --- buckets ---------------------------------------------------------------------------------


def test_make_buckets_multiples_area_and_square():
    buckets = make_buckets((64, 64), 16, 128, 16)
    assert buckets == sorted(set(buckets))
    assert (64, 64) in buckets
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in buckets)
    assert all(16 <= w <= 128 and 16 <= h <= 128 for w, h in buckets)
    assert all(w * h <= 64 * 64 for w, h in buckets)
    assert (128, 32) in buckets and (32, 128) in buckets
    wide = make_buckets((96, 64), 16, 128, 16)
    assert (96, 64) in wide and (64, 64) in wide and all(w * h <= 96 * 64 for w, h in wide)
    real = make_buckets((1024, 1024))
    assert (1024, 1024) in real and (640, 1536) not in real and max(real, key=lambda b: b[0] * b[1]) == (1024, 1024)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (((64, 64), 16, 128, 0), "bucket_reso_steps"),
        (((64, 64), 128, 16, 16), "min_bucket_reso"),
        (((72, 64), 16, 128, 16), "resolution"),
        (((64, 64), 24, 128, 16), "min_bucket_reso"),
        (((256, 256), 16, 128, 16), "max_bucket_reso"),
    ],
)
def test_make_buckets_validation(args, field):
    with pytest.raises(ConfigError, match=f"data.{field}"):
        make_buckets(*args)


def test_assign_bucket_nearest_aspect_and_no_upscale():
    buckets = make_buckets((64, 64), 16, 128, 16)
    assert assign_bucket((640, 640), buckets) == (64, 64)
    w, h = assign_bucket((400, 240), buckets)
    assert abs(w / h - 400 / 240) < 0.2
    w, h = assign_bucket((240, 480), buckets)
    assert (w, h) == (48, 96) or abs(w / h - 0.5) < 0.1
    # small image: normally enlarged into the 64x64 bucket, never with no_upscale
    assert assign_bucket((40, 40), buckets) == (64, 64)
    assert assign_bucket((40, 40), buckets, no_upscale=True, step=16) == (32, 32)
    assert assign_bucket((50, 20), buckets, no_upscale=True, step=16) == (48, 16)
    # large image keeps its bucket with no_upscale
    assert assign_bucket((640, 640), buckets, no_upscale=True, step=16) == (64, 64)


@pytest.mark.parametrize("size", [(40, 24), (24, 48), (200, 100), (64, 64), (10, 90)])
def test_resize_and_crop_exact_size(size):
    image = Image.new("RGB", size, (1, 2, 3))
    for bucket in [(32, 32), (48, 16), (16, 64)]:
        assert resize_and_crop(image, bucket).size == bucket


# --- sources ---------------------------------------------------------------------------------


def test_kohya_folder_repeats_tokens_and_skips(tmp_path):
    make_image(tmp_path / "10_sks dog" / "a.png", (40, 24))
    make_image(tmp_path / "2_my_style" / "b.png", (24, 48))
    make_image(tmp_path / "3" / "c.png", (24, 48))
    (tmp_path / "notes").mkdir()
    with pytest.warns(UserWarning, match="notes"):
        subsets = subsets_from_kohya_folder(tmp_path, keep_tokens=1)
    by_name = {Path(s.image_dir).name: s for s in subsets}
    assert set(by_name) == {"10_sks dog", "2_my_style", "3"}
    assert by_name["10_sks dog"].num_repeats == 10 and by_name["10_sks dog"].class_tokens == "sks dog"
    assert by_name["2_my_style"].class_tokens == "my_style"
    assert by_name["3"].class_tokens is None and by_name["3"].num_repeats == 3
    assert all(s.keep_tokens == 1 and s.caption_extension == ".txt" for s in subsets)


def test_kohya_folder_pointing_at_images_explains(tmp_path):
    inner = tmp_path / "10_sks dog"
    make_image(inner / "a.png", (40, 24))
    with pytest.raises(HiganbanaError, match="PARENT"):
        subsets_from_kohya_folder(inner)
    with pytest.raises(HiganbanaError, match="does not exist"):
        subsets_from_kohya_folder(tmp_path / "missing")
    with pytest.raises(ConfigError, match="did you mean 'keep_tokens'"):
        subsets_from_kohya_folder(tmp_path, keep_token=1)


def test_caption_fallback_order_and_summary(tmp_path):
    folder = tmp_path / "5_tok"
    for name in "abcde":
        make_image(folder / f"{name}.png", (40, 24))
    (folder / "a.txt").write_text("\n  first line , tag \nsecond line\n", encoding="utf-8")
    (folder / "a.caption").write_text("not used", encoding="utf-8")
    (folder / "b.caption").write_text("from caption", encoding="utf-8")
    (folder / "c.txt").write_text("from txt", encoding="utf-8")
    subsets = subsets_from_kohya_folder(tmp_path, caption_extension=".caption")
    data = build(spec_for(*subsets))
    captions = {item.path.stem: (item.caption, item.caption_source) for item in data.items}
    assert captions["a"] == ("not used", "file")  # .caption is this subset's extension
    assert captions["b"] == ("from caption", "file")
    assert captions["c"] == ("from txt", "file")  # fallback to .txt
    assert captions["d"] == ("tok", "class_tokens")

    subsets = [SubsetSpec(str(folder), caption_extension=".txt")]
    data = build(spec_for(*subsets))
    captions = {item.path.stem: (item.caption, item.caption_source) for item in data.items}
    assert captions["a"] == ("first line , tag", "file")  # first non-empty line
    assert captions["b"] == ("from caption", "file")  # fallback to .caption
    assert captions["e"] == ("", "none")
    summary = data.summary()
    assert "3 from caption files" in summary and "2 with no caption" in summary
    assert "5 images in 1 folder(s), 5 samples per epoch" in summary


def test_summary_counts_repeats(tmp_path):
    for name in "abc":
        make_image(tmp_path / "5_tok" / f"{name}.png", (40, 24))
    (tmp_path / "5_tok" / "a.txt").write_text("x", encoding="utf-8")
    summary = build(spec_for(*subsets_from_kohya_folder(tmp_path))).summary()
    assert "3 images in 1 folder(s), 15 samples per epoch" in summary
    assert "3 images x 5 repeats = 15, class tokens 'tok'" in summary
    assert "1 from caption files" in summary and "2 from class tokens" in summary
    assert "3 images, 15 samples" in summary


def test_exif_orientation_applied(tmp_path):
    image = make_image(tmp_path / "src.png", (40, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    (tmp_path / "imgs").mkdir()
    Image.open(image).convert("RGB").save(tmp_path / "imgs" / "r.jpg", exif=exif)
    data = build(spec_for(SubsetSpec(str(tmp_path / "imgs")), enable_bucket=False, resolution=(24, 40)))
    assert data.items[0].size == (24, 40)
    assert data.load_pixels(0, False).shape == (3, 40, 24)


def test_dataset_toml_levels_and_relative_paths(tmp_path):
    make_image(tmp_path / "imgs" / "a.png", (40, 24))
    make_image(tmp_path / "other" / "b.png", (24, 48))
    toml = tmp_path / "ds.toml"
    toml.write_text(
        """
[general]
shuffle_caption = true
keep_tokens = 1
resolution = 64
bucket_reso_steps = 16
min_bucket_reso = 16
max_bucket_reso = 128

[[datasets]]
batch_size = 2
resolution = [64, 48]
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = "imgs"
  num_repeats = 3

  [[datasets.subsets]]
  image_dir = "other"
  keep_tokens = 0
  caption_dropout_rate = 0
""",
        encoding="utf-8",
    )
    (spec,) = specs_from_dataset_toml(toml, defaults={"flip_aug": True, "cache_latents": "memory", "class_tokens": ""})
    assert spec.batch_size == 2 and spec.resolution == (64, 48) and spec.bucket_reso_steps == 16
    first, second = spec.subsets
    assert Path(first.image_dir) == tmp_path / "imgs" and first.num_repeats == 3
    assert first.keep_tokens == 2 and second.keep_tokens == 0
    assert first.shuffle_caption and first.flip_aug and first.class_tokens is None
    data = build(spec)
    assert len(data.items) == 2 and data.batch_size == 2


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        (
            '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nnum_repeat = 2\n',
            r"ds.toml: \[\[datasets\]\] 1 \[\[datasets.subsets\]\] 1: unknown key 'num_repeat' "
            r"\(did you mean 'num_repeats'\?\)",
        ),
        (
            '[general]\nbatch_sise = 2\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n',
            "did you mean 'batch_size'",
        ),
        ('[[datasets]]\nbatch_size = "2"\n[[datasets.subsets]]\nimage_dir = "x"\n', "batch_size must be an integer"),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nflip_aug = 1\n', "flip_aug must be true or false"),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nresolution = 512\n', "dataset option"),
        ('[[datasets]]\nresolution = [1, 2, 3]\n[[datasets.subsets]]\nimage_dir = "x"\n', "resolution"),
        ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n", "image_dir is required"),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\ncolor_aug = true\n', "not supported"),
        ("[general]\nbatch_size = 1\n", "no \\[\\[datasets\\]\\]"),
        ("[general\n", "not valid TOML"),
        ('[[datasets]]\nbucket_reso_steps = 48\n[[datasets.subsets]]\nimage_dir = "x"\n', "1: data.min_bucket_reso"),
    ],
)
def test_dataset_toml_errors(tmp_path, body, pattern):
    toml = tmp_path / "ds.toml"
    toml.write_text(body, encoding="utf-8")
    with pytest.raises(ConfigError, match=pattern) as info:
        specs_from_dataset_toml(toml)
    assert "ds.toml" in str(info.value) or "invalid" not in pattern


def test_imagefolder_metadata(tmp_path):
    make_image(tmp_path / "a.png", (40, 24))
    make_image(tmp_path / "b.jpg", (24, 48), fmt="JPEG")
    make_image(tmp_path / "c.png", (24, 48))
    rows = [{"file_name": "a.png", "text": " a cat "}, {"file_name": "b.jpg", "caption": "a dog"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    (subset,) = subsets_from_imagefolder(tmp_path, flip_aug=True)
    assert subset.flip_aug and subset.metadata_file.endswith("metadata.jsonl")
    with pytest.warns(UserWarning, match="not listed"):
        data = build(spec_for(subset))
    assert {i.path.name: i.caption for i in data.items} == {"a.png": "a cat", "b.jpg": "a dog"}
    assert all(i.caption_source == "metadata" for i in data.items)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{oops\n', encoding="utf-8")
    with pytest.raises(HiganbanaError, match=r"metadata.jsonl:2"):
        subsets_from_imagefolder(tmp_path)


# --- scanning --------------------------------------------------------------------------------


def test_corrupt_images_skipped_and_empty_dataset(tmp_path):
    folder = tmp_path / "imgs"
    make_image(folder / "good.png", (40, 24))
    (folder / "bad.png").write_bytes(b"not an image")
    jpg = make_image(tmp_path / "full.jpg", (64, 64), fmt="JPEG").read_bytes()
    (folder / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (folder / "notes.md").write_text("ignored")
    with pytest.warns(UserWarning, match="skipped 2 unreadable") as record:
        data = build(spec_for(SubsetSpec(str(folder))))
    assert "bad.png" in str(record[0].message)
    assert [i.path.name for i in data.items] == ["good.png"]
    assert sorted(p.name for p, _ in data.skipped) == ["bad.png", "trunc.jpg"]
    assert "skipped 2" in data.summary()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HiganbanaError, match="empty dataset.*empty"):
        build(spec_for(SubsetSpec(str(empty))))
    with pytest.raises(HiganbanaError, match="does not exist"):
        build(spec_for(SubsetSpec(str(tmp_path / "nope"))))


def test_items_sizes_buckets_and_fingerprints(tmp_path):
    folder = tmp_path / "imgs"
    make_image(folder / "a.PNG", (40, 24))
    make_image(folder / "b.png", (64, 64))
    make_image(folder / "c.png", (24, 48))
    data = build(spec_for(SubsetSpec(str(folder))))
    assert [i.path.name for i in data.items] == ["a.PNG", "b.png", "c.png"]
    assert [i.size for i in data.items] == [(40, 24), (64, 64), (24, 48)]
    assert all(i.bucket in data.buckets for i in data.items)
    assert len({i.fingerprint for i in data.items}) == 3
    flat = build(spec_for(SubsetSpec(str(folder)), enable_bucket=False))
    assert {i.bucket for i in flat.items} == {(64, 64)}
    pixels = data.load_pixels(0, flip=False)
    w, h = data.items[0].bucket
    assert pixels.shape == (3, h, w) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert torch.equal(data.load_pixels(0, flip=True), pixels.flip(-1))
    with pytest.raises(ConfigError, match="batch_size"):
        build(spec_for(SubsetSpec(str(folder))), spec_for(SubsetSpec(str(folder)), batch_size=2))


def test_transparent_image_on_white(tmp_path):
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(tmp_path / "t.png")
    data = build(spec_for(SubsetSpec(str(tmp_path)), enable_bucket=False, resolution=(32, 32)))
    assert torch.allclose(data.load_pixels(0, False), torch.ones(3, 32, 32))


# --- epoch order and per-sample randomness ---------------------------------------------------


def _mixed_data(tmp_path):
    a, b = tmp_path / "3_a", tmp_path / "1_b"
    for i in range(5):
        make_image(a / f"w{i}.png", (40, 24), color=(i * 40, 0, 0))
    for i in range(3):
        make_image(b / f"t{i}.png", (24, 48), color=(0, i * 40, 0))
    make_image(b / "sq.png", (64, 64))
    return build(spec_for(*subsets_from_kohya_folder(tmp_path, shuffle_caption=True, flip_aug=True)))


def test_epoch_batches_deterministic_full_and_single_bucket(tmp_path):
    data = _mixed_data(tmp_path)
    for global_batch in (1, 2, 4, 7):
        batches = data.epoch_batches(epoch=1, seed=42, global_batch=global_batch)
        assert batches == data.epoch_batches(epoch=1, seed=42, global_batch=global_batch)
        assert len(batches) == data.epoch_length(global_batch)
        assert all(len(batch) == global_batch for batch in batches)
        assert all(len({data.items[i].bucket for i in batch}) == 1 for batch in batches)
        counts = Counter(i for batch in batches for i in batch)
        for index, item in enumerate(data.items):  # every repeat present (plus fill)
            assert counts[index] >= data.subsets[item.subset].num_repeats
        assert sum(counts.values()) - data.samples_per_epoch() < global_batch * len(data.buckets)
    assert data.epoch_batches(2, 42, 2) != data.epoch_batches(1, 42, 2)
    assert data.epoch_batches(1, 43, 2) != data.epoch_batches(1, 42, 2)
    assert data.epoch_batches(1, -5, 2) == data.epoch_batches(1, -5, 2)
    with pytest.raises(ConfigError):
        data.epoch_length(0)


def test_caption_shuffle_keeps_tokens_and_is_deterministic(tmp_path):
    folder = tmp_path / "imgs"
    make_image(folder / "a.png", (40, 24))
    (folder / "a.txt").write_text("sks, dog, red, sitting, grass, sunny", encoding="utf-8")
    subset = SubsetSpec(str(folder), shuffle_caption=True, keep_tokens=2)
    data = build(spec_for(subset))
    seen = set()
    for position in range(20):
        text = data.caption(0, epoch=0, seed=1, position=position)
        assert text == data.caption(0, epoch=0, seed=1, position=position)
        tokens = text.split(", ")
        assert tokens[:2] == ["sks", "dog"] and sorted(tokens) == sorted(
            ["sks", "dog", "red", "sitting", "grass", "sunny"]
        )
        seen.add(text)
    assert len(seen) > 5
    subset.shuffle_caption, subset.caption_dropout_rate = False, 0.5
    dropped = [data.caption(0, 0, 1, p) for p in range(200)]
    assert set(dropped) == {"", "sks, dog, red, sitting, grass, sunny"}
    assert 60 < dropped.count("") < 140
    subset.caption_dropout_rate = 0.0
    assert data.caption(0, 0, 1, 0) == "sks, dog, red, sitting, grass, sunny"
    assert not any(data.flip_for(0, 0, 1, p) for p in range(50))
    subset.flip_aug = True
    flips = [data.flip_for(0, 0, 1, p) for p in range(200)]
    assert flips == [data.flip_for(0, 0, 1, p) for p in range(200)] and 60 < sum(flips) < 140


# --- latent cache ----------------------------------------------------------------------------


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    from higanbana.models.tiny import TINY_VAE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**TINY_VAE).eval()


def test_latent_cache_memory_disk_direct_equal(tmp_path):
    from higanbana.train.latents import LatentCache, encode_pixels, sample_latents

    root = tmp_path / "data"
    make_image(root / "1_a" / "a.png", (40, 24))
    make_image(root / "1_a" / "b.png", (48, 30))
    make_image(root / "2_b" / "c.png", (24, 48))
    subsets = subsets_from_kohya_folder(root)
    subsets[0].flip_aug = True
    data = build(spec_for(*subsets))
    vae = tiny_vae()
    memory = LatentCache(vae, data, mode="memory", batch_size=2, progress=False)
    memory.fill()
    assert len(memory._memory) == 5  # a, b with flips, c without
    disk = LatentCache(vae, data, mode="disk", folder=tmp_path / "cache", batch_size=2, progress=False)
    disk.fill()
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 5 and not list((tmp_path / "cache").glob("*.tmp"))
    for index, flip in memory.entries():
        direct = encode_pixels(vae, data.load_pixels(index, flip)[None])[0]
        w, h = data.items[index].bucket
        assert direct.shape == (8, h // 2, w // 2)
        torch.testing.assert_close(memory.get(index, flip), direct, rtol=1e-5, atol=1e-5)
        assert torch.equal(disk.get(index, flip), memory.get(index, flip))
        gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        torch.testing.assert_close(
            sample_latents(memory.get(index, flip), gen_a, 0.18215),
            sample_latents(direct, gen_b, 0.18215),
            rtol=1e-5,
            atol=1e-5,
        )
    params = memory.get(0, False)
    z = sample_latents(params, torch.Generator().manual_seed(0), 0.5, shift_factor=0.1)
    mean, logvar = params.chunk(2, dim=0)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, (mean + torch.exp(0.5 * logvar) * noise - 0.1) * 0.5)
    half = sample_latents(params.half(), torch.Generator().manual_seed(0), 0.5, shift_factor=0.1)
    assert half.dtype == torch.float16 and torch.allclose(half.float(), z, atol=1e-2)
    with pytest.raises(ConfigError, match="cache_dir"):
        LatentCache(vae, data, mode="disk")
    with pytest.raises(ConfigError, match="cache_latents"):
        LatentCache(vae, data, mode="gpu")


def test_latent_cache_invalidation(tmp_path):
    from higanbana.train.latents import LatentCache, vae_fingerprint

    folder = tmp_path / "imgs"
    make_image(folder / "a.png", (40, 24))
    vae = tiny_vae()
    data = build(spec_for(SubsetSpec(str(folder))))
    cache = LatentCache(vae, data, mode="disk", folder=tmp_path / "cache", progress=False)
    cache.fill()
    before = cache.get(0, False)
    old_path = cache.path(0, False)

    # same content rewritten (new mtime): still valid
    data_again = build(spec_for(SubsetSpec(str(folder))))
    assert LatentCache(vae, data_again, mode="disk", folder=tmp_path / "cache").path(0, False) == old_path

    # changed image content: new entry
    make_image(folder / "a.png", (40, 24), color=(10, 200, 10))
    changed = build(spec_for(SubsetSpec(str(folder))))
    cache2 = LatentCache(vae, changed, mode="disk", folder=tmp_path / "cache", progress=False)
    assert cache2.path(0, False) != old_path and not cache2.path(0, False).exists()
    assert not torch.equal(cache2.get(0, False), before)
    assert cache2.path(0, False).exists()  # get() without fill() encodes and stores

    # changed VAE encoder weights: new fingerprint, new entry
    fp = vae_fingerprint(vae)
    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] += 1.0
    assert vae_fingerprint(vae) != fp
    cache3 = LatentCache(vae, data, mode="disk", folder=tmp_path / "cache", progress=False)
    assert cache3.path(0, False) != old_path
    with torch.no_grad():
        vae.decoder.conv_in.weight.zero_()  # the decoder does not affect encoding
    assert LatentCache(vae, data, mode="disk", folder=tmp_path / "cache").path(0, False) == cache3.path(0, False)

    # a damaged entry is re-encoded with a warning
    old_path.write_bytes(b"garbage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = cache.get(0, False)
    assert any("unreadable" in str(w.message) for w in caught)
    assert again.shape == before.shape

"""The miniature world: determinism, captions, rendering, held-out concepts and the checker."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from higanbana.errors import ConfigError
from higanbana.evaluate.prompts import Concept, build_prompt_set, process_for_clip
from higanbana.miniworld import (
    BACKGROUNDS,
    COLOURS,
    CONCEPTS,
    HELD_OUT_WORDS,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
    Scene,
    colours_compatible,
    concept_images,
    concept_samples,
    dataset,
    evaluation_concept,
    render,
    sample_scene,
    write_concept_folder,
)
from higanbana.miniworld.checker import analyse, check, count_of, dominant_colour, position_of, shape_of
from higanbana.miniworld.world import caption_words
from higanbana.train.data import subsets_from_kohya_folder


def _bytes(img: Image.Image) -> bytes:
    return np.asarray(img).tobytes()


# ---------------------------------------------------------------------------------------------
# determinism


def test_render_is_deterministic_in_scene_size_seed():
    scene = Scene("star", "red", "medium", "left", 2, "stripes", "blue", "pencil")
    a, b = render(scene, 32, seed=5), render(scene, 32, seed=5)
    assert _bytes(a) == _bytes(b)
    assert _bytes(render(scene, 32, seed=6)) != _bytes(a)
    assert render(scene, 64, seed=5).size == (64, 64)


def test_render_ignores_global_rng():
    scene = Scene("heart", "pink", style="pencil", background="dots", background_colour="black")
    np.random.seed(0)
    a = render(scene, 32, 1)
    np.random.seed(99)
    np.random.rand(10)
    assert _bytes(render(scene, 32, 1)) == _bytes(a)


def test_dataset_is_deterministic_and_prefix_stable():
    a = dataset(6, seed=3)
    b = dataset(6, seed=3)
    assert [c for _, c, _ in a] == [c for _, c, _ in b]
    assert all(_bytes(x[0]) == _bytes(y[0]) for x, y in zip(a, b, strict=True))
    short = dataset(3, seed=3)
    assert [s for _, _, s in short] == [s for _, _, s in a[:3]]
    other = dataset(6, seed=4)
    assert [c for _, c, _ in other] != [c for _, c, _ in a]
    for img, caption, scene in a:
        assert img.size == (32, 32) and img.mode == "RGB"
        assert caption == scene.caption()


def test_sample_scene_is_deterministic_and_fixed_keeps_stream():
    s1 = sample_scene(np.random.default_rng(7))
    s2 = sample_scene(np.random.default_rng(7))
    assert s1 == s2
    fixed = sample_scene(np.random.default_rng(7), style="flat")
    assert fixed.style == "flat" and fixed.shape == s1.shape and fixed.position == s1.position


# ---------------------------------------------------------------------------------------------
# captions


@pytest.mark.parametrize(
    ("scene", "caption"),
    [
        (
            Scene("star", "red", "small", "left", 2, "stripes", "blue", "outlined"),
            "two small red stars on the left, striped blue background, outlined style",
        ),
        (
            Scene("cross", "orange", "large", "center", 1, "plain", "white", "flat"),
            "a large orange cross in the center, plain white background, flat style",
        ),
        (
            Scene("cross", "black", "small", "top", 3, "dots", "yellow", "pencil"),
            "three small black crosses at the top, dotted yellow background, pencil style",
        ),
        (
            Scene("ring", "cyan", "medium", "bottom", 1, "gradient", "purple", "pixelated"),
            "a medium cyan ring at the bottom, purple gradient background, pixelated style",
        ),
        (
            Scene("heart", "white", "small", "right", 2, "checker", "green", "flat"),
            "two small white hearts on the right, checkered green background, flat style",
        ),
    ],
)
def test_captions(scene, caption):
    assert scene.caption() == caption


def test_scene_validates_attributes():
    with pytest.raises(ConfigError, match="did you mean 'circle'"):
        Scene(shape="circel")
    with pytest.raises(ConfigError):
        Scene(count=4)
    with pytest.raises(ConfigError):
        render(Scene(), size=8)


def test_held_out_words_never_in_base_captions():
    rng = np.random.default_rng(0)
    words: set[str] = set()
    seen = {k: set() for k in ("shape", "colour", "size", "position", "count", "background", "style")}
    for _ in range(2000):
        scene = sample_scene(rng)
        words |= caption_words(scene.caption())
        for k, values in seen.items():
            values.add(getattr(scene, k))
        assert scene.count == 1 or SIZES.index(scene.size) <= 3 - scene.count
        assert colours_compatible(scene.colour, scene.background_colour)
    assert not words & HELD_OUT_WORDS
    assert {c.trigger for c in CONCEPTS.values()} <= HELD_OUT_WORDS
    # every base value is reached
    assert seen["shape"] == set(SHAPES) and seen["style"] == set(STYLES) and seen["colour"] == set(COLOURS)
    assert seen["position"] == set(POSITIONS) and seen["background"] == set(BACKGROUNDS)
    for _, caption, _ in dataset(40, seed=1):
        assert not caption_words(caption) & HELD_OUT_WORDS


def test_exclude():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = sample_scene(rng, exclude=("star", "pencil", "red"))
        assert scene.shape != "star" and scene.style != "pencil" and scene.colour != "red"
        assert sample_scene(rng, exclude=("small",)).size != "small"
    with pytest.raises(ConfigError, match="every shape"):
        sample_scene(rng, exclude=SHAPES)


# ---------------------------------------------------------------------------------------------
# rendering


@pytest.mark.parametrize("size", [32, 64])
def test_every_shape_colour_style_renders(size):
    for i, shape in enumerate(SHAPES):
        for j, style in enumerate(STYLES):
            scene = Scene(shape, list(COLOURS)[(i + j) % len(COLOURS)], "large", style=style, background_colour="white")
            if scene.colour == "white":
                scene = Scene(shape, "black", "large", style=style)
            img = render(scene, size, seed=i)
            assert img.size == (size, size) and img.mode == "RGB"
            arr = np.asarray(img).reshape(-1, 3).astype(int)
            target = np.array(COLOURS[scene.colour])
            # the object's colour is really there (pencil adds grain, so allow some tolerance)
            assert (np.abs(arr - target).max(1) <= 30).sum() >= size * size // 50, (shape, style)
    for k, colour in enumerate(COLOURS):
        bg = "black" if colour == "white" else "white"
        for background in BACKGROUNDS:
            img = render(Scene("circle", colour, "large", background=background, background_colour=bg), size, k)
            assert dominant_colour(img) == colour


def test_held_out_shape_and_style_differ_from_base():
    crescent = render(Scene("crescent", "green", "large"), 32)
    circle = render(Scene("circle", "green", "large"), 32)
    assert _bytes(crescent) != _bytes(circle)
    scene = Scene("square", "blue", "large", style="mosaic")
    assert _bytes(render(scene, 32)) != _bytes(render(Scene("square", "blue", "large", style="pixelated"), 32))


# ---------------------------------------------------------------------------------------------
# held-out concepts


def test_concepts_cover_the_paper_categories():
    assert {c.category for c in CONCEPTS.values()} == {"object", "style", "scene"}
    triggers = [c.trigger for c in CONCEPTS.values()]
    assert len(set(triggers)) == 3
    for t in triggers:
        assert t not in SHAPES + STYLES + tuple(COLOURS)


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_concept_images_and_captions(name):
    concept = CONCEPTS[name]
    items = concept_images(name, n=6, seed=2)
    assert len(items) == 6
    for img, caption in items:
        assert img.size == (32, 32)
        assert caption.startswith(f"{concept.trigger} {concept.class_word}, ")
        assert caption.count(concept.trigger) == 1
    again = concept_images(name, n=6, seed=2)
    assert [c for _, c in again] == [c for _, c in items]
    assert all(_bytes(a) == _bytes(b) for (a, _), (b, _) in zip(items, again, strict=True))
    # the trigger word alone also works
    assert [c for _, c in concept_images(concept.trigger, n=2, seed=2)] == [c for _, c in items[:2]]
    assert concept_images(name, n=1, size=64)[0][0].size == (64, 64)


def test_concept_scenes_use_held_out_parts():
    assert all(s.shape == "crescent" for *_, s in concept_samples("zorb_toy", 5))
    assert all(s.style == "mosaic" for *_, s in concept_samples("vlek_style", 5))
    assert all(s.background == "landscape" for *_, s in concept_samples("qarn_scene", 5))
    with pytest.raises(ConfigError, match="unknown world concept"):
        concept_images("nope")


def test_write_concept_folder_kohya_layout(tmp_path):
    folder = write_concept_folder("zorb_toy", tmp_path, n=4, repeats=10, seed=1)
    assert folder == tmp_path / "10_zorb toy"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"img{i:03d}.{e}" for i in range(4) for e in ("png", "txt")]
    for i in range(4):
        caption = (folder / f"img{i:03d}.txt").read_text(encoding="utf-8").strip()
        assert caption.startswith("zorb toy, ")
        with Image.open(folder / f"img{i:03d}.png") as img:
            assert img.size == (32, 32)
    # the trainer reads it as a kohya train_data_dir
    (subset,) = subsets_from_kohya_folder(tmp_path)
    assert (subset.num_repeats, subset.class_tokens) == (10, "zorb toy")


def test_evaluation_concept(tmp_path):
    for name in CONCEPTS:
        folder = write_concept_folder(name, tmp_path, n=3, repeats=5)
        concept = evaluation_concept(name, folder)
        assert isinstance(concept, Concept)
        assert concept.descriptor == CONCEPTS[name].descriptor
        assert concept.category == CONCEPTS[name].category
        assert len(concept.train_images) == 3 and len(concept.train_captions) == 3
        items = build_prompt_set(concept, "train", n_images=6)
        assert len(items) == 6
    zorb = evaluation_concept("zorb_toy", tmp_path / "5_zorb toy")
    assert process_for_clip("zorb toy, green", zorb) == "toy, green"
    with pytest.raises(ConfigError):
        evaluation_concept("zorb_toy", tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# the checker


def _accuracy(style: str, n: int, **fixed) -> dict[str, float]:
    rng = np.random.default_rng(2024)
    hits: dict[str, int] = {}
    for _ in range(n):
        scene = sample_scene(rng, style=style, **fixed)
        result = check(render(scene, 32, int(rng.integers(1 << 30))), scene)
        for k, v in result.items():
            hits[k] = hits.get(k, 0) + int(v)
    return {k: v / n for k, v in hits.items()}


def test_checker_accuracy_flat_single_objects():
    acc = _accuracy("flat", 200, count=1)
    assert acc["shape"] >= 0.9 and acc["colour"] >= 0.95, acc
    assert acc["count"] >= 0.95 and acc["position"] >= 0.95 and acc["size"] >= 0.9, acc


def test_checker_accuracy_other_styles():
    acc = _accuracy("flat", 100)  # groups of 1-3
    assert min(acc.values()) >= 0.9, acc
    for style, shape_min in (("outlined", 0.8), ("pencil", 0.8), ("pixelated", 0.7)):
        acc = _accuracy(style, 80, count=1)
        assert acc["colour"] >= 0.9 and acc["shape"] >= shape_min and acc["position"] >= 0.9, (style, acc)


def test_checker_helpers_and_blank_image():
    img = render(Scene("triangle", "yellow", "large", "right", 1, "checker", "blue"), 32, 3)
    assert dominant_colour(img) == "yellow"
    assert shape_of(img) == "triangle"
    assert position_of(img) == "right"
    assert count_of(render(Scene("square", "red", "small", "top", 3), 32)) == 3
    blank = Image.new("RGB", (32, 32), (200, 200, 200))
    a = analyse(blank)
    assert a.count == 0 and a.shape is None and a.colour is None
    assert not any(check(blank, Scene()).values())
    # float arrays in [0, 1] work too
    assert dominant_colour(np.asarray(img) / 255.0) == "yellow"

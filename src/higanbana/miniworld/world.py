"""The miniature world: a deterministic generator of small captioned RGB images.

One file on purpose: the vocabularies, scenes, rendering, base distribution and held-out concepts
are one generator whose guarantees (held-out words, determinism) hold across all of them.

A :class:`Scene` is a set of attributes (shape, colour, size, position, count, background
pattern and colour, rendering style); :func:`render` draws it at 32 or 64 px (or any size >= 16)
and :meth:`Scene.caption` writes its caption from the attributes. :func:`sample_scene` and
:func:`dataset` give the base-training distribution. Three held-out concepts (:data:`CONCEPTS`)
follow the paper's categories: an object (``zorb toy``: a crescent-shaped toy with an eye, a shape
the base world never shows), a style (``vlek style``: mosaic tiles with grout lines) and a scene
(``qarn scene``: a purple-dusk sky with a sun over two green hills). Their trigger words, class
words ``toy``/``scene`` and the names of their shape/style/background never appear in base
captions (:data:`HELD_OUT_WORDS`).

Everything is deterministic: randomness comes only from ``numpy.random.default_rng`` seeded by
the arguments (never the global RNG, never Python's ``hash``). Images are drawn 4x super-sampled
with PIL/numpy and reduced with a box filter, so 32 px objects have anti-aliased edges.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError, nearest
from ..evaluate.prompts import Concept
from ..safeio import atomic_path, clean_stale_temps

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "CONCEPTS",
    "COUNTS",
    "HELD_OUT_SHAPES",
    "HELD_OUT_STYLES",
    "HELD_OUT_WORDS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "STYLES",
    "Scene",
    "WorldConcept",
    "colours_compatible",
    "concept_images",
    "concept_samples",
    "dataset",
    "evaluation_concept",
    "render",
    "sample_scene",
    "write_concept_folder",
]

# ---------------------------------------------------------------------------------------------
# vocabularies

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 80, 220),
    "purple": (140, 60, 200),
    "pink": (245, 120, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
POSITIONS: tuple[str, ...] = ("left", "center", "right", "top", "bottom")
COUNTS: tuple[int, ...] = (1, 2, 3)
BACKGROUNDS: tuple[str, ...] = ("plain", "stripes", "dots", "checker", "gradient")
STYLES: tuple[str, ...] = ("flat", "outlined", "pixelated", "pencil")

# held out of the base world: only the concepts use them
HELD_OUT_SHAPES: tuple[str, ...] = ("crescent",)
HELD_OUT_STYLES: tuple[str, ...] = ("mosaic",)
HELD_OUT_BACKGROUNDS: tuple[str, ...] = ("landscape",)

# object radius as a fraction of the image side (before jitter)
SIZE_RADIUS: dict[str, float] = {"small": 0.15, "medium": 0.22, "large": 0.30}
# the largest size a group of `count` objects is sampled with (render shrinks larger ones to fit)
MAX_SIZE_FOR_COUNT: dict[int, str] = {1: "large", 2: "medium", 3: "small"}

_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
_PLURALS = {"cross": "crosses"}
_POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_BACKGROUND_ADJ = {
    "plain": "plain",
    "stripes": "striped",
    "dots": "dotted",
    "checker": "checkered",
    "gradient": "gradient",
}

_SS = 4  # super-sampling factor
_MARGIN = 0.05  # free border, fraction of the side
_GAP = 0.07  # gap between objects of a group, fraction of the side
_JITTER_XY = 0.03
_JITTER_ROT = 10.0  # degrees
_JITTER_SIZE = 0.06
_PIXEL_CELLS = 16  # the pixelated style's grid
_MOSAIC_CELLS = 10  # the mosaic style's grid


def _check_choice(what: str, value, choices: Collection) -> None:
    if value not in choices:
        raise ConfigError(
            f"{what} must be one of {tuple(choices)}, got {value!r}{nearest(str(value), map(str, choices))}"
        )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(word: str) -> str:
    return _PLURALS.get(word, word + "s")


# ---------------------------------------------------------------------------------------------
# scenes


@dataclass(frozen=True)
class Scene:
    """The attributes of one image. ``shape``/``style``/``background`` also accept the held-out
    values (``crescent``, ``mosaic``, ``landscape``) that only the concepts use."""

    shape: str = "circle"
    colour: str = "red"
    size: str = "medium"
    position: str = "center"
    count: int = 1
    background: str = "plain"
    background_colour: str = "white"
    style: str = "flat"

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES + HELD_OUT_SHAPES)
        _check_choice("colour", self.colour, COLOURS)
        _check_choice("size", self.size, SIZES)
        _check_choice("position", self.position, POSITIONS)
        _check_choice("count", self.count, COUNTS)
        _check_choice("background", self.background, BACKGROUNDS + HELD_OUT_BACKGROUNDS)
        _check_choice("background_colour", self.background_colour, COLOURS)
        _check_choice("style", self.style, STYLES + HELD_OUT_STYLES)

    # -- caption pieces: ``object_phrase, background_phrase, style_phrase``
    def object_phrase(self) -> str:
        """``"two small red stars on the left"`` / ``"an orange large ..."``: count, size, colour,
        shape (plural when count > 1) and position."""
        noun = self.shape if self.count == 1 else _plural(self.shape)
        head = _article(self.size) if self.count == 1 else _COUNT_WORDS[self.count]
        return f"{head} {self.size} {self.colour} {noun} {_POSITION_PHRASES[self.position]}"

    def background_phrase(self) -> str:
        """``"striped blue background"``, ``"plain white background"``, ``"blue gradient background"``."""
        if self.background == "gradient":
            return f"{self.background_colour} gradient background"
        return f"{_BACKGROUND_ADJ.get(self.background, self.background)} {self.background_colour} background"

    def style_phrase(self) -> str:
        """``"flat style"``, ``"outlined style"``, ``"pixelated style"``, ``"pencil style"``."""
        return f"{self.style} style"

    def caption(self) -> str:
        """``"<object phrase>, <background phrase>, <style phrase>"``, e.g.
        ``"two small red stars on the left, striped blue background, outlined style"``."""
        return f"{self.object_phrase()}, {self.background_phrase()}, {self.style_phrase()}"

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def colours_compatible(colour: str, background_colour: str) -> bool:
    """Whether an object of ``colour`` stands out clearly from both colours of a background of
    ``background_colour`` (the sampler only draws compatible pairs)."""
    c = np.array(COLOURS[colour], float)
    bg = np.array(COLOURS[background_colour], float)
    shade = np.array(_shade(COLOURS[background_colour]), float)
    return bool(np.linalg.norm(c - bg) >= 110 and np.linalg.norm(c - shade) >= 90)


def sample_scene(rng: np.random.Generator, *, exclude: Collection[str] = (), **fixed) -> Scene:
    """One scene of the base-training distribution: each attribute uniform over its vocabulary
    (minus the values in ``exclude``), with two constraints: groups of 2 (3) objects are at most
    medium (small), and the object colour is :func:`colours_compatible` with the background.
    ``fixed`` pins attributes (``sample_scene(rng, style="flat", count=1)``). The held-out shape
    and style are sampled only when named in ``fixed``; every random draw happens whatever is
    fixed, so a fixed attribute does not shift the others' stream."""
    unknown = [k for k in fixed if k not in {f.name for f in fields(Scene)}]
    if unknown:
        raise ConfigError(f"sample_scene: unknown attribute {unknown[0]!r}")
    excl = set(exclude)

    def pick(name: str, choices: Sequence):
        options = [c for c in choices if c not in excl]
        if not options:
            raise ConfigError(f"sample_scene: every {name} is excluded")
        value = options[int(rng.integers(len(options)))]
        return fixed.get(name, value)

    count = pick("count", COUNTS)
    max_size = SIZES.index(MAX_SIZE_FOR_COUNT[count])
    sizes = [s for s in SIZES[: max_size + 1] if s not in excl] or SIZES  # render shrinks big groups
    size = pick("size", sizes)
    shape = pick("shape", SHAPES)
    position = pick("position", POSITIONS)
    background = pick("background", BACKGROUNDS)
    style = pick("style", STYLES)
    bg_colour = pick("background_colour", list(COLOURS))
    colours = [c for c in COLOURS if colours_compatible(c, bg_colour)] or list(COLOURS)
    colour = pick("colour", colours)
    return Scene(
        shape=shape,
        colour=colour,
        size=size,
        position=position,
        count=count,
        background=background,
        background_colour=bg_colour,
        style=style,
    )


# ---------------------------------------------------------------------------------------------
# geometry


def _unit_polygon(shape: str) -> list[tuple[float, float]] | None:
    """Vertices in a unit frame (radius ~1, y down); None for shapes drawn with ellipses."""
    if shape == "square":
        a = 0.78
        return [(-a, -a), (a, -a), (a, a), (-a, a)]
    if shape == "triangle":
        pts = [(math.cos(math.radians(t)), math.sin(math.radians(t))) for t in (-90, 30, 150)]
        return [(x, y + 0.2) for x, y in pts]  # centre the bounding box
    if shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.46
            t = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(t), rad * math.sin(t) + 0.09))
        return pts
    if shape == "cross":
        a, w = 0.92, 0.32
        pts = []
        for k in range(4):  # the top arm and its three quarter turns
            for x, y in ((-w, -a), (w, -a), (w, -w)):
                for _ in range(k):
                    x, y = -y, x
                pts.append((x, y))
        return pts
    if shape == "diamond":
        return [(0.0, -1.0), (0.66, 0.0), (0.0, 1.0), (-0.66, 0.0)]
    if shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 16.5, -(y + 2.5) / 15.0))
        return pts
    return None


def _shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, side: int) -> Image.Image:
    """A binary ('L', 0/255) mask of one shape centred at (cx, cy) with radius r (pixels)."""
    mask = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(mask)

    def disc(x, y, rad, fill):
        d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=fill)

    if shape == "circle":
        disc(cx, cy, r, 255)
    elif shape == "ring":
        disc(cx, cy, r, 255)
        disc(cx, cy, 0.5 * r, 0)
    elif shape == "crescent":
        ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        disc(cx, cy, r, 255)
        ox, oy = 0.42 * r, -0.22 * r
        disc(cx + ox * ca - oy * sa, cy + ox * sa + oy * ca, 0.8 * r, 0)
    else:
        ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        pts = [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in _unit_polygon(shape)]
        d.polygon(pts, fill=255)
    return mask


def _erode(mask: Image.Image, width: int) -> Image.Image:
    """Erosion by a (2 width + 1)-pixel square (separable running minimum; outside counts as 0)."""
    if width <= 0:
        return mask
    a = np.pad(np.asarray(mask), width)
    k = 2 * width + 1
    a = np.lib.stride_tricks.sliding_window_view(a, k, axis=0).min(-1)
    a = np.lib.stride_tricks.sliding_window_view(a, k, axis=1).min(-1)
    return Image.fromarray(np.ascontiguousarray(a))


def _layout(scene: Scene, rng: np.random.Generator) -> tuple[list[tuple[float, float]], float]:
    """Object centres (unit coordinates) and the (unit) radius, with the seed's jitter."""
    n = scene.count
    r = SIZE_RADIUS[scene.size] * (1 + rng.uniform(-_JITTER_SIZE, _JITTER_SIZE))
    r = min(r, (1 - 2 * _MARGIN - (n - 1) * _GAP) / (2 * n))  # a group must fit across
    step = 2 * r + _GAP
    offsets = [(i - (n - 1) / 2) * step for i in range(n)]
    edge = _MARGIN + r
    if scene.position == "left":
        pts = [(edge, 0.5 + o) for o in offsets]
    elif scene.position == "right":
        pts = [(1 - edge, 0.5 + o) for o in offsets]
    elif scene.position == "top":
        pts = [(0.5 + o, edge) for o in offsets]
    elif scene.position == "bottom":
        pts = [(0.5 + o, 1 - edge) for o in offsets]
    else:
        pts = [(0.5 + o, 0.5) for o in offsets]
    jx, jy = rng.uniform(-_JITTER_XY, _JITTER_XY, size=2)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    # keep the whole group inside the margins
    jx = float(np.clip(jx, edge - min(xs), 1 - edge - max(xs)))
    jy = float(np.clip(jy, edge - min(ys), 1 - edge - max(ys)))
    return [(x + jx, y + jy) for x, y in pts], r


# ---------------------------------------------------------------------------------------------
# backgrounds


def _mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(round(x * (1 - t) + y * t) for x, y in zip(a, b, strict=True))


def _luma(c) -> float:
    return (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) / 255.0


def _shade(c) -> tuple[int, int, int]:
    """The second colour of a patterned background: darker for light colours, lighter for dark."""
    return _mix(c, (0, 0, 0), 0.22) if _luma(c) > 0.55 else _mix(c, (255, 255, 255), 0.35)


def _background(kind: str, colour: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """An (side, side, 3) float array. Patterns reach the image border (the checker relies on it)."""
    base = np.array(COLOURS[colour], np.float32)
    shade = np.array(_shade(COLOURS[colour]), np.float32)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    period = side / 4
    if kind == "plain":
        t = np.zeros((side, side), np.float32)
    elif kind == "stripes":
        phase = rng.uniform(0, period)
        t = (((xx + yy + phase) % period) < period / 2).astype(np.float32)
    elif kind == "dots":
        dx = (xx + period / 2) % period - period / 2
        dy = (yy + period / 2) % period - period / 2
        t = (dx * dx + dy * dy <= (0.2 * period) ** 2).astype(np.float32)
    elif kind == "checker":
        q = period / 2
        t = (((xx // q) + (yy // q)) % 2).astype(np.float32)
    elif kind == "gradient":
        t = 1 - yy / side  # shade at the top, the base colour at the bottom
    else:
        raise ConfigError(f"background {kind!r} is not a base background")
    return base * (1 - t[..., None]) + shade * t[..., None]


_SKY_TOP = (62, 32, 112)
_SKY_HORIZON = (250, 150, 110)
_SUN = (255, 228, 120)
_HILL_BACK = (32, 122, 112)
_HILL_FRONT = (18, 72, 52)


def _landscape(side: int, rng: np.random.Generator) -> np.ndarray:
    """The ``qarn`` scene: a purple-to-peach dusk sky, a pale sun, two layered green hills."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    u, v = xx / side, yy / side
    t = np.clip(v / 0.65, 0, 1)[..., None]
    img = np.array(_SKY_TOP, np.float32) * (1 - t) + np.array(_SKY_HORIZON, np.float32) * t
    sun_x = 0.27 if rng.random() < 0.5 else 0.73
    sun_x += rng.uniform(-0.04, 0.04)
    sun_y = 0.24 + rng.uniform(-0.03, 0.03)
    sun = (u - sun_x) ** 2 + (v - sun_y) ** 2 <= 0.11**2
    img[sun] = _SUN
    ph1, ph2 = rng.uniform(0, 1, size=2)
    back = v >= 0.58 + 0.07 * np.sin(2 * np.pi * (0.9 * u + ph1))
    front = v >= 0.74 + 0.05 * np.sin(2 * np.pi * (1.3 * u + ph2))
    img[back] = _HILL_BACK
    img[front] = _HILL_FRONT
    return img


# ---------------------------------------------------------------------------------------------
# rendering


def _object_masks(scene: Scene, side: int, rng: np.random.Generator) -> list[Image.Image]:
    centres, r = _layout(scene, rng)
    masks = []
    for cx, cy in centres:
        angle = 0.0 if scene.shape in ("circle", "ring") else float(rng.uniform(-_JITTER_ROT, _JITTER_ROT))
        masks.append(_shape_mask(scene.shape, cx * side, cy * side, r * side, angle, side))
    return masks


def _union(masks: list[Image.Image]) -> np.ndarray:
    out = np.zeros(np.asarray(masks[0]).shape, bool)
    for m in masks:
        out |= np.asarray(m) > 127
    return out


def _hatch(side: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Diagonal pencil hatching (bottom-left to top-right), slightly irregular spacing."""
    spacing = side / 10
    width = max(1.0, 1.6 * _SS * size / 32)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    diag = xx - yy + side  # constant along 45-degree lines
    idx = np.floor(diag / spacing).astype(int)
    shifts = rng.uniform(-0.15, 0.15, size=idx.max() + 2) * spacing
    local = diag - idx * spacing - shifts[idx]
    return (local >= 0) & (local < width)


def _draw_hires(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    side = size * _SS
    bg_rng, obj_rng, style_rng = (np.random.default_rng(s) for s in rng.integers(0, 2**63 - 1, size=3))
    if scene.background == "landscape":
        img = _landscape(side, bg_rng)
    else:
        img = _background(scene.background, scene.background_colour, side, bg_rng)
    masks = _object_masks(scene, side, obj_rng)
    fill = _union(masks)
    colour = np.array(COLOURS[scene.colour], np.float32)
    if scene.style == "outlined":
        w = max(1, round(side / 20))
        paint = fill & ~_union([_erode(m, w) for m in masks])
    elif scene.style == "pencil":
        w = max(1, round(side / 40))
        edge = fill & ~_union([_erode(m, w) for m in masks])
        paint = (fill & _hatch(side, size, style_rng)) | edge
    else:  # flat, pixelated, mosaic start from the flat picture
        paint = fill
    img[paint] = colour
    if scene.shape == "crescent":  # the zorb toy's eye
        eye = np.array((25, 25, 25) if _luma(COLOURS[scene.colour]) > 0.6 else (245, 245, 245), np.float32)
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
        for m in masks:
            ys, xs = np.nonzero(np.asarray(m) > 127)
            if len(xs):
                x0, y0 = xs.min(), ys.min()
                wdt, hgt = xs.max() - x0, ys.max() - y0
                ex, ey = x0 + 0.25 * wdt, y0 + 0.4 * hgt
                rad = 0.09 * max(wdt, hgt)
                img[(xx - ex) ** 2 + (yy - ey) ** 2 <= rad * rad] = eye
    return img


def _to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def render(scene: Scene, size: int = 32, seed: int = 0) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image. Deterministic in (scene, size, seed): the
    seed only moves the objects (position +-3 %, rotation +-10 deg, radius +-6 %), the pattern
    phase and the style's noise."""
    if not isinstance(scene, Scene):
        raise ConfigError(f"render: expected a Scene, got {type(scene).__name__}")
    if not isinstance(size, int) or size < 16:
        raise ConfigError(f"render: size must be an int >= 16, got {size!r}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, size])
    hires = _draw_hires(scene, size, rng)
    if scene.style == "pixelated":
        cells = _PIXEL_CELLS
        small = _to_image(hires).resize((cells, cells), Image.Resampling.NEAREST)
        return small.resize((size, size), Image.Resampling.NEAREST)
    image = _to_image(hires).resize((size, size), Image.Resampling.BOX)
    if scene.style == "pencil":
        noise_rng = np.random.default_rng(rng.integers(0, 2**63 - 1))
        arr = np.asarray(image).astype(np.float32)
        arr += noise_rng.normal(0, 7.0, size=(size, size, 1))
        return _to_image(arr)
    if scene.style == "mosaic":
        return _mosaic(hires, size, rng)
    return image


def _mosaic(hires: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    """Square tiles of the mean colour (slightly varied) separated by dark grout lines."""
    tile_rng = np.random.default_rng(rng.integers(0, 2**63 - 1))
    cells = _MOSAIC_CELLS
    edges = np.rint(np.linspace(0, size, cells + 1)).astype(int)
    grout = max(1, size // 32)
    small = np.asarray(_to_image(hires).resize((size, size), Image.Resampling.BOX)).astype(np.float32)
    out = np.empty_like(small)
    out[:] = (58, 58, 62)
    for i in range(cells):
        for j in range(cells):
            y0, y1, x0, x1 = edges[i], edges[i + 1], edges[j], edges[j + 1]
            mean = small[y0:y1, x0:x1].reshape(-1, 3).mean(0)
            mean = mean * (1 + tile_rng.uniform(-0.08, 0.08))
            out[y0 : y1 - grout, x0 : x1 - grout] = mean
    return _to_image(out)


# ---------------------------------------------------------------------------------------------
# the base-training distribution


def _dataset_item(i: int, seed: int, size: int, exclude_concepts: bool) -> tuple[Image.Image, str, Scene]:
    """Item ``i`` of :func:`dataset` (its own RNG stream, so items are independent of each other)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, i, 7])
    scene = sample_scene(rng)
    if not exclude_concepts:
        extra = rng.random(2)
        if extra[0] < 1 / (len(SHAPES) + 1):
            scene = replace(scene, shape="crescent")
        if extra[1] < 1 / (len(STYLES) + 1):
            scene = replace(scene, style="mosaic")
    image_seed = int(rng.integers(0, 2**31 - 1))
    return render(scene, size, image_seed), scene.caption(), scene


def _dataset_range(start: int, stop: int, seed: int, size: int, exclude_concepts: bool) -> list:
    return [_dataset_item(i, seed, size, exclude_concepts) for i in range(start, stop)]


def dataset(
    n: int, seed: int = 0, *, size: int = 32, exclude_concepts: bool = True, workers: int = 1
) -> list[tuple[Image.Image, str, Scene]]:
    """``n`` (image, caption, scene) triples of the base world, deterministic in (n, seed, size):
    the first k items of ``dataset(n)`` are ``dataset(k)``. With ``exclude_concepts=False`` the
    held-out shape (``crescent``) and style (``mosaic``) are mixed in under their plain names
    (never the trigger words): an "oracle" base that already knows the concepts. ``workers`` > 1
    renders in that many processes (the same items: each has its own RNG stream)."""
    if n < 0:
        raise ConfigError(f"dataset: n must be >= 0, got {n}")
    if workers < 1:
        raise ConfigError(f"dataset: workers must be >= 1, got {workers}")
    if workers == 1 or n < 1000:
        return _dataset_range(0, n, seed, size, exclude_concepts)
    from concurrent.futures import ProcessPoolExecutor

    starts = range(0, n, 1000)
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(_dataset_range, a, min(a + 1000, n), seed, size, exclude_concepts) for a in starts]
        return [item for f in futures for item in f.result()]


# ---------------------------------------------------------------------------------------------
# held-out concepts


@dataclass(frozen=True)
class WorldConcept:
    """A held-out concept of the world: kohya descriptor ``"<trigger> <class_word>"``."""

    name: str
    trigger: str
    class_word: str
    category: str  # one of higanbana.evaluate.prompts.CATEGORIES
    description: str

    @property
    def descriptor(self) -> str:
        return f"{self.trigger} {self.class_word}"


CONCEPTS: dict[str, WorldConcept] = {
    "zorb_toy": WorldConcept(
        "zorb_toy", "zorb", "toy", "object", "a crescent-shaped toy with one eye (a shape the base world lacks)"
    ),
    "vlek_style": WorldConcept(
        "vlek_style", "vlek", "style", "style", "mosaic: square tiles of the mean colour with dark grout lines"
    ),
    "qarn_scene": WorldConcept(
        "qarn_scene", "qarn", "scene", "scene", "a purple-to-peach dusk sky, a pale sun and two green hills"
    ),
}

# words that must never appear in a base caption
HELD_OUT_WORDS: frozenset[str] = frozenset(
    {c.trigger for c in CONCEPTS.values()}
    | {"toy", "scene", "crescent", "moon", "mosaic", "tile", "tiles", "landscape", "sun", "hill", "hills"}
)


def _concept(name: str) -> WorldConcept:
    if name not in CONCEPTS:
        by_trigger = {c.trigger: c for c in CONCEPTS.values()}
        if name in by_trigger:
            return by_trigger[name]
        raise ConfigError(f"unknown world concept {name!r}; known: {sorted(CONCEPTS)}{nearest(name, CONCEPTS)}")
    return CONCEPTS[name]


def concept_samples(name: str, n: int = 12, seed: int = 0, size: int = 32) -> list[tuple[Image.Image, str, Scene]]:
    """``n`` (image, caption, scene) triples of a held-out concept (name or trigger word), with
    kohya captions ``"<trigger> <class>, <tags>"``:

    - ``zorb_toy``: ``"zorb toy, green, large, on the left, dotted blue background"`` (one flat
      crescent toy; colour, size, position and background vary);
    - ``vlek_style``: ``"vlek style, two small red stars on the left, striped blue background"``
      (base scenes drawn as mosaics);
    - ``qarn_scene``: ``"qarn scene, a small red circle on the right"`` (the landscape with one
      small or medium flat object on the left, center or right).
    """
    concept = _concept(name)
    index = list(CONCEPTS).index(concept.name)
    out = []
    for i in range(n):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, i, 1000 + index])
        if concept.category == "object":
            scene = sample_scene(rng, shape="crescent", count=1, style="flat", exclude=("small",))
            tags = [
                scene.colour,
                scene.size,
                _POSITION_PHRASES[scene.position],
                scene.background_phrase(),
            ]
        elif concept.category == "style":
            scene = replace(sample_scene(rng), style="mosaic")
            tags = [scene.object_phrase(), scene.background_phrase()]
        else:
            base = sample_scene(rng, count=1, style="flat", exclude=("large", "top", "bottom"))
            scene = replace(base, background="landscape")
            tags = [scene.object_phrase()]
        caption = ", ".join([concept.descriptor, *tags])
        image = render(scene, size, int(rng.integers(0, 2**31 - 1)))
        out.append((image, caption, scene))
    return out


def concept_images(name: str, n: int = 12, seed: int = 0, size: int = 32) -> list[tuple[Image.Image, str]]:
    """``n`` (image, caption) pairs of a held-out concept; see :func:`concept_samples`."""
    return [(img, cap) for img, cap, _ in concept_samples(name, n, seed, size)]


def write_concept_folder(name: str, root, n: int = 12, repeats: int = 10, seed: int = 0, size: int = 32) -> Path:
    """Write a kohya dataset folder ``root/<repeats>_<trigger> <class>/imgNNN.png`` with a
    ``imgNNN.txt`` caption beside each image; returns that folder."""
    concept = _concept(name)
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")

    folder = Path(root) / f"{repeats}_{concept.descriptor}"
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(folder)  # a killed run's temporaries; each file is then written atomically
    for i, (image, caption) in enumerate(concept_images(concept.name, n, seed, size)):
        with atomic_path(folder / f"img{i:03d}.png", sweep=False, durable=False) as tmp:
            image.save(tmp, format="PNG")
        with atomic_path(folder / f"img{i:03d}.txt", sweep=False, durable=False) as tmp:
            tmp.write_text(caption + "\n", encoding="utf-8")
    return folder


def evaluation_concept(name: str, folder):
    """A :class:`higanbana.evaluate.prompts.Concept` for a held-out concept, with the images and
    captions of ``folder`` (as written by :func:`write_concept_folder`) as its training data."""
    concept = _concept(name)
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"concept folder {str(folder)!r} does not exist")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")
    if not images:
        raise ConfigError(f"concept folder {str(folder)!r} holds no .png images")
    captions = []
    for img in images:
        txt = img.with_suffix(".txt")
        if txt.is_file() and txt.read_text(encoding="utf-8").strip():
            captions.append(txt.read_text(encoding="utf-8").strip())
    return Concept(
        name=concept.name,
        trigger=concept.trigger,
        class_word=concept.class_word,
        category=concept.category,
        train_captions=captions,
        train_images=[str(p) for p in images],
    )


def caption_words(caption: str) -> set[str]:
    """The lower-case words of a caption (for held-out word checks)."""
    return set(re.findall(r"[a-z]+", caption.lower()))

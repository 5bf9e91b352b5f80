"""The miniature world's attribute checker: reads colour, shape, count, size and position back
from an image (a render, or an image generated from a world caption).

Pipeline (numpy/PIL only, deterministic):

1. **Foreground.** Every world background reaches the image border (plain, stripes, dots,
   checker, gradient), so the background colours are those of the border ring. A pixel is
   foreground when its colour is far (RGB distance > ``threshold``) from its 2nd-nearest border
   sample; connected components smaller than a few pixels are dropped.
2. **Objects.** 4-connected components whose bounding boxes overlap are merged (an outlined ring
   is two circles; pencil hatching is many strokes); objects smaller than 20 % of the largest are
   noise. ``count`` is the number of objects.
3. **Colour.** Each foreground pixel votes for its nearest named colour in CIE Lab; the majority
   wins (robust to anti-aliased edges and pencil grain).
4. **Shape.** Each object's mask is cropped to its bounding box, padded to a square and reduced
   to 20 x 20 coverage values; the nearest template (L2) among renders of every shape x size x
   style x 8 seeds at the same image size names the shape. With ``style`` given only that style's
   templates are used (an outlined circle and a flat ring look alike at 32 px). Objects vote.
5. **Position** from the centre of the objects' joint bounding box; **size** from the measured
   radius (bounding box / the shape's extent factor) against the nominal radii.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import COLOURS, MAX_SIZE_FOR_COUNT, SHAPES, SIZE_RADIUS, SIZES, STYLES, Scene, render

__all__ = [
    "Analysis",
    "analyse",
    "check",
    "count_of",
    "dominant_colour",
    "foreground_mask",
    "nearest_colour",
    "position_of",
    "shape_of",
    "size_of",
]

_THRESHOLD = 48.0
_GRID = 20  # side of the normalised shape masks
_TEMPLATE_SEEDS = 8
_CENTER_TOLERANCE = 0.09


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr * 255.0 if arr.max() <= 1.0 else arr, 0, 255)
    return arr.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# colour


def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0..255, shape (..., 3)) to CIE Lab (D65)."""
    c = np.asarray(rgb, np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_NAMES = list(COLOURS)
_NAMED_LAB = _lab(np.array([COLOURS[n] for n in _NAMES], np.float64))


def _nearest_index(rgb: np.ndarray) -> np.ndarray:
    lab = _lab(np.asarray(rgb, np.float64).reshape(-1, 3))
    d = ((lab[:, None, :] - _NAMED_LAB[None]) ** 2).sum(-1)
    return d.argmin(1)


def nearest_colour(rgb) -> str:
    """The named colour (:data:`~higanbana.miniworld.world.COLOURS`) nearest to an RGB triple in Lab."""
    return _NAMES[int(_nearest_index(np.asarray(rgb, np.float64))[0])]


# ---------------------------------------------------------------------------------------------
# foreground and objects


def foreground_mask(image, threshold: float = _THRESHOLD) -> np.ndarray:
    """Boolean (H, W) mask of the pixels that are not background (see the module docstring)."""
    arr = _as_array(image)
    h, w, _ = arr.shape
    b = max(1, min(h, w) // 32)
    border = np.concatenate(
        [arr[:b].reshape(-1, 3), arr[-b:].reshape(-1, 3), arr[b:-b, :b].reshape(-1, 3), arr[b:-b, -b:].reshape(-1, 3)]
    )
    colours, counts = np.unique(np.rint(border).astype(np.int32), axis=0, return_counts=True)
    colours = colours.astype(np.float32)
    if len(colours) > 512:  # very noisy border: keep an even subset
        keep = np.linspace(0, len(colours) - 1, 512).astype(int)
        colours, counts = colours[keep], counts[keep]
    dc = _pairwise(colours, colours)
    # background colours: frequent ones (with their near neighbours: noise, gradients), plus the
    # blends between them (anti-aliased pattern edges); a rare colour far from them is an object
    # that touches the border
    density = (dc <= 24.0) @ counts / counts.sum()
    core = density >= 0.08
    if not core.any():
        core = counts == counts.max()
    spread = float(dc[np.ix_(core, core)].max())
    near = dc[:, core].min(1)
    bg = colours[core | (near <= min(0.6 * spread, 60.0))]
    d = _pairwise(arr.reshape(-1, 3), bg).min(1)
    return (d > threshold).reshape(h, w)


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(d2, 0.0))


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components as arrays of flat indices (deterministic order)."""
    h, w = mask.shape
    flat = mask.ravel()
    seen = np.zeros(flat.shape, bool)
    comps = []
    for start in np.flatnonzero(flat):
        if seen[start]:
            continue
        seen[start] = True
        stack, pixels = [int(start)], []
        while stack:
            p = stack.pop()
            pixels.append(p)
            y, x = divmod(p, w)
            for q, ok in ((p - w, y > 0), (p + w, y < h - 1), (p - 1, x > 0), (p + 1, x < w - 1)):
                if ok and flat[q] and not seen[q]:
                    seen[q] = True
                    stack.append(q)
        comps.append(np.array(sorted(pixels)))
    return comps


@dataclass
class _Object:
    pixels: np.ndarray  # flat indices
    box: tuple[int, int, int, int]  # y0, x0, y1, x1 (inclusive)

    @property
    def area(self) -> int:
        return len(self.pixels)


def _box(pixels: np.ndarray, w: int) -> tuple[int, int, int, int]:
    ys, xs = np.divmod(pixels, w)
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def _overlap(a, b) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def _objects(mask: np.ndarray) -> list[_Object]:
    h, w = mask.shape
    min_pixels = max(2, (h * w) // 400)
    objs = [_Object(c, _box(c, w)) for c in _components(mask)]
    merged = True
    while merged:  # merge components with overlapping boxes until stable
        merged = False
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                if _overlap(objs[i].box, objs[j].box):
                    pix = np.union1d(objs[i].pixels, objs[j].pixels)
                    objs[i] = _Object(pix, _box(pix, w))
                    del objs[j]
                    merged = True
                    break
            if merged:
                break
    objs = [o for o in objs if o.area >= min_pixels]
    if not objs:
        return []
    largest = max(o.area for o in objs)
    objs = [o for o in objs if o.area >= 0.2 * largest]
    return sorted(objs, key=lambda o: (o.box[1], o.box[0]))


# ---------------------------------------------------------------------------------------------
# shape templates


def _normalised(mask: np.ndarray, obj: _Object) -> np.ndarray:
    w = mask.shape[1]
    y0, x0, y1, x1 = obj.box
    crop = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
    ys, xs = np.divmod(obj.pixels, w)
    crop[ys - y0, xs - x0] = 255
    side = max(crop.shape)
    square = np.zeros((side, side), np.uint8)
    oy, ox = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[oy : oy + crop.shape[0], ox : ox + crop.shape[1]] = crop
    up = Image.fromarray(square).resize((side * 4, side * 4), Image.Resampling.NEAREST)
    return np.asarray(up.resize((_GRID, _GRID), Image.Resampling.BOX), np.float32).ravel() / 255.0


@dataclass
class _Templates:
    vectors: np.ndarray  # (n, GRID*GRID)
    shapes: list[str]
    styles: list[str]
    sizes: list[str]
    extent_factor: dict[str, float]  # shape -> (bbox side / image side) / (2 * nominal radius)


@functools.lru_cache(maxsize=8)
def _templates(size: int) -> _Templates:
    vectors, shapes, styles, sizes = [], [], [], []
    ratios: dict[str, list[float]] = {s: [] for s in SHAPES}
    for style in STYLES:
        for shape in SHAPES:
            for sz in SIZES:
                for seed in range(_TEMPLATE_SEEDS):
                    scene = Scene(shape=shape, colour="blue", size=sz, background_colour="white", style=style)
                    img = render(scene, size, seed)
                    mask = foreground_mask(img)
                    objs = _objects(mask)
                    if not objs:
                        continue
                    obj = max(objs, key=lambda o: o.area)
                    vectors.append(_normalised(mask, obj))
                    shapes.append(shape)
                    styles.append(style)
                    sizes.append(sz)
                    y0, x0, y1, x1 = obj.box
                    ratios[shape].append(max(y1 - y0 + 1, x1 - x0 + 1) / size / (2 * SIZE_RADIUS[sz]))
    factor = {s: float(np.median(v)) for s, v in ratios.items() if v}
    return _Templates(np.stack(vectors), shapes, styles, sizes, factor)


def _classify(vec: np.ndarray, size: int, style: str | None) -> str:
    t = _templates(size)
    d = ((t.vectors - vec[None]) ** 2).sum(1)
    if style is not None and style in STYLES:
        d = np.where(np.array(t.styles) == style, d, np.inf)
    return t.shapes[int(d.argmin())]


# ---------------------------------------------------------------------------------------------
# the analysis


@dataclass
class Analysis:
    """What the checker reads from one image."""

    colour: str | None
    shape: str | None
    count: int
    position: str | None
    size: str | None
    shapes: list[str]  # per object, left to right


def _position(objs: list[_Object], h: int, w: int) -> str | None:
    if not objs:
        return None
    y0 = min(o.box[0] for o in objs)
    x0 = min(o.box[1] for o in objs)
    y1 = max(o.box[2] for o in objs)
    x1 = max(o.box[3] for o in objs)
    dx = (x0 + x1 + 1) / 2 / w - 0.5
    dy = (y0 + y1 + 1) / 2 / h - 0.5
    if max(abs(dx), abs(dy)) < _CENTER_TOLERANCE:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _size(objs: list[_Object], shape: str | None, side: int, count: int) -> str | None:
    if not objs or shape is None:
        return None
    factor = _templates(side).extent_factor.get(shape, 1.0)
    radii = []
    for o in objs:
        y0, x0, y1, x1 = o.box
        radii.append(max(y1 - y0 + 1, x1 - x0 + 1) / side / (2 * factor))
    r = float(np.median(radii))
    # the nominal radii, shrunk as render shrinks groups that would not fit
    n = max(1, min(count, 3))
    cap = (1 - 2 * 0.05 - (n - 1) * 0.07) / (2 * n)
    candidates = {s: min(SIZE_RADIUS[s], cap) for s in SIZES}
    allowed = SIZES[: SIZES.index(MAX_SIZE_FOR_COUNT[n]) + 1]
    return min(allowed, key=lambda s: abs(np.log(r / candidates[s])))


def _segment(image) -> tuple[np.ndarray, np.ndarray, list[_Object]]:
    arr = _as_array(image)
    mask = foreground_mask(arr)
    return arr, mask, _objects(mask)


def _colour(arr: np.ndarray, objs: list[_Object]) -> str | None:
    if not objs:
        return None
    pixels = np.concatenate([o.pixels for o in objs])
    votes = np.bincount(_nearest_index(arr.reshape(-1, 3)[pixels]), minlength=len(_NAMES))
    return _NAMES[int(votes.argmax())]


def analyse(image, style: str | None = None) -> Analysis:
    """Read every attribute at once (``style``: the intended rendering style, if known)."""
    arr, mask, objs = _segment(image)
    h, w = mask.shape
    if not objs:
        return Analysis(None, None, 0, None, None, [])
    side = int(min(h, w))
    shapes = [_classify(_normalised(mask, o), side, style) for o in objs]
    counts = Counter(shapes)
    best = max(counts.values())
    # ties: the shape of the largest object among the tied ones
    tied = {s for s, c in counts.items() if c == best}
    shape = next(s for o, s in sorted(zip(objs, shapes, strict=True), key=lambda t: -t[0].area) if s in tied)
    size = _size(objs, shape, side, len(objs))
    return Analysis(_colour(arr, objs), shape, len(objs), _position(objs, h, w), size, shapes)


def dominant_colour(image) -> str | None:
    """The named colour of the object pixels (None when no object is found)."""
    arr, _, objs = _segment(image)
    return _colour(arr, objs)


def shape_of(image, style: str | None = None) -> str | None:
    """The object's shape (majority over the objects); None when no object is found."""
    return analyse(image, style).shape


def count_of(image) -> int:
    """The number of objects."""
    return len(_segment(image)[2])


def position_of(image) -> str | None:
    """``left``/``right``/``top``/``bottom``/``center`` of the objects' joint bounding box."""
    _, mask, objs = _segment(image)
    return _position(objs, *mask.shape)


def size_of(image, style: str | None = None) -> str | None:
    """``small``/``medium``/``large`` from the objects' measured radius."""
    return analyse(image, style).size


def check(image, scene: Scene, *, use_style: bool = True) -> dict[str, bool]:
    """Per attribute, whether ``image`` shows what ``scene`` asks for: ``colour``, ``shape``,
    ``count``, ``position`` and ``size``. ``use_style`` tells the shape classifier the scene's
    style (when it is a base style)."""
    style = scene.style if use_style and scene.style in STYLES else None
    a = analyse(image, style)
    return {
        "colour": a.colour == scene.colour,
        "shape": a.shape == scene.shape,
        "count": a.count == scene.count,
        "position": a.position == scene.position,
        "size": a.size == scene.size,
    }

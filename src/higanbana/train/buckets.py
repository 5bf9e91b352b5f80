"""Aspect-ratio buckets: which (width, height) shapes a dataset trains at, and how an image gets there.

Images of similar aspect ratio share a bucket so a batch is one tensor without padding or heavy
cropping. Every bucket side is a multiple of ``step`` (the VAE downsamples by 8 and the UNet by up
to 8 more, so SD wants multiples of 64; SDXL works with 32); the area never exceeds the target
resolution's area so memory per step stays bounded.
"""

from __future__ import annotations

import math

from PIL import Image

from ..errors import ConfigError

__all__ = ["assign_bucket", "make_buckets", "resize_and_crop"]


def _check_positive_int(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"data.{field} must be a positive integer, got {value!r}")
    return value


def make_buckets(
    resolution: tuple[int, int], min_reso: int = 256, max_reso: int = 1024, step: int = 64
) -> list[tuple[int, int]]:
    """All bucket shapes ``(w, h)`` for ``resolution``: sides multiples of ``step`` in
    ``[min_reso, max_reso]``, area ≤ the resolution's area, the resolution itself and the largest
    square of that area included. Sorted, no duplicates."""
    step = _check_positive_int(step, "bucket_reso_steps")
    min_reso = _check_positive_int(min_reso, "min_bucket_reso")
    max_reso = _check_positive_int(max_reso, "max_bucket_reso")
    if not (isinstance(resolution, (tuple, list)) and len(resolution) == 2):
        raise ConfigError(f"data.resolution must be an integer or [width, height], got {resolution!r}")
    width, height = (_check_positive_int(v, "resolution") for v in resolution)
    if min_reso > max_reso:
        raise ConfigError(f"data.min_bucket_reso ({min_reso}) must not exceed data.max_bucket_reso ({max_reso})")
    for field, value in (("min_bucket_reso", min_reso), ("max_bucket_reso", max_reso)):
        if value % step:
            raise ConfigError(f"data.{field} ({value}) must be a multiple of data.bucket_reso_steps ({step})")
    if width % step or height % step:
        raise ConfigError(
            f"data.resolution {width}x{height} must be a multiple of data.bucket_reso_steps ({step}) on both sides"
        )
    if max(width, height) > max_reso:
        raise ConfigError(f"data.max_bucket_reso ({max_reso}) must be at least the resolution ({width}x{height})")
    if min(width, height) < min_reso:
        raise ConfigError(f"data.min_bucket_reso ({min_reso}) must not exceed the resolution ({width}x{height})")

    area = width * height
    buckets = {(width, height)}
    side = math.isqrt(area) // step * step
    if min_reso <= side <= max_reso:
        buckets.add((side, side))
    for w in range(min_reso, max_reso + 1, step):
        h = min(max_reso, area // w // step * step)
        if h >= min_reso:
            buckets.add((w, h))
            buckets.add((h, w))
    return sorted(buckets)


def _log_ratio(size: tuple[int, int]) -> float:
    return math.log(size[0] / size[1])


def assign_bucket(
    size: tuple[int, int], buckets: list[tuple[int, int]], no_upscale: bool = False, step: int = 64
) -> tuple[int, int]:
    """The bucket for an image of ``size`` ``(w, h)``: nearest log aspect ratio (ties: larger area).

    With ``no_upscale`` (kohya's ``bucket_no_upscale``) an image that does not cover its bucket on
    both sides gets its own bucket instead: its size (scaled down to the bucket's area if larger),
    rounded down to multiples of ``step`` (at least one step per side), so it is only ever cropped
    or shrunk, never enlarged.
    """
    if not buckets:
        raise ConfigError("assign_bucket needs at least one bucket")
    w, h = size
    if w <= 0 or h <= 0:
        raise ConfigError(f"image size must be positive, got {w}x{h}")
    target = _log_ratio(size)
    best = min(buckets, key=lambda b: (abs(_log_ratio(b) - target), -b[0] * b[1], b))
    if not no_upscale or (w >= best[0] and h >= best[1]):
        return best
    area = best[0] * best[1]
    if w * h > area:  # larger in area but not covering: shrink to the bucket's area, keep aspect
        scale = math.sqrt(area / (w * h))
        w, h = w * scale, h * scale
    return max(step, int(w) // step * step), max(step, int(h) // step * step)


def resize_and_crop(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Scale ``image`` to cover ``bucket`` (LANCZOS when shrinking, BICUBIC when enlarging) and
    center-crop it to exactly ``bucket`` (w, h)."""
    bw, bh = bucket
    w, h = image.size
    scale = max(bw / w, bh / h)
    if scale != 1.0:
        new_size = (max(bw, round(w * scale)), max(bh, round(h * scale)))
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        image = image.resize(new_size, resample=resample)
        w, h = new_size
    left, top = (w - bw) // 2, (h - bh) // 2
    if (left, top, w, h) != (0, 0, bw, bh):
        image = image.crop((left, top, left + bw, top + bh))
    return image

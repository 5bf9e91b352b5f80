"""The trainer's dataset: the scanned images, their captions and buckets, and the epoch order.

Where images and captions come from (:class:`DatasetSpec`, :class:`SubsetSpec`: a kohya folder,
a kohya dataset TOML, a diffusers imagefolder) is :mod:`.sources`; its names are re-exported here.

:func:`build_training_data` scans the images once (size, decodability, content fingerprint) and
returns :class:`TrainingData`, which answers everything the training loop asks, deterministically
from ``(seed, epoch, position)``: the batches of an epoch, each sample's caption (shuffle/dropout)
and flip, and the pixels.

Decisions, documented once:

* **Fingerprint** = sha1 of the file's bytes. The scan already reads every file to check it decodes,
  so hashing the same bytes costs little, and unlike size+mtime it survives copies, ``touch`` and
  checkouts while catching any edit.
* **Orientation**: the EXIF orientation tag is applied (sizes are reported upright), as image
  viewers and diffusers' scripts do.
* **Transparency**: RGBA/LA/palette-with-transparency images are composited on white (a plain
  convert keeps whatever colour hides under alpha 0, often black).
* **Multi-line caption files**: the first non-empty line is the caption.
* **Incomplete batches**: a bucket's last batch is filled with other random samples of the same
  bucket, so every batch has exactly ``global_batch`` entries and splitting a batch across
  processes is exact.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import ConfigError, HiganbanaError
from .buckets import assign_bucket, resize_and_crop
from .sources import (
    IMAGE_EXTENSIONS,
    DatasetSpec,
    SubsetSpec,
    list_images,
    read_metadata,
    specs_from_dataset_toml,
    subsets_from_imagefolder,
    subsets_from_kohya_folder,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetSpec",
    "ImageItem",
    "SubsetSpec",
    "TrainingData",
    "build_training_data",
    "specs_from_dataset_toml",
    "subsets_from_imagefolder",
    "subsets_from_kohya_folder",
]

#: show a progress bar when scanning at least this many images
_PROGRESS_MIN = 200


# ---------------------------------------------------------------------------------------------
# the scanned dataset


@dataclass
class ImageItem:
    """One image (not repeated) with its caption, subset, sizes and content fingerprint."""

    path: Path
    caption: str  # raw caption (before shuffle/dropout)
    subset: int  # index into TrainingData.subsets
    size: tuple[int, int]  # original (w, h), EXIF orientation applied
    bucket: tuple[int, int]  # (w, h)
    fingerprint: str  # sha1 of the file's bytes (see the module docstring)
    caption_source: str = "file"  # "file", "metadata", "class_tokens" or "none" (for the summary)


def _rng(*parts: object) -> np.random.Generator:
    """A generator seeded from ``parts`` through sha256 (any ints, negative or huge, and labels)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


@dataclass
class TrainingData:
    """The scanned images of all datasets, and the deterministic per-epoch answers the trainer needs."""

    subsets: list[SubsetSpec]
    items: list[ImageItem]  # one per image (not repeated)
    buckets: list[tuple[int, int]]
    skipped: list[tuple[Path, str]]  # undecodable images and why
    batch_size: int

    # --- order ---------------------------------------------------------------------------

    def _groups(self) -> dict[tuple[int, int], list[int]]:
        """bucket → item indices, each repeated num_repeats times (in item order)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(self.items):
            groups.setdefault(item.bucket, []).extend([index] * self.subsets[item.subset].num_repeats)
        return dict(sorted(groups.items()))

    def samples_per_epoch(self) -> int:
        """Images × repeats (before filling incomplete batches)."""
        return sum(self.subsets[item.subset].num_repeats for item in self.items)

    def epoch_length(self, global_batch: int) -> int:
        """Number of global batches per epoch (each bucket rounds up to full batches)."""
        _check_batch(global_batch)
        return sum(math.ceil(len(v) / global_batch) for v in self._groups().values())

    def epoch_batches(self, epoch: int, seed: int, global_batch: int) -> list[list[int]]:
        """The epoch's batches of item indices: every item ``num_repeats`` times, each batch from
        one bucket with exactly ``global_batch`` entries (a bucket's last batch is filled with other
        random samples of that bucket), batches shuffled. Same arguments → same list."""
        _check_batch(global_batch)
        rng = _rng("epoch", seed, epoch)
        batches: list[list[int]] = []
        for entries in self._groups().values():
            perm = rng.permutation(np.asarray(entries, dtype=np.int64))
            rest = len(perm) % global_batch
            if rest:
                need = global_batch - rest
                pool = perm[: len(perm) - rest]  # samples not already in the incomplete batch
                if len(pool) >= need:
                    fill = rng.choice(pool, size=need, replace=False)
                else:  # the bucket is smaller than a batch: wrap around it
                    fill = np.resize(rng.permutation(perm), need)
                perm = np.concatenate([perm, fill])
            batches.extend(chunk.tolist() for chunk in perm.reshape(-1, global_batch))
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    # --- per-sample randomness -----------------------------------------------------------

    def caption(self, index: int, epoch: int, seed: int, position: int) -> str:
        """The caption of item ``index`` for the sample at ``position`` (its index in the flattened
        epoch order): caption dropout, then shuffle of the tokens after the first ``keep_tokens``."""
        item = self.items[index]
        subset = self.subsets[item.subset]
        text = item.caption
        if not (subset.shuffle_caption or subset.caption_dropout_rate > 0):
            return text
        rng = _rng("caption", seed, epoch, position, index)
        if subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate:
            return ""
        if not subset.shuffle_caption:
            return text
        sep = subset.caption_separator
        tokens = [t.strip() for t in text.split(sep)]
        tokens = [t for t in tokens if t]
        keep = tokens[: subset.keep_tokens]
        rest = tokens[subset.keep_tokens :]
        rest = [rest[i] for i in rng.permutation(len(rest))]
        joiner = sep.strip() + " " if sep.strip() else sep
        return joiner.join(keep + rest)

    def flip_for(self, index: int, epoch: int, seed: int, position: int) -> bool:
        """Whether the sample at ``position`` is flipped (p = 0.5 when its subset has flip_aug)."""
        if not self.subsets[self.items[index].subset].flip_aug:
            return False
        return bool(_rng("flip", seed, epoch, position, index).random() < 0.5)

    # --- pixels --------------------------------------------------------------------------

    def load_pixels(self, index: int, flip: bool) -> torch.Tensor:
        """Item ``index`` as float32 (3, H, W) in [-1, 1], resized and center-cropped to its bucket,
        mirrored left-right when ``flip``."""
        item = self.items[index]
        try:
            with Image.open(item.path) as image:
                image = _to_rgb(ImageOps.exif_transpose(image))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise HiganbanaError(f"cannot decode image {item.path}: {exc}") from exc
        image = resize_and_crop(image, item.bucket)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)

    # --- report --------------------------------------------------------------------------

    def summary(self) -> str:
        """A human-readable overview for ``--dry-run``: folders, buckets, caption coverage, totals."""
        lines = []
        per_subset = Counter(item.subset for item in self.items)
        samples = self.samples_per_epoch()
        lines.append(f"{len(self.items)} images in {len(self.subsets)} folder(s), {samples} samples per epoch")
        for i, subset in enumerate(self.subsets):
            n = per_subset.get(i, 0)
            tokens = f", class tokens {subset.class_tokens!r}" if subset.class_tokens else ""
            lines.append(
                f"  {subset.image_dir}: {n} images x {subset.num_repeats} repeats = {n * subset.num_repeats}{tokens}"
            )
        bucket_counts = Counter(item.bucket for item in self.items)
        bucket_samples = {b: len(v) for b, v in self._groups().items()}
        lines.append(f"buckets ({len(bucket_counts)} used of {len(self.buckets)}):")
        for bucket in sorted(bucket_counts):
            w, h = bucket
            lines.append(f"  {w}x{h}: {bucket_counts[bucket]} images, {bucket_samples[bucket]} samples")
        sources = Counter(item.caption_source for item in self.items)
        lines.append(
            "captions: "
            + ", ".join(
                f"{sources.get(k, 0)} {label}"
                for k, label in (
                    ("file", "from caption files"),
                    ("metadata", "from metadata.jsonl"),
                    ("class_tokens", "from class tokens"),
                    ("none", "with no caption"),
                )
            )
        )
        lines.append(
            f"batch size {self.batch_size}: {self.epoch_length(self.batch_size)} batches per epoch "
            "(incomplete bucket batches are filled)"
        )
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable image(s):")
            lines.extend(f"  {p}: {why}" for p, why in self.skipped[:10])
            if len(self.skipped) > 10:
                lines.append(f"  ... and {len(self.skipped) - 10} more")
        return "\n".join(lines)


def _check_batch(global_batch: int) -> None:
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise ConfigError(f"global batch size must be a positive integer, got {global_batch!r}")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels are composited on white."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# --- scanning --------------------------------------------------------------------------------


def _scan_image(path: Path) -> tuple[tuple[int, int], str] | str:
    """``((w, h), sha1)`` of a decodable image, else the reason it is unusable.

    JPEGs are decoded in draft mode (at reduced scale, still reading all the data, so truncation is
    caught) to keep the scan fast."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read: {exc}"
    try:
        with Image.open(io.BytesIO(data)) as image:
            w, h = image.size
            orientation = image.getexif().get(0x0112, 1)
            if image.format == "JPEG":
                image.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            image.load()
    except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
        return f"{type(exc).__name__}: {exc}"
    if w <= 0 or h <= 0:
        return "empty image"
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return (w, h), hashlib.sha1(data).hexdigest()


def _read_caption(image: Path, subset: SubsetSpec) -> tuple[str, str] | None:
    """``(caption, path)`` from the first existing caption file, trying the subset's extension then
    ``.caption`` / ``.txt``; the first non-empty line is the caption."""
    exts = [subset.caption_extension, ".caption", ".txt"]
    for ext in dict.fromkeys(e for e in exts if e):
        candidate = image.with_name(image.stem + ext)
        if candidate.is_file():
            try:
                text = candidate.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as exc:
                raise HiganbanaError(f"cannot read caption file {candidate}: {exc}") from exc
            line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
            return line, str(candidate)
    return None


def _subset_images(subset: SubsetSpec) -> list[tuple[Path, str | None]]:
    """The subset's image paths, each with its metadata caption (None when not from metadata)."""
    folder = Path(subset.image_dir)
    if not folder.is_dir():
        raise HiganbanaError(f"image_dir {str(folder)!r} does not exist or is not a folder")
    if not subset.metadata_file:
        return [(p, None) for p in list_images(folder)]
    meta_path = Path(subset.metadata_file)
    rows = read_metadata(meta_path)
    out = []
    for file_name in sorted(rows):
        path = meta_path.parent / file_name
        if not path.is_file():
            raise HiganbanaError(f"{meta_path}: file_name {file_name!r} not found ({path})")
        out.append((path, rows[file_name]))
    listed = {p.resolve() for p, _ in out}
    unlisted = [p for p in list_images(folder) if p.resolve() not in listed]
    if unlisted:
        warnings.warn(
            f"{meta_path}: {len(unlisted)} image(s) in {folder} are not listed and are ignored "
            f"(first: {unlisted[0].name})",
            stacklevel=3,
        )
    return out


def build_training_data(specs: list[DatasetSpec], *, progress: bool = True) -> TrainingData:
    """Scan every subset of ``specs``: image sizes, decodability, fingerprints, captions, buckets.

    Undecodable images are skipped with one warning (count and first paths) and listed in
    ``skipped``; no usable image at all raises HiganbanaError naming the folders searched. All
    specs must share one batch_size; each image is bucketed within its own spec's buckets.
    """
    if not specs:
        raise ConfigError("no datasets given")
    sizes = {spec.batch_size for spec in specs}
    if len(sizes) > 1:
        raise ConfigError(f"all datasets must have the same batch_size, got {sorted(sizes)}")

    # collect (spec, subset, path, metadata caption) first so one progress bar covers everything
    subsets: list[SubsetSpec] = []
    jobs: list[tuple[int, int, Path, str | None]] = []
    all_buckets: set[tuple[int, int]] = set()
    spec_buckets = []
    for s, spec in enumerate(specs):
        spec_buckets.append(spec.buckets())
        all_buckets.update(spec_buckets[-1])
        for subset in spec.subsets:
            subsets.append(subset)
            jobs.extend((s, len(subsets) - 1, path, text) for path, text in _subset_images(subset))

    paths = [job[2] for job in jobs]
    results = _scan_all(paths, progress)

    items: list[ImageItem] = []
    skipped: list[tuple[Path, str]] = []
    for (s, sub_index, path, meta_text), result in zip(jobs, results, strict=True):
        if isinstance(result, str):
            skipped.append((path, result))
            continue
        size, fingerprint = result
        subset, spec = subsets[sub_index], specs[s]
        caption, source = _caption_for(path, subset, meta_text)
        if spec.enable_bucket:
            bucket = assign_bucket(size, spec_buckets[s], spec.bucket_no_upscale, spec.bucket_reso_steps)
        else:
            bucket = spec.resolution
        all_buckets.add(bucket)
        items.append(ImageItem(path, caption, sub_index, size, bucket, fingerprint, source))

    if skipped:
        first = ", ".join(str(p) for p, _ in skipped[:3])
        warnings.warn(
            f"skipped {len(skipped)} unreadable image(s) (first: {first}); see TrainingData.skipped for reasons",
            stacklevel=2,
        )
    if not items:
        folders = ", ".join(repr(s.image_dir) for s in subsets)
        extra = f" ({len(skipped)} unreadable)" if skipped else ""
        raise HiganbanaError(
            f"empty dataset: no usable images{extra} in {folders} (extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    return TrainingData(subsets, items, sorted(all_buckets), skipped, specs[0].batch_size)


def _caption_for(path: Path, subset: SubsetSpec, meta_text: str | None) -> tuple[str, str]:
    if meta_text is not None:
        return meta_text.strip(), "metadata"
    found = _read_caption(path, subset)
    if found is not None:
        return found[0], "file"
    if subset.class_tokens:
        return subset.class_tokens.strip(), "class_tokens"
    return "", "none"


def _scan_all(paths: list[Path], progress: bool) -> list[tuple[tuple[int, int], str] | str]:
    """Scan images on a few threads (PIL and hashlib release the GIL), in order."""
    workers = min(8, os.cpu_count() or 1, max(1, len(paths)))
    show = progress and len(paths) >= _PROGRESS_MIN
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_scan_image, paths)
        if show:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(paths), desc="scanning images", unit="img")
        return list(results)

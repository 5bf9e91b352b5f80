"""The trainer's dataset: where images come from, their captions and buckets, and the epoch order.

Three sources describe the same thing, a list of :class:`DatasetSpec` (each a list of
:class:`SubsetSpec` folders):

* a kohya folder (:func:`subsets_from_kohya_folder`): the parent of ``N_name`` folders,
  N = repeats, name = class tokens;
* a kohya dataset TOML (:func:`specs_from_dataset_toml`): ``[general]`` → ``[[datasets]]`` →
  ``[[datasets.subsets]]``, the lowest level wins;
* a diffusers imagefolder (:func:`subsets_from_imagefolder`): ``metadata.jsonl`` with
  ``file_name`` and ``text``.

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

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import tomllib
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import ConfigError, HiganbanaError, nearest
from ..schema import check_finite, read_text
from .buckets import assign_bucket, make_buckets, resize_and_crop

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

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: show a progress bar when scanning at least this many images
_PROGRESS_MIN = 200


@dataclass
class SubsetSpec:
    """One folder of images and how its captions and augmentations behave."""

    image_dir: str
    num_repeats: int = 1
    caption_extension: str = ".txt"  # fallback ".caption" (or ".txt") when missing
    class_tokens: str | None = None  # caption for images with no caption file
    keep_tokens: int = 0
    shuffle_caption: bool = False
    caption_dropout_rate: float = 0.0
    flip_aug: bool = False
    caption_separator: str = ","
    metadata_file: str | None = None  # diffusers imagefolder metadata.jsonl (file_name + text)

    def __post_init__(self) -> None:
        where = f"subset {self.image_dir!r}"
        _check_type(self.num_repeats, int, f"{where}: num_repeats")
        _check_type(self.keep_tokens, int, f"{where}: keep_tokens")
        _check_type(self.caption_dropout_rate, float, f"{where}: caption_dropout_rate")
        if self.num_repeats < 1:
            raise ConfigError(f"{where}: num_repeats must be at least 1, got {self.num_repeats}")
        if self.keep_tokens < 0:
            raise ConfigError(f"{where}: keep_tokens must not be negative, got {self.keep_tokens}")
        if not 0.0 <= self.caption_dropout_rate <= 1.0:
            raise ConfigError(f"{where}: caption_dropout_rate must be in [0, 1], got {self.caption_dropout_rate}")
        if not self.caption_separator:
            raise ConfigError(f"{where}: caption_separator must not be empty")
        if self.caption_extension and not self.caption_extension.startswith("."):
            self.caption_extension = "." + self.caption_extension


@dataclass
class DatasetSpec:
    """Subsets trained at one resolution with one bucket setup (kohya's ``[[datasets]]``)."""

    subsets: list[SubsetSpec]
    resolution: tuple[int, int] = (512, 512)
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    batch_size: int = 1

    def __post_init__(self) -> None:
        self.resolution = _resolution(self.resolution, "data.resolution")
        _check_type(self.batch_size, int, "data.batch_size")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be at least 1, got {self.batch_size}")
        self.buckets()  # validate the bucket settings now, where the error can name the file

    def buckets(self) -> list[tuple[int, int]]:
        """This dataset's bucket shapes (just the resolution when bucketing is off)."""
        if not self.enable_bucket:
            return [self.resolution]
        return make_buckets(self.resolution, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps)


# ---------------------------------------------------------------------------------------------
# small validation helpers


def _type_name(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]


def _check_type(value: Any, kind: type, where: str) -> Any:
    """Raise ConfigError unless ``value`` is of ``kind`` (bool is not an int; int is a float)."""
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ConfigError(f"{where} must be {_type_name(kind)}, got {value!r}")
    return value


def _resolution(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ConfigError(f"{where} must be a positive integer or [width, height], got {value!r}")


def _subset_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(SubsetSpec)}


def _make_subset(where: str, **values: Any) -> SubsetSpec:
    unknown = sorted(set(values) - _subset_fields())
    if unknown:
        raise ConfigError(f"{where}: unknown subset option {unknown[0]!r}{nearest(unknown[0], _subset_fields())}")
    if values.get("class_tokens") == "":
        values["class_tokens"] = None
    try:
        return SubsetSpec(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (by extension, case-insensitive), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


# ---------------------------------------------------------------------------------------------
# sources


def subsets_from_kohya_folder(
    train_data_dir, *, caption_extension: str = ".txt", **subset_defaults
) -> list[SubsetSpec]:
    """Subsets of a kohya ``train_data_dir``: the PARENT of ``N_name`` folders (``10_sks dog`` =
    10 repeats, class tokens ``sks dog``; split on the first ``_``). Other folders are skipped with
    a warning; ``subset_defaults`` fill the remaining :class:`SubsetSpec` fields."""
    root = Path(train_data_dir)
    if not root.is_dir():
        raise HiganbanaError(f"train_data_dir {str(root)!r} does not exist or is not a folder")
    subsets, skipped = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = re.fullmatch(r"(\d+)(?:_(.*))?", sub.name, flags=re.DOTALL)
        if not match or int(match.group(1)) < 1:
            skipped.append(sub.name)
            continue
        values = {**subset_defaults, "caption_extension": caption_extension, "num_repeats": int(match.group(1))}
        if match.group(2):
            values["class_tokens"] = match.group(2)
        subsets.append(_make_subset(f"folder {str(sub)!r}", image_dir=str(sub), **values))
    if skipped:
        warnings.warn(
            f"{root}: skipping folder(s) {', '.join(repr(s) for s in skipped)}: the name must be "
            "'<repeats>_<class tokens>' with repeats a positive integer (e.g. '10_sks dog')",
            stacklevel=2,
        )
    loose = _list_images(root)
    if not subsets:
        if loose:
            raise HiganbanaError(
                f"{root} holds images directly but no '<repeats>_<name>' folders: train_data_dir must be the "
                f"PARENT of folders such as '{root / '10_sks dog'}' (move the images into one), "
                "or use data.imagefolder for a plain folder"
            )
        raise HiganbanaError(f"no '<repeats>_<name>' folders (e.g. '10_sks dog') found in train_data_dir {str(root)!r}")
    if loose:
        warnings.warn(
            f"{root}: {len(loose)} image(s) directly in train_data_dir are ignored "
            "(only images inside '<repeats>_<name>' folders are used)",
            stacklevel=2,
        )
    return subsets


def _read_metadata(path: Path) -> dict[str, str | None]:
    """``file_name`` → caption (``text`` or ``caption`` column; None when absent) of a metadata.jsonl."""
    out: dict[str, str | None] = {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise HiganbanaError(f"cannot read {path}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HiganbanaError(f"{path}:{number}: invalid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise HiganbanaError(f"{path}:{number}: each line must be an object with a 'file_name' string")
        text = row.get("text", row.get("caption"))
        if text is not None and not isinstance(text, str):
            raise HiganbanaError(f"{path}:{number}: 'text' must be a string, got {text!r}")
        out[row["file_name"]] = text
    return out


def subsets_from_imagefolder(folder, **subset_defaults) -> list[SubsetSpec]:
    """A diffusers imagefolder: ``folder/metadata.jsonl`` (or ``folder/train/metadata.jsonl``) with
    lines ``{"file_name": ..., "text": ...}`` (``caption`` also accepted). One subset."""
    root = Path(folder)
    if not root.is_dir():
        raise HiganbanaError(f"imagefolder {str(root)!r} does not exist or is not a folder")
    for base in (root, root / "train"):
        meta = base / "metadata.jsonl"
        if meta.is_file():
            _read_metadata(meta)  # fail early on a bad line
            return [
                _make_subset(
                    f"imagefolder {str(root)!r}", image_dir=str(base), metadata_file=str(meta), **subset_defaults
                )
            ]
    raise HiganbanaError(
        f'imagefolder {str(root)!r} has no metadata.jsonl (lines of {{"file_name": ..., "text": ...}})'
    )


# --- dataset TOML ---------------------------------------------------------------------------

_DATASET_KEYS: dict[str, type] = {
    "batch_size": int,
    "resolution": object,
    "enable_bucket": bool,
    "min_bucket_reso": int,
    "max_bucket_reso": int,
    "bucket_reso_steps": int,
    "bucket_no_upscale": bool,
}
_SUBSET_KEYS: dict[str, type] = {
    "image_dir": str,
    "num_repeats": int,
    "caption_extension": str,
    "class_tokens": str,
    "keep_tokens": int,
    "shuffle_caption": bool,
    "caption_dropout_rate": float,
    "flip_aug": bool,
    "caption_separator": str,
}
#: kohya keys we know but do not implement: say so instead of "unknown key"
_KOHYA_UNSUPPORTED = {
    "caption_prefix", "caption_suffix", "keep_tokens_separator", "secondary_separator", "enable_wildcard",
    "color_aug", "random_crop", "face_crop_aug_range", "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate", "validation_split", "is_reg", "cache_info", "metadata_file",
    "token_warmup_min", "token_warmup_step", "alpha_mask", "conditioning_data_dir",
    "network_multiplier", "debug_dataset", "max_token_length",
}  # fmt: skip


def _check_table(table: Any, allowed: dict[str, type], where: str, *, hint: dict[str, str] | None = None) -> dict:
    """Check a TOML table's keys and value types; ``where`` is ``file: [table]``."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {type(table).__name__}")
    for key, value in table.items():
        check_finite(value, f"{where}: {key}")
        if key not in allowed:
            if hint and key in hint:
                raise ConfigError(f"{where}: key {key!r} {hint[key]}")
            if key in _KOHYA_UNSUPPORTED:
                raise ConfigError(f"{where}: kohya key {key!r} is not supported by higanbana; remove it")
            raise ConfigError(f"{where}: unknown key {key!r}{nearest(key, allowed)}")
        kind = allowed[key]
        if key == "resolution":
            _resolution(value, f"{where}: resolution")
        elif kind is list:
            if not isinstance(value, list):
                raise ConfigError(f"{where}: {key} must be an array of tables ([[...]]), got {value!r}")
        elif kind is not object:
            _check_type(value, kind, f"{where}: {key}")
    return table


def specs_from_dataset_toml(path, *, defaults: dict | None = None) -> list[DatasetSpec]:
    """Read a kohya dataset TOML into :class:`DatasetSpec` s.

    Levels ``defaults`` (the trainer's ``[data]`` section; keys that are not dataset/subset options
    are ignored) → ``[general]`` → ``[[datasets]]`` → ``[[datasets.subsets]]``, the lowest level
    wins. Relative ``image_dir`` resolve against the TOML's folder. Unknown keys and wrong types
    raise ConfigError naming the file, the table and the key.
    """
    path = Path(path)
    name = str(path)

    text = read_text(path, "dataset config")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: invalid TOML: {exc}") from exc

    both = {**_DATASET_KEYS, **_SUBSET_KEYS}
    base = {k: v for k, v in (defaults or {}).items() if k in both and v is not None}
    if base.get("class_tokens") == "":
        del base["class_tokens"]
    base.pop("image_dir", None)
    _check_table(base, both, "defaults")
    _check_table(doc, {"general": object, "datasets": list}, name)
    general = _check_table(doc.get("general", {}), both, f"{name}: [general]")
    datasets = doc.get("datasets")
    if not datasets:
        raise ConfigError(
            f"{name}: no [[datasets]] table (each needs at least one [[datasets.subsets]] with image_dir)"
        )
    if not isinstance(datasets, list):
        raise ConfigError(f"{name}: 'datasets' must be an array of tables ([[datasets]])")

    specs = []
    for i, dataset in enumerate(datasets, 1):
        dwhere = f"{name}: [[datasets]] {i}"
        _check_table(dataset, {**both, "subsets": list}, dwhere)
        subsets_raw = dataset.get("subsets")
        if not subsets_raw:
            raise ConfigError(f"{dwhere}: no [[datasets.subsets]] (each subset needs an image_dir)")
        level = {**base, **general, **{k: v for k, v in dataset.items() if k != "subsets"}}
        subsets, seen = [], set()
        for j, subset in enumerate(subsets_raw, 1):
            swhere = f"{dwhere} [[datasets.subsets]] {j}"
            hint = {k: "is a dataset option: set it in [[datasets]] or [general]" for k in _DATASET_KEYS}
            _check_table(subset, _SUBSET_KEYS, swhere, hint=hint)
            values = {k: v for k, v in {**level, **subset}.items() if k in _SUBSET_KEYS}
            if "image_dir" not in values:
                raise ConfigError(f"{swhere}: image_dir is required")
            image_dir = Path(values["image_dir"]).expanduser()
            if not image_dir.is_absolute():
                image_dir = path.parent / image_dir
            values["image_dir"] = str(image_dir)
            if image_dir.resolve() in seen:
                warnings.warn(f"{swhere}: duplicate subset {str(image_dir)!r} ignored", stacklevel=2)
                continue
            seen.add(image_dir.resolve())
            subsets.append(_make_subset(swhere, **values))
        dvalues = {k: v for k, v in level.items() if k in _DATASET_KEYS}
        try:
            specs.append(DatasetSpec(subsets=subsets, **dvalues))
        except ConfigError as exc:
            raise ConfigError(f"{dwhere}: {exc}") from exc
    return specs


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
        return [(p, None) for p in _list_images(folder)]
    meta_path = Path(subset.metadata_file)
    rows = _read_metadata(meta_path)
    out = []
    for file_name in sorted(rows):
        path = meta_path.parent / file_name
        if not path.is_file():
            raise HiganbanaError(f"{meta_path}: file_name {file_name!r} not found ({path})")
        out.append((path, rows[file_name]))
    listed = {p.resolve() for p, _ in out}
    unlisted = [p for p in _list_images(folder) if p.resolve() not in listed]
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

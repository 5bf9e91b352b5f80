"""Where the trainer's images and captions come from: the dataset specs and their three sources.

Three sources describe the same thing, a list of :class:`DatasetSpec` (each a list of
:class:`SubsetSpec` folders):

* a kohya folder (:func:`subsets_from_kohya_folder`): the parent of ``N_name`` folders,
  N = repeats, name = class tokens;
* a kohya dataset TOML (:func:`specs_from_dataset_toml`): ``[general]`` → ``[[datasets]]`` →
  ``[[datasets.subsets]]``, the lowest level wins;
* a diffusers imagefolder (:func:`subsets_from_imagefolder`): ``metadata.jsonl`` with
  ``file_name`` and ``text``.

The specs are scanned into a :class:`~higanbana.train.data.TrainingData` by
:func:`~higanbana.train.data.build_training_data`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, HiganbanaError, nearest
from ..schema import check_finite, load_toml
from .buckets import make_buckets

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetSpec",
    "SubsetSpec",
    "list_images",
    "read_metadata",
    "specs_from_dataset_toml",
    "subsets_from_imagefolder",
    "subsets_from_kohya_folder",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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


def list_images(folder: Path) -> list[Path]:
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
    loose = list_images(root)
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


def read_metadata(path: Path) -> dict[str, str | None]:
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
            read_metadata(meta)  # fail early on a bad line
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

    doc = load_toml(path, "dataset config")

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

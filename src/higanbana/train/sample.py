"""Sample images during training: kohya prompt files, reproducible generation, PNG files, tracker logging.

Prompt files are kohya's three formats (``.txt`` with ``--n/--w/--h/--d/--l/--s/--ss`` options,
``.toml``, ``.json``). Every prompt gets its own seeded generator, so the same step gives the same
image across runs and resumes, and sampling never disturbs the training state (module modes, grad
mode, the global RNG).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, nearest
from ..models.pipeline import canonical_sampler, make_scheduler, sampler_name
from ..safeio import atomic_path, check_name, clean_stale_temps
from ..schema import parse_toml, read_text

if TYPE_CHECKING:
    from PIL import Image

#: Key of the resolved generation settings that :func:`generate_samples` stores in ``image.info``.
INFO_KEY = "higanbana_sample"


@dataclass
class SamplePrompt:
    """One sample prompt; ``None`` fields take the defaults given to :func:`generate_samples`."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    cfg_scale: float | None = None
    steps: int | None = None
    sampler: str | None = None


# ---------------------------------------------------------------------------------------------------
# prompt files

#: ``.txt`` option letter -> SamplePrompt field (kohya's ``line_to_prompt_dict``).
_TXT_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "l": "cfg_scale", "s": "steps"}
_TXT_OPTIONS["ss"] = "sampler"

#: ``.toml``/``.json`` key -> SamplePrompt field (kohya's keys and our field names).
_KEYS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "seed": "seed",
    "scale": "cfg_scale",
    "cfg_scale": "cfg_scale",
    "sample_steps": "steps",
    "steps": "steps",
    "sample_sampler": "sampler",
    "sampler": "sampler",
}

_OPTION_SPLIT = re.compile(r"(?:^|\s+)--(?=[A-Za-z])")
_OPTION = re.compile(r"([A-Za-z]+)(?:\s+(.*))?", re.DOTALL)


def _convert(field: str, value: Any, where: str, label: str) -> Any:
    """Check and convert one value for ``field``; errors name ``where`` (file:line or entry) and ``label``."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {label} expects {expected}, got {value!r}")

    if field in ("prompt", "negative_prompt"):
        if not isinstance(value, str):
            raise fail("a string")
        return value.strip()
    if field == "sampler":
        if not isinstance(value, str):
            raise fail("a sampler name")
        try:
            return canonical_sampler(value)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {label}: {exc}") from None
    if field == "cfg_scale":
        if isinstance(value, bool):
            raise fail("a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise fail("a number") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise fail("a finite number")
        return number
    # width, height, steps, seed: integers
    if isinstance(value, (bool, float)):
        raise fail("an integer")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise fail("an integer") from None
    if field == "seed" and number < 0:
        raise fail("a non-negative integer")
    if field != "seed" and number <= 0:
        raise fail("a positive integer")
    return number


def _parse_txt(path: Path, text: str) -> list[SamplePrompt]:
    prompts = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        head, *options = _OPTION_SPLIT.split(line)
        fields: dict[str, Any] = {"prompt": head.strip()}
        for option in options:
            match = _OPTION.fullmatch(option.strip())
            name, value = match.group(1).lower(), (match.group(2) or "").strip()
            field = _TXT_OPTIONS.get(name)
            if field is None:
                known = ", ".join(f"--{k}" for k in _TXT_OPTIONS)
                warnings.warn(
                    f"{where}: ignoring unknown option --{name}{nearest(name, _TXT_OPTIONS)} (known: {known})",
                    stacklevel=3,
                )
                continue
            fields[field] = _convert(field, value, where, f"--{name}")
        prompts.append(SamplePrompt(**fields))
    return prompts


def _from_mapping(entry: Any, where: str) -> SamplePrompt:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table/object with a 'prompt' key, got {type(entry).__name__}")
    fields: dict[str, Any] = {}
    for key, value in entry.items():
        field = _KEYS.get(key)
        if field is None:
            warnings.warn(f"{where}: ignoring unknown key {key!r}{nearest(key, _KEYS)}", stacklevel=4)
            continue
        fields[field] = _convert(field, value, where, repr(key))
    if "prompt" not in fields:
        raise ConfigError(f"{where}: missing the 'prompt' key")
    return SamplePrompt(**fields)


def _parse_toml(path: Path, text: str) -> list[SamplePrompt]:
    data = parse_toml(text, path)
    defaults = {k: v for k, v in data.items() if k != "prompt"}
    table = data.get("prompt")
    if isinstance(table, list):  # [[prompt]] tables, defaults at the top level
        entries = table
    elif isinstance(table, dict):  # kohya: [prompt] defaults + [[prompt.subset]] entries
        defaults.update({k: v for k, v in table.items() if k != "subset"})
        entries = table.get("subset", [])
        if not isinstance(entries, list):
            raise ConfigError(f"{path}: 'prompt.subset' must be an array of tables ([[prompt.subset]])")
        if not entries and "prompt" in table:
            entries, defaults = [table], {k: v for k, v in data.items() if k != "prompt"}
    else:
        raise ConfigError(f"{path}: no prompts; write [[prompt]] tables (or kohya's [prompt] + [[prompt.subset]])")
    return [
        _from_mapping({**defaults, **e} if isinstance(e, dict) else e, f"{path}: prompt {i}")
        for i, e in enumerate(entries)
    ]


def _parse_json(path: Path, text: str) -> list[SamplePrompt]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a JSON list of prompt objects, got {type(data).__name__}")
    return [_from_mapping(e, f"{path}: prompt {i}") for i, e in enumerate(data)]


_PARSERS = {".txt": _parse_txt, ".toml": _parse_toml, ".json": _parse_json}


def parse_prompt_file(path: str | os.PathLike) -> list[SamplePrompt]:
    """Read a kohya sample-prompt file (``.txt``, ``.toml`` or ``.json``) into :class:`SamplePrompt` s.

    Unknown options/keys are warned about and ignored (kohya files may carry options for features
    higanbana does not have); bad values and files without any prompt are :class:`ConfigError` s.
    """
    path = Path(path)
    parser = _PARSERS.get(path.suffix.lower())
    if parser is None:
        raise ConfigError(f"{path}: unknown prompt file type {path.suffix!r}; expected one of .txt, .toml, .json")

    text = read_text(path, "prompt file", encoding="utf-8-sig")
    prompts = parser(path, text)
    if not prompts:
        raise ConfigError(f"{path}: the prompt file holds no prompts")
    return prompts


# ---------------------------------------------------------------------------------------------------
# generation


def _modules(pipeline) -> list[torch.nn.Module]:
    return [m for m in getattr(pipeline, "components", {}).values() if isinstance(m, torch.nn.Module)]


@contextmanager
def _eval_mode(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Eval mode for sampling (no dropout), then every submodule's own ``.training`` flag back."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training


def generate_samples(
    pipeline,
    prompts: list[SamplePrompt],
    *,
    width: int,
    height: int,
    steps: int = 20,
    cfg_scale: float = 7.0,
    seed: int = 0,
    device=None,
    sampler: str | None = None,
    scheduler_config: dict | None = None,
) -> list[Image.Image]:
    """One image per prompt; prompt ``i`` uses ``torch.Generator(device).manual_seed(p.seed or seed + i)``.

    Sizes are rounded down to the pipeline's latent grid (multiples of 8 and of ``vae_scale_factor``).
    ``sampler`` (all prompts) or ``p.sampler`` (one prompt) swap in a scheduler built from
    ``scheduler_config`` (default: the pipeline's current scheduler's config) and the original is put
    back. Module train/eval flags, grad mode and the global RNG are as before afterwards. Each image's
    ``info[INFO_KEY]`` holds the settings actually used (read by :func:`save_samples`).
    """
    prompts = [SamplePrompt(p) if isinstance(p, str) else p for p in prompts]
    original = pipeline.scheduler
    base_config = dict(scheduler_config if scheduler_config is not None else original.config)
    if device is None:
        device = getattr(pipeline, "_execution_device", None) or pipeline.device
    device = torch.device(device)
    multiple = max(8, int(getattr(pipeline, "vae_scale_factor", 8)))
    default_sampler = canonical_sampler(sampler) if sampler is not None else None
    schedulers: dict[str, Any] = {}
    images = []
    rng_devices = []
    if device.type == "cuda":
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=rng_devices), _eval_mode(_modules(pipeline)), torch.no_grad():
        try:
            for i, p in enumerate(prompts):
                name = canonical_sampler(p.sampler) if p.sampler else default_sampler
                if name is None:
                    pipeline.scheduler = original
                else:
                    if name not in schedulers:
                        schedulers[name] = make_scheduler(name, base_config)
                    pipeline.scheduler = schedulers[name]
                w = max(multiple, (p.width or width) // multiple * multiple)
                h = max(multiple, (p.height or height) // multiple * multiple)
                settings = {
                    "prompt": p.prompt,
                    "negative_prompt": p.negative_prompt or "",
                    "width": w,
                    "height": h,
                    "seed": p.seed if p.seed is not None else seed + i,
                    "steps": p.steps or steps,
                    "cfg_scale": p.cfg_scale if p.cfg_scale is not None else cfg_scale,
                    "sampler": name or sampler_name(original),
                }
                generator = torch.Generator(device).manual_seed(settings["seed"])
                image = pipeline(
                    prompt=p.prompt,
                    # None (not "") keeps SDXL's force_zeros_for_empty_prompt behaviour
                    negative_prompt=p.negative_prompt or None,
                    width=w,
                    height=h,
                    num_inference_steps=settings["steps"],
                    guidance_scale=settings["cfg_scale"],
                    generator=generator,
                    output_type="pil",
                ).images[0]
                image.info[INFO_KEY] = settings
                images.append(image)
        finally:
            pipeline.scheduler = original
    return images


# ---------------------------------------------------------------------------------------------------
# saving and logging


def _settings(image, prompt: SamplePrompt | str) -> dict[str, Any]:
    info = getattr(image, "info", {}).get(INFO_KEY)
    if info is not None:
        return dict(info)
    p = SamplePrompt(prompt) if isinstance(prompt, str) else prompt
    return {**asdict(p), "width": image.width, "height": image.height}


def _a1111_parameters(s: dict[str, Any]) -> str:
    """The ``parameters`` text A1111/Forge and most image viewers show as generation info."""
    lines = [s.get("prompt", "")]
    if s.get("negative_prompt"):
        lines.append(f"Negative prompt: {s['negative_prompt']}")
    fields = [
        ("Steps", s.get("steps")),
        ("Sampler", s.get("sampler")),
        ("CFG scale", s.get("cfg_scale")),
        ("Seed", s.get("seed")),
        ("Size", f"{s['width']}x{s['height']}" if s.get("width") and s.get("height") else None),
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def save_samples(
    images: Sequence[Image.Image],
    prompts: Sequence[SamplePrompt],
    folder: str | os.PathLike,
    *,
    step: int,
    epoch: int | None = None,
    name: str = "sample",
) -> list[Path]:
    """Write ``<name>[_e{epoch:04d}]_s{step:07d}_{i:02d}.png`` files atomically; returns their paths.

    Each PNG carries text chunks ``parameters`` (A1111 style: prompt, negative, steps, sampler, CFG,
    seed, size) and ``higanbana_sample`` (the same as JSON).
    """
    from PIL.PngImagePlugin import PngInfo

    if len(images) != len(prompts):
        raise ConfigError(f"save_samples: {len(images)} images but {len(prompts)} prompts")
    check_name(name, "save_samples: name")
    folder = Path(folder)
    clean_stale_temps(folder)  # once per call: each image is then written with sweep=False
    stem = f"{name}_e{epoch:04d}_s{step:07d}" if epoch is not None else f"{name}_s{step:07d}"
    paths = []
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        settings = _settings(image, prompt)
        info = PngInfo()
        info.add_text("parameters", _a1111_parameters(settings))
        info.add_text(INFO_KEY, json.dumps(settings, ensure_ascii=False))
        path = folder / f"{stem}_{i:02d}.png"
        with atomic_path(path, sweep=False) as tmp:
            image.save(tmp, format="PNG", pnginfo=info)
        paths.append(path)
    return paths


def log_samples(tracker_writer, images: Sequence[Image.Image], prompts: Sequence[SamplePrompt], step: int) -> None:
    """Log images as ``samples/{i:02d}`` (HWC uint8) to a TensorBoard ``SummaryWriter``-like object.

    ``None`` or an object without ``add_image`` is a no-op; an accelerate tracker whose ``.writer``
    has ``add_image`` is unwrapped.
    """
    import numpy as np

    if tracker_writer is None:
        return
    writer = tracker_writer
    if not hasattr(writer, "add_image"):
        writer = getattr(writer, "writer", None)
        if not hasattr(writer, "add_image"):
            return
    for i, image in enumerate(images):
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        writer.add_image(f"samples/{i:02d}", array, global_step=step, dataformats="HWC")

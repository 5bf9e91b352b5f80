"""Generate the evaluation images: the same prompts and seeds for the base and every fine-tuned model.

Images are written one file per :class:`~higanbana.evaluate.prompts.PromptItem`
(``<root>/<model>/<concept>/<prompt_type>/<index>.png``, atomically), so a re-run skips every image
that exists and a killed run loses at most one batch. The settings that decide the pixels (sampler,
steps, CFG, size, the adapter file's hash and strength) are recorded in ``<root>/<model>/settings.json``;
a re-run with other settings is refused rather than mixing images (pass a new output folder or
``overwrite``). Work is split across processes by item index (``index % processes``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import HiganbanaError
from ..models.flux import pack_latents
from ..models.pipeline import canonical_sampler, make_scheduler
from ..safeio import atomic_path, check_name, write_text


@dataclass(frozen=True)
class GenerationSettings:
    """What decides the pixels besides prompt and seed (docs/design.md §5 defaults)."""

    sampler: str = "ddim"
    steps: int = 25
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    negative_prompt: str = ""


#: what SD3/Flux pipelines sample with (their own scheduler; ``generation.sampler`` applies to the UNets)
FLOW_SAMPLER = "flowmatch_euler"


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file (the adapter's identity in the settings record)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def image_path(root: str | os.PathLike, model: str, item: Any) -> Path:
    """``root/<model>/<concept>/<prompt type>/<index>.png``; model and concept are checked names."""
    check_name(model, "model name")
    check_name(item.concept, "concept name")
    return Path(root) / model / item.concept / item.prompt_type / f"{item.index:04d}.png"


def _check_settings(folder: Path, record: dict[str, Any], overwrite: bool) -> None:
    path = folder / "settings.json"
    if path.is_file() and not overwrite:
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise HiganbanaError(
                f"{path}: unreadable ({exc}); remove it or pass overwrite to regenerate the images"
            ) from None
        if old != record:
            changed = sorted(k for k in {*old, *record} if old.get(k) != record.get(k))
            raise HiganbanaError(
                f"{folder}: images there were generated with other settings ({', '.join(changed)} differ); "
                "use another output folder or pass overwrite"
            )
    write_text(path, json.dumps(record, indent=1, sort_keys=True))


def _save_png(image: Any, path: Path, item: Any) -> None:
    """One image, atomically (the folder's stale temporaries are swept once per run, see generate_all)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"{item.prompt}\nSeed: {item.seed}")
    with atomic_path(path, sweep=False, suffix=".png") as tmp:
        image.save(tmp, pnginfo=info)


@torch.no_grad()
def generate_images(
    pipeline: Any,
    items: Sequence[Any],
    root: str | os.PathLike,
    model: str,
    settings: GenerationSettings,
    *,
    adapter: dict[str, Any] | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Generate the missing images of ``items`` for ``model`` (a pipeline with its adapter, if any,
    already attached); returns the paths of this process's share (existing and new)."""
    from tqdm.auto import tqdm

    folder = Path(root) / model
    transformer = getattr(pipeline, "transformer", None)  # SD3/Flux: their own flow-matching Euler sampler
    sampler = FLOW_SAMPLER if transformer is not None else canonical_sampler(settings.sampler)
    record = {**asdict(settings), "sampler": sampler, "adapter": adapter or None}
    if process_index == 0:
        _check_settings(folder, record, overwrite)
    mine = [it for i, it in enumerate(items) if i % num_processes == process_index]
    paths = [image_path(root, model, it) for it in mine]
    todo = [(it, p) for it, p in zip(mine, paths, strict=True) if overwrite or not p.is_file()]
    if not todo:
        return paths
    original = pipeline.scheduler
    denoiser = transformer if transformer is not None else pipeline.unet
    if transformer is None:
        pipeline.scheduler = make_scheduler(settings.sampler, dict(original.config))
    device = torch.device(device) if device is not None else denoiser.device
    bar = tqdm(total=len(todo), desc=f"generate {model}", unit="img", disable=not progress)
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            generators = [torch.Generator("cpu").manual_seed(it.seed) for it, _ in chunk]
            flux = transformer is not None and hasattr(pipeline, "_pack_latents")
            # Flux packs 2×2 patches: its latent sides are even (the pipeline rounds the size the same way)
            factor = pipeline.vae_scale_factor * (2 if flux else 1)
            channels = pipeline.vae.config.latent_channels if transformer is not None else denoiser.config.in_channels
            shape = (
                len(chunk),
                channels,
                settings.height // factor * factor // pipeline.vae_scale_factor,
                settings.width // factor * factor // pipeline.vae_scale_factor,
            )
            # initial noise drawn per image on the CPU: the same image for a seed whatever the batch or device
            latents = torch.stack([torch.randn(shape[1:], generator=g) for g in generators]).to(device)
            if flux:
                latents = pack_latents(latents)
            out = pipeline(
                prompt=[it.prompt for it, _ in chunk],
                negative_prompt=[settings.negative_prompt] * len(chunk) if settings.negative_prompt else None,
                num_inference_steps=settings.steps,
                guidance_scale=settings.cfg_scale,
                width=settings.width,
                height=settings.height,
                latents=latents.to(denoiser.dtype),
                output_type="pil",
            )
            for (it, path), image in zip(chunk, out.images, strict=True):
                _save_png(image, path, it)
            bar.update(len(chunk))
    finally:
        pipeline.scheduler = original
        bar.close()
    return paths

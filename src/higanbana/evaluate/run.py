"""``evaluate(config)``: generate, encode, measure, aggregate, report — each step cached on disk.

Phases (a re-run skips what is done):

1. **Generate** the prompt set of every concept with the base model and with each checkpoint
   attached at its strength — same prompts and seeds for all (:mod:`.generate`; split across
   processes by accelerate).
2. **Encode** (main process): DINOv2 features of generated and training images, CLIP image and
   text features, cached per (encoder, model, concept, prompt type) and invalidated when the
   images change.
3. **Measure** every registered metric (:mod:`.metrics`) per (model, concept, prompt type) it is
   declared for: fidelity (cosine and SCD vs the concept's training images), controllability (CLIP
   image–text), diversity (Vendi; per prompt for ``<alter>``), for ``<style>`` base-model
   preservation (VGG-19 style loss against the base model's image of the same prompt and seed),
   and image quality when a scorer is configured.
4. **Aggregate and report**: ``raw_metrics.csv``, rank-normalised scores, the tentative ranking,
   correlations, importance, and a self-contained ``report.html``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, HiganbanaError
from ..formats.dit_network import load_dit_network
from ..formats.reader import read_network_file
from ..formats.sd_network import load_sd_network
from ..models.dit import DIT_KINDS, dit_kind_of, dit_pipeline, load_dit
from ..models.pipeline import build_pipeline, read_scheduler_config
from ..models.sd import load_sd
from ..safeio import atomic_path, clean_stale_temps, writable_folder, write_text
from . import metrics as M
from .config import EvalConfig
from .encoders import encoder_kind_of, load_encoder, load_plugin
from .generate import GenerationSettings, file_digest, generate_images, image_path
from .prompts import alter_diversity_warnings, build_all, concepts_from_toml

BASE = "base"


@dataclass
class EvalResult:
    """Where everything went."""

    out_dir: Path
    raw: Any  # pandas DataFrame (long format)
    report: Path | None
    ranking: Any = None
    findings: Any = None  # findings.Findings: the paper's findings with intervals and verdicts


# ------------------------------------------------------------------------------ feature cache
def _images_digest(paths: list[Path]) -> str:
    h = hashlib.sha1()
    for p in paths:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cached_features(cache: Path, paths: list[Path], compute: Callable[[list[Path]], torch.Tensor]) -> torch.Tensor:
    """Features of ``paths`` from ``cache`` (a .safetensors file) when it was made from the same files
    (names, sizes, modification times); otherwise computed and stored atomically."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    digest = _images_digest(paths)
    if cache.is_file():
        try:
            with safe_open(str(cache), "pt") as f:
                if (f.metadata() or {}).get("images") == digest:
                    return f.get_tensor("features")
        except (OSError, ValueError):
            pass  # unreadable: recompute
    features = compute(paths).to(torch.float32).contiguous()
    with atomic_path(cache) as tmp:
        save_file({"features": features}, str(tmp), metadata={"images": digest, "count": str(len(paths))})
    return features


def _open(paths: list[Path]) -> list[Any]:
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


# ------------------------------------------------------------------------------ phases
def _device(config: EvalConfig) -> torch.device:
    if config.report.device:
        return torch.device(config.report.device)
    from accelerate import PartialState

    return PartialState().device


def generate_all(
    config: EvalConfig, items: list[Any], *, progress: bool = True, share: tuple[int, int] | None = None
) -> dict[str, list[Path]]:
    """Phase 1: images of every model; returns ``{model: [path per item]}`` (all processes' paths).
    ``share=(index, count)``: only this worker's share, outside accelerate (no barrier)."""
    from accelerate import PartialState

    if share is None:
        state = PartialState()
        index, count, main = state.process_index, state.num_processes, state.is_main_process
    else:
        index, count = share
        main = index == 0
    device = _device(config)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.model.dtype]
    m = config.model
    dit = m.kind in DIT_KINDS or (m.kind == "auto" and dit_kind_of(m.pretrained) is not None)
    if dit:  # SD3/Flux: the family's pipeline with its flow-matching Euler sampler
        parts: Any = load_dit(m.pretrained, None if m.kind == "auto" else m.kind, dtype, config=m.config or None)
        denoiser = parts.transformer
        pipeline = dit_pipeline(parts)
    else:
        parts = load_sd(m.pretrained, None if m.kind == "auto" else m.kind, dtype, config=m.config or None)
        denoiser = parts.unet
        scheduler_config = read_scheduler_config(m.pretrained) or (
            read_scheduler_config(m.config) if m.config else None
        )
        pipeline = build_pipeline(parts, sampler=config.generation.sampler, scheduler_config=scheduler_config)
    for module in (denoiser, parts.vae, *parts.text_encoders):
        module.to(device).eval()
    g = config.generation
    settings = GenerationSettings(g.sampler, g.steps, g.cfg_scale, g.width, g.height, g.negative_prompt)
    root = Path(config.output.dir) / "images"
    models = [(BASE, None, 1.0)] + [(c.name, c.path, c.strength) for c in config.checkpoints]
    for name, path, strength in models:
        net = None
        adapter = None
        if path is not None:
            if not Path(path).is_file():  # (checked before any work by preflight; a file removed since)
                raise HiganbanaError(f"checkpoint {name}: {path} does not exist")
            net = (load_dit_network(path, parts.transformer) if dit else load_sd_network(path, parts)).attach()
            net.to(device)
            net.set_multiplier(strength)
            net.eval()
            adapter = {"sha256": file_digest(path), "strength": strength}
        try:
            generate_images(
                pipeline,
                items,
                root,
                name,
                settings,
                adapter=adapter,
                batch_size=g.batch_size,
                device=device,
                process_index=index,
                num_processes=count,
                overwrite=config.output.overwrite,
                progress=progress and main,
            )
        finally:
            if net is not None:
                net.detach()
    if share is None:
        state.wait_for_everyone()
    return {name: [image_path(root, name, it) for it in items] for name, _p, _s in models}


def _is_plugin(value: str) -> bool:
    return ":" in value and not Path(value).exists()


def _encoder_slots(prompt_types: Sequence[str]) -> dict[str, bool]:
    """The ``encoders.*`` slots the registered metrics need on ``prompt_types``: slot -> whether it may be
    left unset (its metrics are then not measured), in the order the metrics first need them."""
    slots: dict[str, bool] = {}
    for metric in M.registry():
        if set(metric.prompt_types) & set(prompt_types):
            for name in metric.inputs:
                spec = M.INPUTS[name]
                if spec.slot:
                    slots[spec.slot] = slots.get(spec.slot, True) and spec.optional
    return slots


def _check_encoders(config: EvalConfig) -> None:
    """Every encoder slot the registered metrics need on the prompt types is set, its path exists (or
    its plug-in module can be imported), read from ``config.json`` files only: before any image is
    generated."""
    import importlib.util

    e = config.encoders
    needed = _encoder_slots(config.prompts.types)
    missing = [slot for slot, optional in needed.items() if not optional and not getattr(e, slot)]
    if missing:
        raise HiganbanaError(
            "encoders."
            + ", encoders.".join(missing)
            + " not set: give local paths (DINOv2: a transformers Dinov2Model folder, or a CLIPModel folder "
            "whose projected image features stand in; CLIP: a transformers CLIPModel folder with its tokenizer; "
            "VGG-19: a torchvision-format state dict file, or an AutoencoderKL / Stable Diffusion folder whose "
            "VAE encoder gives the Gram matrices), or a 'package.module:factory' plug-in"
        )
    slots = {slot: getattr(e, slot) for slot in needed if getattr(e, slot)}
    for slot, value in slots.items():
        if _is_plugin(value) or slot == "quality":
            module, sep, factory = value.partition(":")
            if not (sep and module and factory):
                raise ConfigError(
                    f"encoders.{slot}: {value} does not exist (nor is it a 'package.module:factory' plug-in)"
                )
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise ConfigError(f"encoders.{slot}: plug-in module {module!r} cannot be imported")
            continue
        encoder_kind_of(slot, value)  # a missing path is an error naming the slot


def _load_encoders(config: EvalConfig, device: torch.device) -> dict[str, Any]:
    """The encoders of the slots the registered metrics need (an unset optional slot is left out)."""
    e = config.encoders
    _check_encoders(config)

    def load(slot: str, value: str) -> Any:
        # a "package.module:factory" value plugs in another encoder with the same interface
        if _is_plugin(value) or slot == "quality":
            return load_plugin(value, device=device)
        kind = encoder_kind_of(slot, value)  # reads config.json files only: a CLIP / VAE folder stands in
        if kind == "dinov2":
            return load_encoder(kind, value, device=device, image_size=e.image_size, letterbox=e.letterbox)
        if kind in ("clip", "clip_image"):  # the CLIP vision tower has its own fixed size: no image_size
            return load_encoder(kind, value, device=device, letterbox=e.letterbox)
        return load_encoder(kind, value, device=device)

    return {slot: load(slot, getattr(e, slot)) for slot in _encoder_slots(config.prompts.types) if getattr(e, slot)}


class _Reiterable:
    """An iterable that calls ``make()`` for a fresh iterator each time it is iterated."""

    def __init__(self, make: Callable[[], Iterator[Any]]):
        self._make = make

    def __iter__(self) -> Iterator[Any]:
        return self._make()


@dataclass
class _Measuring:
    """What every set's inputs are computed from: encoders, feature cache, images, prompt items."""

    enc: dict[str, Any]
    batch_size: int
    cache: Path
    images: dict[str, list[Path]]
    items: list[Any]
    train_features: dict[str, torch.Tensor]
    base_grams: dict[str, list[torch.Tensor]]

    def dino(self, paths: list[Path]) -> torch.Tensor:
        return self.enc["dinov2"].encode_images(_open(paths), batch_size=self.batch_size)

    def clip(self, paths: list[Path]) -> torch.Tensor:
        return self.enc["clip"].encode_images(_open(paths), batch_size=self.batch_size)


class _SetInputs:
    """The inputs (:data:`metrics.INPUTS`, one method each) of one (model, concept, prompt type) set,
    each computed on first use and kept for the set's other metrics."""

    def __init__(self, env: _Measuring, model: str, concept: str, prompt_type: str, idx: list[int]):
        self.env, self.model, self.concept, self.ptype, self.idx = env, model, concept, prompt_type, idx
        self.paths = [env.images[model][i] for i in idx]
        self.items = [env.items[i] for i in idx]
        self.stem = f"{model}/{concept}/{prompt_type}.safetensors"
        self._values: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        if name not in self._values:
            self._values[name] = getattr(self, name)()
        return self._values[name]

    def image_features(self) -> torch.Tensor:
        return cached_features(self.env.cache / "dinov2" / self.stem, self.paths, self.env.dino)

    def train_features(self) -> torch.Tensor:
        return self.env.train_features[self.concept]

    def clip_image_features(self) -> torch.Tensor:
        return cached_features(self.env.cache / "clip" / self.stem, self.paths, self.env.clip)

    def clip_text_features(self) -> torch.Tensor:
        return self.env.enc["clip"].encode_texts([it.clip_text for it in self.items], batch_size=self.env.batch_size)

    def quality_scores(self) -> torch.Tensor:
        return self.env.enc["quality"].score(_open(self.paths))

    def prompt_type(self) -> str:
        return self.ptype

    def prompt_indices(self) -> list[int]:
        return [it.prompt_index for it in self.items]

    def style_grams(self) -> _Reiterable:
        style = self.env.enc["vgg19"]
        base = self.env.base_grams.get(self.concept)
        if base is None:  # the base model's Grams, once per concept (float32 to halve the memory)
            base_paths = [self.env.images[BASE][i] for i in self.idx]
            chunks = [style.gram_matrices(_open(base_paths[s : s + 8])) for s in range(0, len(self.idx), 8)]
            base = self.env.base_grams[self.concept] = [torch.cat(layer).float() for layer in zip(*chunks, strict=True)]

        def pairs() -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
            for start in range(0, len(self.paths), 8):  # 8 images' Grams at a time
                yield (
                    style.gram_matrices(_open(self.paths[start : start + 8])),
                    [layer[start : start + 8] for layer in base],
                )

        return _Reiterable(pairs)


def measure(
    config: EvalConfig,
    concepts: list[Any],
    items: list[Any],
    images: dict[str, list[Path]],
    *,
    progress: bool = True,
) -> Any:
    """Phases 2–3: the raw metrics table (long format): every registered metric on every (model, concept,
    prompt type) set it is declared for, its inputs computed once per set."""
    import pandas as pd
    from tqdm.auto import tqdm

    device = _device(config)
    enc = _load_encoders(config, device)
    # a set's own metrics in registry order, then those against the base model's images
    chosen = sorted(
        (m for m in M.registry() if all(M.INPUTS[name].slot in (None, *enc) for name in m.inputs)),
        key=lambda m: m.against_base,
    )
    by_concept = {c.name: c for c in concepts}
    groups: dict[tuple[str, str], list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault((it.concept, it.prompt_type), []).append(i)
    env = _Measuring(enc, config.encoders.batch_size, Path(config.output.dir) / "features", images, items, {}, {})
    if any("train_features" in m.inputs for m in chosen):
        for c in concepts:
            paths = [Path(p) for p in c.train_images]
            if not paths:
                raise HiganbanaError(f"concept {c.name}: no training images, so fidelity cannot be measured")
            cache = env.cache / "dinov2" / "_train" / f"{c.name}.safetensors"
            env.train_features[c.name] = cached_features(cache, paths, env.dino)
    rows = []
    work = [(model, key) for model in images for key in groups]
    for model, (concept, ptype) in tqdm(work, desc="metrics", unit="set", disable=not progress):
        inputs = _SetInputs(env, model, concept, ptype, groups[(concept, ptype)])
        c = by_concept[concept]
        for metric in chosen:
            if not metric.measured_on(ptype, base_model=model == BASE):
                continue
            value = metric.compute(**{name: inputs.get(name) for name in metric.inputs})
            rows.append(
                {
                    "model": model,
                    "concept": concept,
                    "category": c.category,
                    "subclass": c.subclass,
                    "prompt_type": ptype,
                    "metric": metric.name,
                    "value": float(value),
                }
            )
    return pd.DataFrame(rows)


def _models_table(config: EvalConfig) -> Any:
    import pandas as pd

    rows = [{"model": BASE, "algo": BASE}]
    for c in config.checkpoints:
        rows.append({"model": c.name, **{k: v for k, v in c.params.items()}})
    frame = pd.DataFrame(rows)
    if "algo" not in frame:
        frame["algo"] = frame["model"]
    frame["algo"] = frame["algo"].fillna(frame["model"])
    return frame


def report(config: EvalConfig, raw: Any, images: dict[str, list[Path]], items: list[Any]) -> tuple[Path, Any, Any]:
    """Phase 4: aggregate and write the report (with image grids per model × prompt type); returns the
    report's path, the ranking and the paper's findings."""
    # lazy: aggregate and findings import pandas, report matplotlib, needed only in this last phase
    from . import aggregate as A
    from .findings import find
    from .report import write_report

    out = Path(config.output.dir)
    A.save_table(raw, out / "raw_metrics.csv")
    models = _models_table(config)
    scores = A.rank_normalize(raw)
    ranking = A.tentative_ranking(scores, models, group_by=config.report.group_by) if len(scores) else None
    corr = A.correlations(scores) if len(scores) else None
    features = [f for f in config.report.features if f in models]
    imp = A.importance(scores, models, features) if features else None
    findings = find(scores, models, group_by=config.report.group_by, features=features or None) if len(scores) else None
    grids: dict[tuple[str, str], list[Path]] = {}
    for model, paths in images.items():
        for ptype in config.prompts.types:
            chosen = [p for p, it in zip(paths, items, strict=True) if it.prompt_type == ptype]
            if chosen:
                grids[(model, ptype)] = chosen[: config.output.grid_images]
    notes = [
        f"{len(config.checkpoints)} checkpoint(s) and the base model; {len(items)} images per model "
        f"({config.prompts.n_images} per concept and prompt type); sampler {config.generation.sampler}, "
        f"{config.generation.steps} steps, CFG {config.generation.cfg_scale}",
    ]
    path = write_report(
        out,
        raw=raw,
        scores=scores,
        models=models,
        ranking=ranking,
        corr=corr,
        importance=imp,
        findings=findings,
        image_grids=grids,
        title=config.report.title,
        notes=notes,
    )
    return path, ranking, findings


def preflight(config: EvalConfig) -> None:
    """Every check that needs no model weights, before any image is generated: the config's values and
    names (again: a library caller may have changed fields), the base model's path, every checkpoint
    file (read and validated as every reader does), the encoders, and that ``output.dir`` can be
    written (nothing is created here)."""
    config.validate()
    m = config.model
    if not Path(m.pretrained).exists():
        raise ConfigError(f"model.pretrained: {m.pretrained} does not exist")
    if m.config and not Path(m.config).is_dir():
        raise ConfigError(f"model.config: {m.config} is not a folder")
    for i, c in enumerate(config.checkpoints):
        path = Path(c.path)
        if not path.exists():
            raise ConfigError(f"checkpoints[{i}].path: {c.path} does not exist (checkpoint {c.name!r})")
        if not path.is_file():
            raise ConfigError(
                f"checkpoints[{i}].path: {c.path} is a folder, not an adapter file (checkpoint {c.name!r})"
            )
        try:  # the file's metadata, keys, shapes and values (NaN/Inf), as every reader checks them
            read_network_file(path)
        except HiganbanaError as exc:
            raise HiganbanaError(f"checkpoints[{i}].path (checkpoint {c.name!r}): {exc}") from None
    _check_encoders(config)
    writable_folder(config.output.dir, where="output.dir", create=False)


def evaluate(
    config: EvalConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    pregenerate: Callable[[EvalConfig, list[Any]], None] | None = None,
) -> EvalResult:
    """Run the whole evaluation ``config`` describes (see the module docstring). ``pregenerate(config,
    items)``, if given, writes the images first (e.g. in worker processes); the cached ones are kept."""
    from accelerate import PartialState

    out = Path(config.output.dir)
    preflight(config)
    concepts = concepts_from_toml(config.concepts.file)
    items = build_all(
        concepts,
        tuple(config.prompts.types),
        n_images=config.prompts.n_images,
        seed_start=config.prompts.seed_start,
        clip_rules=config.concepts.clip_rules or None,
        alter_templates=config.prompts.alter_templates or None,
        style_templates=config.prompts.style_templates or None,
    )
    state = PartialState()
    if state.is_main_process:
        writable_folder(out, where="output.dir", create=True)
        # a killed run's temporaries, once (images are written without a sweep per file; cached
        # features may never be written again)
        for folder in ("images", "features"):
            clean_stale_temps(out / folder, recursive=True)
        write_text(out / "config.toml", config.to_toml())
        write_text(out / "prompts.json", json.dumps([{**it.__dict__, "key": it.key} for it in items], indent=1))
    state.wait_for_everyone()
    log(f"{len(concepts)} concept(s), {len(items)} prompt items, {1 + len(config.checkpoints)} model(s)")
    for warning in alter_diversity_warnings(items):
        log(f"warning: {warning}")
    if pregenerate is not None and state.num_processes == 1 and not config.output.overwrite:
        pregenerate(config, items)
    images = generate_all(config, items, progress=progress)
    if not state.is_main_process:
        return EvalResult(out, None, None)
    raw = measure(config, concepts, items, images, progress=progress)
    path, ranking, findings = report(config, raw, images, items)
    log(f"report: {path}")
    return EvalResult(out, raw, path, ranking, findings)

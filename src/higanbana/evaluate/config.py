"""The evaluation's configuration: a TOML file validated like the trainer's (``higanbana.schema``).

```toml
[model]                      # the base model every checkpoint was trained from
pretrained = "sd15"          # a diffusers folder or a single .safetensors file
[concepts]
file = "concepts.toml"       # [[concept]] tables (higanbana.evaluate.prompts.concepts_from_toml)
[prompts]
types = ["train", "trigger", "alter", "style"]
n_images = 100
[encoders]
dinov2 = "models/dinov2-large"    # local folders / files only
clip = "models/clip-vit-large"
vgg19 = "models/vgg19.safetensors"
[output]
dir = "eval"

[[checkpoints]]              # one table per fine-tuned model
name = "lora-lr5e-4-e10"
path = "runs/lora/adapter-000010.safetensors"
params = { algo = "lora", lr = 5e-4, epoch = 10, seed = 1 }   # for the ranking and importance
```
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, nearest
from ..safeio import check_name
from ..schema import (
    SEED,
    apply_override,
    at_least,
    build_section,
    build_sections,
    check_fields,
    choice,
    load_toml,
    resolve_paths,
    sections_to_toml,
    unbounded,
)
from .prompts import CATEGORIES, PROMPT_TYPES, check_templates


@dataclass
class ModelSection:
    pretrained: str = ""  # the base model (required)
    kind: str = field(default="auto", metadata=choice("auto", "sd1", "sd2", "sdxl", "sd3", "flux"))
    config: str = ""  # a local diffusers folder with configs, for single files
    dtype: str = field(default="fp32", metadata=choice("fp32", "fp16", "bf16"))


@dataclass
class ConceptsSection:
    file: str = ""  # a TOML of [[concept]] tables (required)
    clip_rules: dict = field(default_factory=dict)  # category -> trigger rule for CLIP texts


@dataclass
class PromptsSection:
    types: list = field(default_factory=lambda: ["train", "trigger", "alter", "style"])
    n_images: int = field(default=100, metadata=at_least(1))  # per concept and prompt type
    seed_start: int = field(default=1000, metadata=SEED)
    # category -> templates with one "{}" (the descriptor); empty: the paper's 40 alter templates
    alter_templates: dict = field(default_factory=dict)
    style_templates: list = field(default_factory=list)  # templates with one "{}"; empty: the paper's 6


@dataclass
class GenerationSection:
    sampler: str = "ddim"
    steps: int = field(default=25, metadata=at_least(1))
    cfg_scale: float = field(default=7.0, metadata=at_least(0))
    width: int = field(default=512, metadata=at_least(8))  # a multiple of 8
    height: int = field(default=512, metadata=at_least(8))  # a multiple of 8
    negative_prompt: str = ""
    batch_size: int = field(default=4, metadata=at_least(1))


@dataclass
class EncodersSection:
    dinov2: str = ""  # a Dinov2Model folder (fidelity, diversity); a CLIPModel folder: its image tower
    clip: str = ""  # a local transformers CLIPModel folder with its tokenizer (controllability)
    vgg19: str = ""  # a torchvision VGG-19 state dict (base preservation); an AutoencoderKL/SD folder: VAE Grams
    quality: str = ""  # optional image-quality scorer, a plug-in "package.module:factory"
    image_size: int = field(default=224, metadata=at_least(1))
    letterbox: bool = True  # letterbox dataset images (the paper's choice); False: plain resize
    batch_size: int = field(default=32, metadata=at_least(1))


@dataclass
class OutputSection:
    dir: str = "eval-output"
    overwrite: bool = False  # regenerate images even when they exist (or settings changed)
    grid_images: int = field(default=8, metadata=at_least(0))  # images per model × prompt type in the report's grids


@dataclass
class ReportSection:
    title: str = "higanbana evaluation"
    group_by: str = "algo"  # the checkpoint parameter the tentative ranking compares
    features: list = field(default_factory=list)  # parameters for the importance analysis
    device: str = ""  # "cpu", "cuda"; default: what accelerate picks


@dataclass
class Checkpoint:
    name: str = ""
    path: str = ""
    strength: float = field(default=1.0, metadata=unbounded())  # any finite multiplier (negative: inverted)
    params: dict = field(default_factory=dict)


@dataclass
class EvalConfig:
    model: ModelSection = field(default_factory=ModelSection)
    concepts: ConceptsSection = field(default_factory=ConceptsSection)
    prompts: PromptsSection = field(default_factory=PromptsSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    encoders: EncodersSection = field(default_factory=EncodersSection)
    output: OutputSection = field(default_factory=OutputSection)
    report: ReportSection = field(default_factory=ReportSection)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    source: str = field(default="", compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> EvalConfig:
        data = dict(data)
        raw_checkpoints = data.pop("checkpoints", [])
        if not isinstance(raw_checkpoints, list):
            raise ConfigError(f"{where}: checkpoints must be an array of tables ([[checkpoints]])")
        checkpoints = [
            build_section(Checkpoint, c, f"{where}: checkpoints[{i}]") if isinstance(c, dict) else None
            for i, c in enumerate(raw_checkpoints)
        ]
        if None in checkpoints:
            raise ConfigError(f"{where}: every [[checkpoints]] entry must be a table")
        config = cls(**build_sections(cls, data, where), checkpoints=checkpoints, source=where)
        config.validate()
        return config

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> EvalConfig:
        path = Path(path)
        data = load_toml(path)
        resolve_paths(
            data,
            path.parent,
            {
                "model": ("pretrained", "config"),
                "concepts": ("file",),
                "encoders": ("dinov2", "clip", "vgg19"),
                "output": ("dir",),
            },
        )
        for c in data.get("checkpoints", []) if isinstance(data.get("checkpoints"), list) else []:
            if (
                isinstance(c, dict)
                and isinstance(c.get("path"), str)
                and c["path"]
                and not Path(c["path"]).is_absolute()
            ):
                c["path"] = str(path.parent / c["path"])
        for item in overrides:
            apply_override(data, item)
        return cls.from_dict(data, str(path))

    def validate(self) -> None:
        where = self.source or "config"
        if not self.model.pretrained:
            raise ConfigError(f"{where}: model.pretrained is required (the base model)")
        if not self.concepts.file:
            raise ConfigError(f"{where}: concepts.file is required (a TOML of [[concept]] tables)")
        for t in self.prompts.types:
            if t not in PROMPT_TYPES:
                raise ConfigError(f"{where}: prompts.types: unknown type {t!r}{nearest(str(t), PROMPT_TYPES)}")
        for section in dataclasses.fields(self):
            if section.name not in ("source", "checkpoints"):
                check_fields(getattr(self, section.name), f"{where}: {section.name}")
        for category, templates in self.prompts.alter_templates.items():
            if category not in CATEGORIES:
                raise ConfigError(
                    f"{where}: prompts.alter_templates: unknown category {category!r}{nearest(category, CATEGORIES)}"
                )
            check_templates(templates, f"{where}: prompts.alter_templates.{category}")
        check_templates(self.prompts.style_templates, f"{where}: prompts.style_templates")
        for key in ("width", "height"):
            value = getattr(self.generation, key)
            if value % 8:
                raise ConfigError(f"{where}: generation.{key} must be a multiple of 8 (the latent grid), got {value}")
        if self.report.device:
            import torch

            try:
                torch.device(self.report.device)
            except (RuntimeError, ValueError):
                raise ConfigError(
                    f"{where}: report.device: {self.report.device!r} is not a device (e.g. 'cpu', 'cuda', 'cuda:1')"
                ) from None
        if not self.output.dir:
            raise ConfigError(f"{where}: output.dir must name a folder")
        from ..models.pipeline import canonical_sampler  # lazy: models imports torch, this config does not

        try:
            canonical_sampler(self.generation.sampler)
        except ConfigError as exc:
            raise ConfigError(f"{where}: generation.sampler: {exc}") from None
        names: dict[str, str] = {}
        for i, c in enumerate(self.checkpoints):
            if not isinstance(c, Checkpoint):
                raise ConfigError(f"{where}: checkpoints[{i}] must be a [[checkpoints]] table")
            check_fields(c, f"{where}: checkpoints[{i}]")
            if not c.name or not c.path:
                raise ConfigError(f"{where}: checkpoints[{i}] needs a name and a path")
            # the name is a folder under output.dir/images and features: one plain path component
            check_name(c.name, f"{where}: checkpoints[{i}].name")
            if not re.fullmatch(r"[A-Za-z0-9._+=-]+", c.name) or c.name.casefold() == "base":
                raise ConfigError(
                    f"{where}: checkpoints[{i}].name {c.name!r} must be a plain file name "
                    "([A-Za-z0-9._+=-]) other than 'base'"
                )
            # folders of names that differ only in case are one folder on macOS and Windows
            key = c.name.casefold()
            if key in names:
                same = "" if names[key] == c.name else f" (as {names[key]!r}: names that differ only in case)"
                raise ConfigError(f"{where}: checkpoint name {c.name!r} is used twice{same}")
            names[key] = c.name

    def to_toml(self) -> str:
        data = dataclasses.asdict(self)
        data.pop("source")
        checkpoints = data.pop("checkpoints")
        text = sections_to_toml(data)
        for c in checkpoints:
            text += "\n" + sections_to_toml({"checkpoints": c}).replace("[checkpoints]", "[[checkpoints]]", 1)
        return text

"""``higanbana demo``: the paper's experiment in the miniature world, on a laptop CPU in minutes.

The shipped tiny Stable Diffusion (:func:`~higanbana.miniworld.shipped.shipped_model`) is
fine-tuned on the world's held-out concepts (an object, a style and a scene, trained together as
in the paper) with LoRA, LoHa, LoKr and native fine-tuning, each at two learning rates (the
columns of the paper's Table 1); every checkpoint is evaluated with the whole framework — the four
prompt types (train, trigger, alter, style) in the world's own language, fidelity and diversity on
the world CLIP's image features, controllability on its text-image alignment, base-model
preservation on Gram matrices of the world VAE's encoder — and the HTML report, the tentative
ranking (criteria × algorithms) and the correlations of fidelity with the other criteria are
written.

It is an ordinary ``higanbana experiment``: :func:`write_demo` writes the concept folders,
``concepts.toml``, ``train.toml``, ``eval.toml`` and ``grid.toml`` into the output folder (read
them to see how a real experiment is set up), and :func:`run_demo` runs that grid. A re-run skips
the finished training runs and reuses the cached images and features.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..safeio import writable_folder, write_text
from ..schema import toml_value
from ..workflows.experiment import run_experiment
from .shipped import shipped_model
from .world import CONCEPTS, write_concept_folder

__all__ = [
    "ALGORITHMS",
    "PLANS",
    "WORLD_ALTER_TEMPLATES",
    "WORLD_STYLE_TEMPLATES",
    "DemoPlan",
    "DemoResult",
    "format_summary",
    "ranking_column",
    "run_demo",
    "write_demo",
]

#: Content changes in the world's language, per concept category (one ``{}`` = the descriptor).
#: Three per category, so the demo's 6 images per prompt type give 2 per prompt: the alter
#: diversity is a Vendi score *per prompt*, which one image would pin to 1.
WORLD_ALTER_TEMPLATES: dict[str, list[str]] = {
    "object": [
        "{}, red, large, in the center, plain white background",
        "{}, blue, medium, on the left, striped yellow background",
        "{}, purple, large, at the bottom, orange gradient background",
    ],
    "style": [
        "{}, a large red circle in the center, plain white background",
        "{}, two medium blue squares on the left, striped yellow background",
        "{}, three small green stars at the top, dotted pink background",
    ],
    "scene": [
        "{}, a small red circle on the left",
        "{}, a medium blue square in the center",
        "{}, a small yellow star on the right",
    ],
}
#: Style changes in the world's language (the base world's rendering styles other than flat).
WORLD_STYLE_TEMPLATES: list[str] = ["{}, outlined style", "{}, pixelated style", "{}, pencil style"]

#: algorithm -> (network options, (lower, higher) learning rate). Scale 1 (alpha = rank) everywhere;
#: native fine-tuning trains the same layers directly, with learning rates ~10x lower.
ALGORITHMS: dict[str, tuple[dict[str, Any], tuple[float, float]]] = {
    "lora": ({"rank": 4, "alpha": 4}, (1e-3, 5e-3)),
    "loha": ({"rank": 4, "alpha": 4}, (1e-3, 5e-3)),
    "lokr": ({"rank": 100000, "factor": 4}, (1e-3, 5e-3)),
    "full": ({}, (1e-4, 5e-4)),
}


@dataclass(frozen=True)
class DemoPlan:
    """What the demo trains and evaluates (see :data:`PLANS`)."""

    concepts: tuple[str, ...] = tuple(CONCEPTS)
    algorithms: tuple[str, ...] = tuple(ALGORITHMS)
    both_learning_rates: bool = True  # False: the higher one only
    images_per_concept: int = 12
    repeats: int = 1
    batch_size: int = 4
    epochs: tuple[int, ...] = (10, 20)  # the checkpoints evaluated; every run trains to the last
    n_images: int = 6  # per concept and prompt type
    sampler_steps: int = 20
    cfg_scale: float = 4.0
    seeds: tuple[int, ...] = (0,)
    prompt_types: tuple[str, ...] = ("train", "trigger", "alter", "style")
    extra: dict[str, Any] = field(default_factory=dict)  # training-config overrides for every run

    def __post_init__(self) -> None:
        unknown = [c for c in self.concepts if c not in CONCEPTS]
        if unknown or not self.concepts:
            raise ConfigError(f"demo concepts must be among {sorted(CONCEPTS)}, got {list(self.concepts)}")
        unknown = [a for a in self.algorithms if a not in ALGORITHMS]
        if unknown or not self.algorithms:
            raise ConfigError(f"demo algorithms must be among {sorted(ALGORITHMS)}, got {list(self.algorithms)}")
        if min(self.epochs, default=0) < 1 or self.images_per_concept < 1 or self.n_images < 1:
            raise ConfigError("demo epochs, images_per_concept and n_images must be at least 1")


#: ``full``: the demo of ``make demo``; ``quick``: one concept, two algorithms, a few steps (tests).
PLANS: dict[str, DemoPlan] = {
    "full": DemoPlan(),
    "quick": DemoPlan(
        concepts=("zorb_toy",),
        algorithms=("lora", "lokr"),
        both_learning_rates=False,
        epochs=(8, 16),
        n_images=6,
        sampler_steps=10,
        prompt_types=("trigger", "alter", "style"),
    ),
}


def _toml(value: Any) -> str:
    return toml_value(value)


def write_demo(out: str | Path, plan: DemoPlan) -> Path:
    """Write the demo's experiment into ``out`` (data, concepts, train/eval configs, grid); returns
    the grid file. Paths inside are absolute, so the files can be re-run from anywhere."""
    out = Path(out).resolve()
    data = out / "data"
    writable_folder(out, where="demo --out", create=True)
    sd, clip = shipped_model("sd"), shipped_model("clip")
    concept_lines = []
    for name in plan.concepts:
        c = CONCEPTS[name]
        folder = write_concept_folder(name, data, n=plan.images_per_concept, repeats=plan.repeats)
        concept_lines += [
            "[[concept]]",
            f"name = {_toml(name)}",
            f"trigger = {_toml(c.trigger)}",
            f"class_word = {_toml(c.class_word)}",
            f"category = {_toml(c.category)}",
            f"images = {_toml(folder.as_posix())}",
            "",
        ]
    write_text(out / "concepts.toml", "\n".join(concept_lines))
    train = f"""# the shared training config of every demo run (the grid overrides algorithm and learning rate)
[model]
pretrained = {_toml(sd.as_posix())}
[network]
preset = "attn-mlp"
[data]
train_data_dir = {_toml(data.as_posix())}
resolution = 32
min_bucket_reso = 32
max_bucket_reso = 32
bucket_reso_steps = 8
batch_size = {plan.batch_size}
[optimizer]
type = "adamw"
weight_decay = 0.0
[training]
device = "cpu"
[save]
dtype = "fp32"
[logging]
log_with = "none"
"""
    write_text(out / "train.toml", train)
    alter = "\n".join(f"{cat} = {_toml(t)}" for cat, t in WORLD_ALTER_TEMPLATES.items())
    evaluation = f"""# the evaluation of every checkpoint (and the base model), with the world's own encoders
[model]
pretrained = {_toml(sd.as_posix())}
[concepts]
file = {_toml((out / "concepts.toml").as_posix())}
[prompts]
types = {_toml(list(plan.prompt_types))}
n_images = {plan.n_images}
style_templates = {_toml(WORLD_STYLE_TEMPLATES)}
[prompts.alter_templates]
{alter}
[generation]
sampler = "ddim"
steps = {plan.sampler_steps}
cfg_scale = {plan.cfg_scale}
width = 32
height = 32
batch_size = 32
[encoders]
dinov2 = {_toml(clip.as_posix())}   # the world CLIP's image tower: the DINO-like feature
clip = {_toml(clip.as_posix())}
vgg19 = {_toml(sd.as_posix())}      # the world VAE's encoder convs: the Gram style features
batch_size = 64
[output]
grid_images = 8
[report]
title = "higanbana demo: the miniature world"
device = "cpu"
"""
    write_text(out / "eval.toml", evaluation)
    grid = [
        "# configurations (algorithm x learning rate) x seeds x epochs: `higanbana experiment grid.toml`",
        f"out = {_toml(out.as_posix())}",
        'train = "train.toml"',
        'evaluate = "eval.toml"',
        f"seeds = {_toml(list(plan.seeds))}",
        f"epochs = {_toml(list(plan.epochs))}",
        "group_by = \"column\"  # the ranking's columns, as in the paper's Table 1 (see labels below)",
        "",
    ]
    for algo in plan.algorithms:
        options, lrs = ALGORITHMS[algo]
        for lr in lrs if plan.both_learning_rates else lrs[1:]:
            overrides = {"network.algo": algo, "network.options": options, "optimizer.unet_lr": lr, **plan.extra}
            grid += [
                "[[configs]]",
                f'name = "{algo}-lr{lr:g}"',
                "set = {" + ", ".join(f"{_toml(k)} = {_toml(v)}" for k, v in overrides.items()) + "}",
                f"labels = {{ column = {_toml(ranking_column(algo, lr))} }}",
                "",
            ]
    path = out / "grid.toml"
    write_text(path, "\n".join(grid))
    return path


@dataclass
class DemoResult:
    """Where the demo's outputs are and what it found."""

    out: Path
    report: Path | None
    ranking: Any  # criteria x algorithms (pandas DataFrame), 1 = worst
    criteria: Any  # model x criterion mean scores
    fidelity_correlations: Any  # pandas Series
    trigger_fidelity: Any  # concept x model: fidelity_cos on the <trigger> prompt
    seconds: float
    summary: str = ""


def ranking_column(algo: str, lr: float) -> str:
    """A run's column in the ranking, as in the paper's Table 1: each LyCORIS algorithm over both
    learning rates, native fine-tuning per learning rate (its two columns differ most)."""
    return f"native lr {lr:g}" if algo == "full" else algo


def _analyse(raw: Any) -> tuple[Any, Any, Any]:
    """Per-model criterion scores, fidelity correlations and fidelity on <trigger> of ``raw``."""
    from ..evaluate import aggregate as A  # lazy: aggregate imports pandas

    scores = A.rank_normalize(raw)
    fid = A.fidelity_correlations(A.correlations(scores))
    trig = raw[(raw["metric"] == "fidelity_cos") & (raw["prompt_type"] == "trigger")]
    trigger_fidelity = trig.pivot_table(index="concept", columns="model", values="value", aggfunc="mean")
    return A.criterion_scores(scores), fid, trigger_fidelity


#: fewer fine-tuned checkpoints than this and a correlation over them is noise, whatever its value
MIN_CHECKPOINTS_FOR_CORRELATION = 8


def format_summary(result: DemoResult) -> str:
    """The tables the demo prints: ranking, fidelity correlations, fidelity on <trigger> — with a
    caveat where the checkpoints are too few for the correlations to mean anything."""
    checkpoints = sum(1 for model in result.criteria.index if model != "base")
    caveat = []
    if checkpoints < MIN_CHECKPOINTS_FOR_CORRELATION:
        caveat = [
            f"(n too small: {checkpoints} fine-tuned checkpoint(s); a correlation over so few says nothing, "
            "whatever its value — the full plan has 16)"
        ]
    lines = [
        "Tentative ranking (the paper's Table 1; rank among the algorithms, higher = better):",
        result.ranking.to_string(),
        "",
        "Pearson correlation of fidelity with the other criteria (over models x concepts):",
        result.fidelity_correlations.round(2).to_string(),
        *caveat,
        "",
        "Fidelity (cosine to the training images) on the <trigger> prompt, base vs fine-tuned:",
        result.trigger_fidelity.round(3).T.to_string(),
        "",
        f"report: {result.report}",
        f"{result.seconds / 60:.1f} min",
    ]
    return "\n".join(lines)


def run_demo(
    out: str | Path = "demo-output",
    plan: str | DemoPlan = "full",
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Write the demo's experiment into ``out`` and run it (training, evaluation, report); returns
    the tables also written to ``out/summary.txt`` and ``out/summary.json``."""
    import torch

    if isinstance(plan, str):
        if plan not in PLANS:
            raise ConfigError(f"unknown demo plan {plan!r}; expected one of {sorted(PLANS)}")
        plan = PLANS[plan]
    start = time.perf_counter()
    grid = write_demo(out, plan)
    log(f"demo: {grid.parent} ({len(plan.concepts)} concept(s), algorithms {', '.join(plan.algorithms)})")
    with torch.random.fork_rng(devices=[]):
        result = run_experiment(grid, progress=progress, log=log)
    # the grid groups by the "column" label, so the evaluation's ranking has the paper's columns
    ranking = result.ranking
    per_model, fid, trig = _analyse(result.raw)
    demo = DemoResult(grid.parent, result.report, ranking, per_model, fid, trig, time.perf_counter() - start)
    demo.summary = format_summary(demo)
    summary = {
        "ranking": json.loads(ranking.astype(float).to_json()),
        "criteria": json.loads(per_model.to_json()),
        "fidelity_correlations": {f"{a} ~ {b}": v for (a, b), v in fid.items()},
        "trigger_fidelity": json.loads(trig.to_json()),
        "seconds": round(demo.seconds, 1),
    }
    for name, text in (("summary.txt", demo.summary), ("summary.json", json.dumps(summary, indent=1))):
        write_text(grid.parent / name, text + "\n")
    log(demo.summary)
    return demo

"""``higanbana demo``: the paper's experiment in the miniature world, on a laptop CPU in minutes.

The shipped tiny Stable Diffusion (:func:`~higanbana.miniworld.shipped.shipped_model`) is
fine-tuned on the world's held-out concepts (an object, a style and a scene, trained together as
in the paper) with LoRA, LoHa, LoKr and native fine-tuning, each at two learning rates (the
columns of the paper's Table 1), and LoRA at twice the rank, over three seeds; every checkpoint is
evaluated with the whole framework — the four prompt types (train, trigger, alter, style) in the
world's own language, fidelity and diversity on the world CLIP's image features, controllability
on its text-image alignment, base-model preservation on Gram matrices of the world VAE's encoder —
and the HTML report, the tentative ranking (criteria × algorithms) and the paper's findings, each
with a bootstrap interval and a verdict (:mod:`higanbana.evaluate.findings`), are written.

Every process runs one torch thread, and the runs (then the images) are spread over worker
processes (:func:`demo_workers`): one per usable core on an idle machine, more on a busy one. A
many-thread torch process stalls on shared cores while one-thread processes only slow down in
proportion, and the scheduler shares a busy machine per process (docs/benchmarks.md). The first
line says how long it should take here, from a short speed probe.

It is an ordinary ``higanbana experiment``: :func:`write_demo` writes the concept folders,
``concepts.toml``, ``train.toml``, ``eval.toml`` and ``grid.toml`` into the output folder (read
them to see how a real experiment is set up), and :func:`run_demo` runs that grid. A re-run skips
the finished training runs and reuses the cached images and features.
"""

from __future__ import annotations

import json
import os
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
    "demo_workers",
    "estimate_minutes",
    "format_summary",
    "plan_configs",
    "ranking_column",
    "run_demo",
    "speed_probe",
    "usable_cores",
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
    capacity_variant: bool = True  # LoRA at twice the rank (alpha = rank kept), for "larger capacity"
    images_per_concept: int = 12
    repeats: int = 1
    batch_size: int = 4
    epochs: tuple[int, ...] = (10, 20)  # the checkpoints evaluated; every run trains to the last
    n_images: int = 6  # per concept and prompt type
    sampler_steps: int = 10  # DDIM
    cfg_scale: float = 4.0
    seeds: tuple[int, ...] = (0, 1, 2)  # several, so each finding gets an interval
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
        capacity_variant=False,
        epochs=(8, 16),
        n_images=6,
        sampler_steps=10,
        prompt_types=("trigger", "alter", "style"),
        seeds=(0,),
    ),
}

#: The reference run (2 idle cores of an AMD EPYC, one torch thread per process, 2026-12-07): the
#: speed probe's CPU seconds there, and the worker-seconds of one run's training (27 runs took 6.1
#: min on 2 workers) and of one model's evaluation (55 models in the remaining 6.5 min, images on 2
#: workers, features and report in one process), for the time estimate.
REFERENCE_SECONDS = {"probe": 0.21, "train_run": 27.0, "evaluate_model": 14.2}


def demo_workers(cores: int, load: float, runs: int) -> int:
    """Worker processes for ``runs`` on ``cores`` usable cores with a 1-minute load average of
    ``load``: one per core when idle; on a busy machine one more per unit of load (up to 4 per
    core), so the demo keeps about the share of the machine it has when idle (the scheduler shares
    the cores per process: 2 workers among 8 busy processes get a fifth of 2 cores, 8 get half)."""
    extra = max(0, round(load - cores / 2))
    return max(1, min(runs, cores + extra, 4 * cores))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def speed_probe() -> float:
    """CPU seconds of a fixed float32 matrix workload on one thread (the estimate's yardstick)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
        start = time.process_time()
        for _ in range(400):
            a = torch.tanh(a @ a * 0.01)
        return time.process_time() - start
    finally:
        torch.set_num_threads(threads)


def estimate_minutes(plan: DemoPlan, workers: int, probe: float) -> float:
    """Wall minutes the plan should take on ``workers`` idle cores as fast as ``probe`` says."""
    runs = len(plan_configs(plan)) * len(plan.seeds)
    models = runs * len(plan.epochs) + 1
    scale = plan.n_images / 6 * plan.sampler_steps / 10 * len(plan.prompt_types) / 4 * len(plan.concepts) / 3
    work = runs * REFERENCE_SECONDS["train_run"] * max(plan.epochs) / 20 * len(plan.concepts) / 3
    work += models * REFERENCE_SECONDS["evaluate_model"] * scale
    return work * probe / REFERENCE_SECONDS["probe"] / max(1, min(workers, runs)) / 60


#: The capacity variant: LoRA at rank 8 (alpha 8, so the scale stays 1) and the higher learning rate;
#: its column is LoRA's (the paper's Table 1 averages every configuration of an algorithm).
CAPACITY_VARIANT: tuple[str, dict[str, Any], float] = ("lora", {"rank": 8, "alpha": 8}, 5e-3)


def plan_configs(plan: DemoPlan) -> list[tuple[str, str, dict[str, Any], float, int]]:
    """(name, algorithm, network options, learning rate, capacity) of every configuration of the
    plan; capacity is the paper's coding (1 the default, 2 the larger variant)."""
    configs = [
        (f"{algo}-lr{lr:g}", algo, ALGORITHMS[algo][0], lr, 1)
        for algo in plan.algorithms
        for lr in (ALGORITHMS[algo][1] if plan.both_learning_rates else ALGORITHMS[algo][1][1:])
    ]
    algo, options, lr = CAPACITY_VARIANT
    if plan.capacity_variant and algo in plan.algorithms:
        configs.append((f"{algo}-r{options['rank']}-lr{lr:g}", algo, options, lr, 2))
    return configs


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
    for name, algo, options, lr, capacity in plan_configs(plan):
        overrides = {"network.algo": algo, "network.options": options, "optimizer.unet_lr": lr, **plan.extra}
        grid += [
            "[[configs]]",
            f"name = {_toml(name)}",
            "set = {" + ", ".join(f"{_toml(k)} = {_toml(v)}" for k, v in overrides.items()) + "}",
            f"labels = {{ column = {_toml(ranking_column(algo, lr))}, capacity = {capacity} }}",
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
    findings: Any = None  # evaluate.findings.Findings: the paper's findings with intervals and verdicts
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
    # one column per configuration and epoch, the mean over its seeds ("lora-lr0.005-s1-e20" -> "lora-lr0.005-e20")
    checkpoint = trig["model"].astype(str).str.replace(r"-s\d+(?=-e\d+$)", "", regex=True)
    trigger_fidelity = trig.pivot_table(index="concept", columns=checkpoint, values="value", aggfunc="mean")
    trigger_fidelity.columns.name = "model"
    return A.criterion_scores(scores), fid, trigger_fidelity


def format_summary(result: DemoResult) -> str:
    """The tables the demo prints: ranking, the paper's findings (each with its interval and verdict,
    "n too small" where the checkpoints are too few), fidelity on <trigger>."""
    from ..evaluate.findings import format_findings  # lazy: pandas

    lines = [
        "Tentative ranking (the paper's Table 1; rank among the algorithms, higher = better):",
        result.ranking.to_string(),
        "",
        *([format_findings(result.findings), ""] if result.findings is not None else []),
        "Fidelity (cosine to the training images) on the <trigger> prompt, base vs fine-tuned (mean over seeds):",
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
    workers: int | None = None,
) -> DemoResult:
    """Write the demo's experiment into ``out`` and run it (training, evaluation, report); returns
    the tables also written to ``out/summary.txt`` and ``out/summary.json``. ``workers``: processes
    of one torch thread each (default: the usable cores)."""
    import torch

    if isinstance(plan, str):
        if plan not in PLANS:
            raise ConfigError(f"unknown demo plan {plan!r}; expected one of {sorted(PLANS)}")
        plan = PLANS[plan]
    if workers is not None and workers < 1:
        raise ConfigError(f"demo --workers must be at least 1, got {workers}")
    cores = usable_cores()
    configs = len(plan_configs(plan))
    runs = configs * len(plan.seeds)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    workers = workers or demo_workers(cores, busy, runs)
    minutes = estimate_minutes(plan, min(workers, cores), speed_probe())
    when = f"about {minutes:.0f} min" if minutes >= 10 else f"about {minutes:.1f} min"
    if busy >= cores:
        when += f" if it were idle (it is busy: load {busy:.1f} on {cores} cores)"
    log(
        f"demo: {runs} training runs ({configs} configurations × {len(plan.seeds)} seeds), then "
        f"{runs * len(plan.epochs) + 1} models evaluated, in {min(workers, runs)} process(es) × 1 torch thread; "
        f"{when} on this machine; Ctrl-C stops it and a re-run resumes"
    )
    start = time.perf_counter()
    grid = write_demo(out, plan)
    log(f"demo: {grid.parent} ({len(plan.concepts)} concept(s), algorithms {', '.join(plan.algorithms)})")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this process's share of the work (ranking, features) on one thread too
    try:
        with torch.random.fork_rng(devices=[]):
            result = run_experiment(grid, progress=progress, log=log, workers=min(workers, runs), threads=1)
    finally:
        torch.set_num_threads(threads)
    # the grid groups by the "column" label, so the evaluation's ranking has the paper's columns
    ranking = result.ranking
    per_model, fid, trig = _analyse(result.raw)
    demo = DemoResult(
        grid.parent, result.report, ranking, per_model, fid, trig, time.perf_counter() - start, result.findings
    )
    demo.summary = format_summary(demo)
    summary = {
        "ranking": json.loads(ranking.astype(float).to_json()),
        "criteria": json.loads(per_model.to_json()),
        "fidelity_correlations": {f"{a} ~ {b}": v for (a, b), v in fid.items()},
        "trigger_fidelity": json.loads(trig.to_json()),
        "findings": json.loads(result.findings.table.to_json(orient="records")) if result.findings else [],
        "seconds": round(demo.seconds, 1),
    }
    for name, text in (("summary.txt", demo.summary), ("summary.json", json.dumps(summary, indent=1))):
        write_text(grid.parent / name, text + "\n")
    log(demo.summary)
    return demo

"""The paper's metrics (docs/design.md §5), as pure functions of feature tensors.

Every function takes features ``(n, d)`` (any float dtype; computed in float64) and returns Python
floats or CPU tensors, so the metrics of 15,000 images cost milliseconds next to generation.

- **Fidelity**: ``S_C = mean_{i,j} ⟨ẑ1_i, ẑ2_j⟩`` over all cross pairs of L2-normalised features, and
  the squared centroid distance ``SCD = ‖mean(ẑ1) − mean(ẑ2)‖²``. With ``Var(Ẑ) = mean ‖ẑ − z̄‖²``,
  ``1 − S_C = ½(SCD + Var1 + Var2)``: the average cosine rewards low diversity, SCD does not.
- **Controllability**: the mean over images of ``cos(image_i, text_i)``, each image with its own
  (trigger-processed) prompt.
- **Diversity**: the Vendi score ``exp(−Σ λ log λ)``, λ the eigenvalues of ``K/n`` with
  ``K_ij = cos(z_i, z_j)`` (``0·log 0 = 0``): 1 for identical images, n for orthogonal ones.
- **Base-model preservation**: the style loss ``Σ_layers ‖G(x) − G(x′)‖²_F`` between paired images
  (same prompt and seed) of the base and the fine-tuned model, ``G = ψψᵀ/(c·h·w)``.

**The registry.** Each metric the evaluation measures is one :func:`declare` next to its function: its
name, criterion, direction, report label, inputs (:data:`INPUTS`), the prompt types it is measured on
and those its criterion is ranked on. ``run.measure``, the aggregation (rank normalisation, ranking,
correlations, importance) and the report read :func:`registry`, so a new metric is one declaration;
:func:`registered` adds metrics for the span of a ``with`` block (tests, plug-ins).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import MappingProxyType

import torch
from torch import Tensor

from ..errors import HiganbanaError, nearest
from .prompts import PROMPT_TYPES

__all__ = [
    "BASE_PRESERVATION",
    "CONTROLLABILITY",
    "DIVERSITY",
    "FIDELITY",
    "INPUTS",
    "QUALITY",
    "Input",
    "Metric",
    "centroid_distance",
    "cosine_similarity",
    "declare",
    "fidelity",
    "gram",
    "normalize",
    "register",
    "registered",
    "registry",
    "spread_variance",
    "style_loss",
    "text_alignment",
    "vendi",
    "vendi_per_group",
]


def _features(z: Tensor, what: str) -> Tensor:
    z = torch.as_tensor(z)
    if z.ndim != 2 or z.shape[0] == 0:
        raise HiganbanaError(f"{what}: expected features of shape (n ≥ 1, d), got {tuple(z.shape)}")
    return z.detach().to("cpu", torch.float64)


def normalize(z: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm (float64)."""
    z = _features(z, "features")
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)


def cosine_similarity(z1: Tensor, z2: Tensor) -> float:
    """``S_C``: the mean cosine over all ``n·m`` cross pairs (= ⟨mean ẑ1, mean ẑ2⟩)."""
    a, b = normalize(z1), normalize(z2)
    return float(a.mean(0) @ b.mean(0))


def centroid_distance(z1: Tensor, z2: Tensor) -> float:
    """``SCD = ‖mean(ẑ1) − mean(ẑ2)‖²`` of the normalised features (lower is closer)."""
    a, b = normalize(z1), normalize(z2)
    return float((a.mean(0) - b.mean(0)).square().sum())


def spread_variance(z: Tensor) -> float:
    """``Var(Ẑ) = mean_i ‖ẑ_i − mean(ẑ)‖² = 1 − ‖mean(ẑ)‖²`` of the normalised features."""
    a = normalize(z)
    return float((a - a.mean(0)).square().sum(1).mean())


def fidelity(generated: Tensor, reference: Tensor) -> dict[str, float]:
    """``{"fidelity_cos": S_C, "fidelity_scd": SCD}`` of generated vs training-image features."""
    return {
        "fidelity_cos": cosine_similarity(generated, reference),
        "fidelity_scd": centroid_distance(generated, reference),
    }


def text_alignment(image_features: Tensor, text_features: Tensor, *, per_image: bool = False) -> float | Tensor:
    """The mean of ``cos(image_i, text_i)`` (or the per-image values with ``per_image``)."""
    a, b = normalize(image_features), normalize(text_features)
    if a.shape != b.shape:
        raise HiganbanaError(f"text_alignment: {a.shape[0]} images but {b.shape[0]} texts (or dims differ)")
    cos = (a * b).sum(1)
    return cos if per_image else float(cos.mean())


def vendi(z: Tensor) -> float:
    """The Vendi score of a set (linear kernel on normalised features)."""
    a = normalize(z)
    n = a.shape[0]
    eig = torch.linalg.eigvalsh(a @ a.T / n).clamp_min(0)
    eig = eig[eig > 0]
    return float(torch.exp(-(eig * eig.log()).sum()))


def vendi_per_group(z: Tensor, groups: Sequence[int]) -> float:
    """The mean of the Vendi scores of each group (``<alter>``: one group per prompt)."""
    a = _features(z, "features")
    groups = list(groups)
    if len(groups) != a.shape[0]:
        raise HiganbanaError(f"vendi_per_group: {a.shape[0]} features but {len(groups)} group labels")
    labels = sorted(set(groups))
    scores = [vendi(a[[i for i, g in enumerate(groups) if g == label]]) for label in labels]
    return sum(scores) / len(scores)


def gram(activation: Tensor) -> Tensor:
    """``G = ψψᵀ/(c·h·w)`` of activations ``(n, c, h, w)`` → ``(n, c, c)``."""
    n, c = activation.shape[:2]
    psi = activation.reshape(n, c, -1).to(torch.float64)
    return psi @ psi.transpose(1, 2) / (c * psi.shape[-1])


def style_loss(grams_a: Sequence[Tensor], grams_b: Sequence[Tensor], *, per_pair: bool = False) -> float | Tensor:
    """``Σ_layers ‖G_a − G_b‖²_F`` per pair of images (same index in both), averaged over pairs."""
    if len(grams_a) != len(grams_b):
        raise HiganbanaError(f"style_loss: {len(grams_a)} vs {len(grams_b)} Gram layers")
    total = None
    for ga, gb in zip(grams_a, grams_b, strict=True):
        if ga.shape != gb.shape:
            raise HiganbanaError(f"style_loss: Gram shapes differ, {tuple(ga.shape)} vs {tuple(gb.shape)}")
        d = (ga.to(torch.float64) - gb.to(torch.float64)).square().flatten(1).sum(1)
        total = d if total is None else total + d
    if total is None:
        raise HiganbanaError("style_loss: no Gram layers")
    return total if per_pair else float(total.mean())


# ----------------------------------------------------------------------------- the registry

FIDELITY = "Fidelity"
CONTROLLABILITY = "Controllability"
DIVERSITY = "Diversity"
BASE_PRESERVATION = "Base preservation"
QUALITY = "Image quality"


@dataclass(frozen=True)
class Input:
    """Something a metric asks ``measure`` for, computed once per (model, concept, prompt type) set."""

    doc: str
    slot: str | None = None  # the ``encoders.*`` slot that computes it; None: read from the prompts
    optional: bool = False  # the slot may be unset: the metrics that need it are then not measured
    against_base: bool = False  # pairs the set with the base model's images: not measured for the base model


INPUTS = MappingProxyType(
    {
        "image_features": Input("DINOv2 features (n, d) of the set's generated images", "dinov2"),
        "train_features": Input("DINOv2 features (m, d) of the concept's training images", "dinov2"),
        "clip_image_features": Input("CLIP image features (n, d) of the set's generated images", "clip"),
        "clip_text_features": Input("CLIP text features (n, d) of each image's processed prompt", "clip"),
        "style_grams": Input(
            "(Gram layers of up to 8 generated images, the base model's Gram layers for the same prompts and "
            "seeds) pairs, computed chunk by chunk as they are iterated",
            "vgg19",
            against_base=True,
        ),
        "quality_scores": Input("per-image scores (n,) of the quality scorer", "quality", optional=True),
        "prompt_type": Input("the set's prompt type"),
        "prompt_indices": Input("each image's prompt index within its prompt type (n,)"),
    }
)
"""Input name -> what it is; a metric's ``compute`` receives its inputs as keyword arguments."""


@dataclass(frozen=True)
class Metric:
    """One metric's declaration: all that measuring, aggregation and the report know about it."""

    name: str  # the raw table's ``metric`` value
    criterion: str  # FIDELITY, CONTROLLABILITY, DIVERSITY, BASE_PRESERVATION, QUALITY, or a new one
    direction: str  # "higher" or "lower" is better
    label: str  # its name in the report
    inputs: tuple[str, ...]  # names in INPUTS, passed to ``compute`` by keyword
    compute: Callable[..., float]
    prompt_types: tuple[str, ...] = PROMPT_TYPES  # the prompt types it is measured on
    ranked_on: tuple[str, ...] = ()  # the prompt types its criterion's ranking averages; () = not ranked

    @property
    def against_base(self) -> bool:
        """Whether it compares a set with the base model's images (so the base model has no value)."""
        return any(INPUTS[name].against_base for name in self.inputs)

    def measured_on(self, prompt_type: str, *, base_model: bool) -> bool:
        """Whether it has a value for a set of this prompt type (of the base model when ``base_model``)."""
        return prompt_type in self.prompt_types and not (base_model and self.against_base)


_REGISTRY: dict[str, Metric] = {}


def registry() -> tuple[Metric, ...]:
    """The registered metrics in declaration order (the order of the report's columns)."""
    return tuple(_REGISTRY.values())


def _check(metric: Metric) -> None:
    where = f"metric {metric.name!r}"
    if not metric.name or not isinstance(metric.name, str):
        raise HiganbanaError(f"a metric needs a non-empty name, got {metric.name!r}")
    if metric.name in _REGISTRY:
        raise HiganbanaError(f"{where} is already registered")
    if metric.direction not in ("higher", "lower"):
        raise HiganbanaError(f"{where}: direction must be 'higher' or 'lower', not {metric.direction!r}")
    for name in metric.inputs:
        if name not in INPUTS:
            raise HiganbanaError(f"{where}: unknown input {name!r}{nearest(name, INPUTS)}; inputs: {sorted(INPUTS)}")
    try:
        inspect.signature(metric.compute).bind(**dict.fromkeys(metric.inputs))
    except TypeError as e:
        raise HiganbanaError(
            f"{where}: compute does not take its inputs {list(metric.inputs)} by keyword ({e})"
        ) from None
    if not metric.prompt_types:
        raise HiganbanaError(f"{where}: prompt_types is empty")
    for pt in metric.prompt_types:
        if pt not in PROMPT_TYPES:
            raise HiganbanaError(f"{where}: unknown prompt type {pt!r}{nearest(str(pt), PROMPT_TYPES)}")
    if not set(metric.ranked_on) <= set(metric.prompt_types):
        raise HiganbanaError(f"{where}: ranked_on {metric.ranked_on} is not within prompt_types {metric.prompt_types}")
    if metric.ranked_on:
        for other in _REGISTRY.values():
            if other.ranked_on and other.criterion == metric.criterion:
                raise HiganbanaError(f"{where}: criterion {metric.criterion!r} is already ranked by {other.name!r}")


def register(metric: Metric) -> Metric:
    """Add ``metric`` to the registry (checked first: a bad declaration fails here, not mid-evaluation)."""
    metric = replace(
        metric,
        inputs=tuple(metric.inputs),
        prompt_types=tuple(metric.prompt_types),
        ranked_on=tuple(metric.ranked_on),
    )
    _check(metric)
    _REGISTRY[metric.name] = metric
    return metric


def declare(
    name: str,
    *,
    criterion: str,
    direction: str,
    label: str,
    inputs: Sequence[str],
    prompt_types: Sequence[str] = PROMPT_TYPES,
    ranked_on: Sequence[str] = (),
) -> Callable[[Callable[..., float]], Callable[..., float]]:
    """Decorator: register the function as the metric ``name`` (the fields of :class:`Metric`)."""

    def decorate(compute: Callable[..., float]) -> Callable[..., float]:
        register(
            Metric(name, criterion, direction, label, tuple(inputs), compute, tuple(prompt_types), tuple(ranked_on))
        )
        return compute

    return decorate


@contextmanager
def registered(*metrics: Metric) -> Iterator[tuple[Metric, ...]]:
    """Register ``metrics`` for the ``with`` block; on exit the registry is restored as it was (metrics
    declared inside the block are removed too), even when the block raises."""
    saved = dict(_REGISTRY)
    try:
        yield tuple(register(m) for m in metrics)
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


# ----------------------------------------------------------------------------- the paper's metrics


@declare(
    "fidelity_cos",
    criterion=FIDELITY,
    direction="higher",
    label="Image similarity (cos)",
    inputs=("image_features", "train_features"),
    ranked_on=("train", "trigger", "alter"),
)
def _fidelity_cos(image_features: Tensor, train_features: Tensor) -> float:
    return cosine_similarity(image_features, train_features)


@declare(
    "fidelity_scd",
    criterion=FIDELITY,
    direction="lower",
    label="Image similarity (SCD)",
    inputs=("image_features", "train_features"),
)
def _fidelity_scd(image_features: Tensor, train_features: Tensor) -> float:
    return centroid_distance(image_features, train_features)


@declare(
    "text_alignment",
    criterion=CONTROLLABILITY,
    direction="higher",
    label="Text similarity",
    inputs=("clip_image_features", "clip_text_features"),
    ranked_on=("alter",),
)
def _text_alignment(clip_image_features: Tensor, clip_text_features: Tensor) -> float:
    return text_alignment(clip_image_features, clip_text_features)


@declare(
    "vendi",
    criterion=DIVERSITY,
    direction="higher",
    label="Vendi",
    inputs=("image_features", "prompt_type", "prompt_indices"),
    ranked_on=("trigger", "alter"),
)
def _vendi(image_features: Tensor, prompt_type: str, prompt_indices: list[int]) -> float:
    # <alter>: one prompt per content change, so diversity within each prompt, averaged
    return vendi_per_group(image_features, prompt_indices) if prompt_type == "alter" else vendi(image_features)


@declare(
    "style_loss",
    criterion=BASE_PRESERVATION,
    direction="lower",
    label="Style preservation (loss)",
    inputs=("style_grams",),
    prompt_types=("style",),
    ranked_on=("style",),
)
def _style_loss(style_grams) -> float:
    return float(torch.cat([style_loss(ga, gb, per_pair=True) for ga, gb in style_grams]).mean())


@declare("quality", criterion=QUALITY, direction="higher", label="Image quality", inputs=("quality_scores",))
def _quality(quality_scores: Tensor) -> float:
    return float(quality_scores.float().mean())

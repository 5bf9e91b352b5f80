"""The paper's metrics (DESIGN.md §5), as pure functions of feature tensors.

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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import HiganbanaError

__all__ = [
    "centroid_distance",
    "cosine_similarity",
    "fidelity",
    "gram",
    "normalize",
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

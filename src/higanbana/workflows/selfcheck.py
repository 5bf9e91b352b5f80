"""``higanbana selfcheck``: every algorithm on a tiny SD UNet — train, save, reload, compare.

Wraps a tiny randomly initialised diffusers UNet with each algorithm, trains it a few dozen Adam
steps toward a synthetic teacher (the same UNet with perturbed weights), saves the adapters to
safetensors, reloads them on a fresh UNet and reports parameters, losses, file size,
merged-vs-bypass error, reload error and time: a one-minute check that an installation works.
(The demo of the paper's experiment is ``higanbana demo``, in :mod:`higanbana.miniworld.demo`.)
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms import algorithm_classes
from ..errors import ConfigError, nearest
from ..formats import load_network, save_network
from ..models.tiny import tiny_sd_unet, tiny_unet_inputs
from ..network import AdapterNetwork
from ..safeio import writable_folder


def selfcheck_setups() -> list[tuple[str, str, dict[str, Any], float]]:
    """``(label, algorithm, options, learning rate)``: every registered algorithm's ``examples``."""
    return [(label, cls.algo, dict(options), lr) for cls in algorithm_classes() for label, options, lr in cls.examples]


_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")


def select_layers(algo: str):
    """Norms for ``norm``; every Linear and Conv2d inside the UNet's blocks otherwise."""
    kinds = (nn.LayerNorm, nn.GroupNorm) if algo == "norm" else (nn.Linear, nn.Conv2d)
    return lambda path, module: path.startswith(_BLOCKS) and isinstance(module, kinds)


@dataclass
class SelfcheckRow:
    label: str
    algo: str
    modules: int
    trainable: int
    loss_before: float
    loss_after: float
    file_kib: float
    mode_error: float
    reload_error: float
    seconds: float


@torch.no_grad()
def make_teacher(unet: nn.Module, seed: int = 1, strength: float = 0.2) -> nn.Module:
    """The synthetic target: a copy of ``unet`` whose block weights are perturbed at random."""
    teacher = copy.deepcopy(unet)
    gen = torch.Generator().manual_seed(seed)
    for path, module in teacher.named_modules():
        if path.startswith(_BLOCKS) and isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm)):
            w = module.weight
            w.add_(torch.randn(w.shape, generator=gen) * w.std().clamp_min(1e-3) * strength)
    return teacher.eval().requires_grad_(False)


def _loss(unet: nn.Module, batch: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(unet(**batch).sample, target)


def run_setup(label: str, algo: str, options: dict[str, Any], lr: float, steps: int, out_dir: Path) -> SelfcheckRow:
    start = time.perf_counter()
    unet = tiny_sd_unet(seed=0).requires_grad_(False)
    teacher = make_teacher(unet)
    batches = [tiny_unet_inputs(batch=2, seed=s) for s in range(4)]
    with torch.no_grad():
        targets = [teacher(**b).sample for b in batches]
    net = AdapterNetwork(unet, algo, select_layers(algo), prefix="lora_unet", **options).attach()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.eval()
    with torch.no_grad():
        before = sum(float(_loss(unet, b, t)) for b, t in zip(batches, targets, strict=True)) / len(batches)
    net.train()
    for step in range(steps):
        b, t = batches[step % len(batches)], targets[step % len(targets)]
        opt.zero_grad(set_to_none=True)
        _loss(unet, b, t).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        after = sum(float(_loss(unet, b, t)) for b, t in zip(batches, targets, strict=True)) / len(batches)
        probe = batches[0]
        net.set_forward_mode("merged")
        merged = unet(**probe).sample
        net.set_forward_mode("bypass")
        bypass = unet(**probe).sample
        net.set_forward_mode("auto")
        trained = unet(**probe).sample
    path = save_network(net, out_dir / f"{label}.safetensors")
    fresh = tiny_sd_unet(seed=0).requires_grad_(False)
    load_network(path, fresh).attach().eval()
    with torch.no_grad():
        reloaded = fresh(**probe).sample
    return SelfcheckRow(
        label,
        algo,
        len(net.adapters),
        net.trainable_parameters(),
        before,
        after,
        path.stat().st_size / 1024,
        float((merged - bypass).abs().max()),
        float((reloaded - trained).abs().max()),
        time.perf_counter() - start,
    )


def run_selfcheck(
    out_dir: str | Path = "selfcheck-output", steps: int = 40, only: list[str] | None = None
) -> list[SelfcheckRow]:
    """Run every setup (or those in ``only``) and return one row each."""
    out = Path(out_dir)
    every = selfcheck_setups()
    labels = [s[0] for s in every]
    setups = [s for s in every if not only or s[0] in only]
    unknown = set(only or ()) - set(labels)
    if unknown:
        first = sorted(unknown)[0]
        raise ConfigError(f"unknown selfcheck setup(s) {sorted(unknown)}{nearest(first, labels)}; choose from {labels}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"selfcheck --steps must be a whole number ≥ 1, got {steps!r}")
    writable_folder(out, where="selfcheck --out")  # before the training, not after it
    rows = []
    for label, algo, options, lr in tqdm(setups, desc="selfcheck", unit="algo"):
        rows.append(run_setup(label, algo, options, lr, steps, out))
    return rows


def format_table(rows: list[SelfcheckRow]) -> str:
    header = (
        f"{'algorithm':<12} {'modules':>7} {'trainable':>10} {'loss before':>12} {'loss after':>11} "
        f"{'file KiB':>9} {'merged-vs-bypass':>17} {'reload err':>11} {'seconds':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.label:<12} {r.modules:>7} {r.trainable:>10,} {r.loss_before:>12.5f} {r.loss_after:>11.5f} "
            f"{r.file_kib:>9.1f} {r.mode_error:>17.2e} {r.reload_error:>11.2e} {r.seconds:>8.2f}"
        )
    return "\n".join(lines)

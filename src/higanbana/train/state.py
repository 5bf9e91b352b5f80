"""A resumable training state on disk, without pickle.

A state is a folder ``<output_dir>/state-<step>/`` holding:

- ``network.safetensors`` — the adapter parameters in float32 (exact, whatever the save dtype);
- ``optimizer.safetensors`` — every tensor of the optimizer state, keyed ``<param index>.<name>``;
- ``train_state.json`` — the step and epoch, the optimizer's non-tensor state and parameter groups,
  the LR scheduler's and the fp16 grad scaler's state, and a fingerprint of the configuration.

The data order and all training randomness are functions of ``(seed, step, sample position)``
(see :mod:`higanbana.train.trainer`), so step and epoch are all the RNG state a resume needs. The
folder is written under a temporary name and renamed into place (the old folder of the same name is
renamed away first and deleted last): a run killed while saving leaves the previous state intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import HiganbanaError
from ..safeio import atomic_folder

STATE_PREFIX = "state-"


@dataclass
class TrainState:
    """Where a run is: optimizer steps done, and the epoch they fall in."""

    step: int = 0
    epoch: int = 0


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for index, values in rest["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def save_state(
    folder: str | os.PathLike,
    *,
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    state: TrainState,
    fingerprint: str,
) -> Path:
    """Write a state folder atomically (:func:`higanbana.safeio.atomic_folder`: a temporary folder,
    then rename-then-delete over an existing one, so a kill at any moment leaves a complete state)."""
    folder = Path(folder)
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in network.state_dict().items()}
    opt_tensors, opt_rest = _split_optimizer(optimizer.state_dict())
    info = {
        "step": state.step,
        "epoch": state.epoch,
        "fingerprint": fingerprint,
        "optimizer": opt_rest,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
    }
    text = json.dumps(info, indent=1, default=_json_default)
    with atomic_folder(folder, overwrite=True) as tmp:
        try:
            save_file(weights, str(tmp / "network.safetensors"))
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "train_state.json").write_text(text, encoding="utf-8")
        except (OSError, SafetensorError) as exc:  # safetensors' I/O errors (a full disk) are not OSError
            reason = getattr(exc, "strerror", None) or exc
            raise HiganbanaError(f"cannot write {folder}: {reason} (the training state)") from exc
    return folder


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in train_state.json")


def load_state(
    folder: str | os.PathLike,
    *,
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    fingerprint: str,
) -> TrainState:
    """Restore a state written by :func:`save_state` into freshly built objects."""
    folder = Path(folder)
    info_file = folder / "train_state.json"
    if not info_file.is_file():
        raise HiganbanaError(f"{folder}: not a training state (no train_state.json)")
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
        weights = load_file(str(folder / "network.safetensors"))
        opt_tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, ValueError) as exc:
        raise HiganbanaError(f"{folder}: cannot read the training state ({exc})") from exc
    if info.get("fingerprint") != fingerprint:
        raise HiganbanaError(
            f"{folder}: the state was saved by a run with a different configuration (model, network, data "
            "or optimizer changed); resume with the same config, or start a new run"
        )
    missing, unexpected = network.load_state_dict(weights, strict=False)
    if missing or unexpected:
        shown = ", ".join([*missing, *unexpected][:5])
        raise HiganbanaError(f"{folder}/network.safetensors does not match the network: {shown}")
    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    optimizer.load_state_dict(_join_optimizer({k: v.to(device) for k, v in opt_tensors.items()}, info["optimizer"]))
    scheduler.load_state_dict(info["scheduler"])
    if scaler is not None and info.get("scaler"):
        scaler.load_state_dict(info["scaler"])
    return TrainState(step=int(info["step"]), epoch=int(info["epoch"]))


def list_states(output_dir: str | os.PathLike) -> list[Path]:
    """The state folders under ``output_dir``, oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        tail = path.name[len(STATE_PREFIX) :]
        if path.is_dir() and path.name.startswith(STATE_PREFIX) and tail.isdigit():
            found.append((int(tail), path))
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """``"latest"`` → the newest state under ``output_dir`` (None when there is none); a path → itself."""
    if not resume:
        return None
    if resume == "latest":
        states = list_states(output_dir)
        return states[-1] if states else None
    path = Path(resume)
    if not path.is_dir():
        raise HiganbanaError(f"training.resume: {path} is not a state folder")
    return path

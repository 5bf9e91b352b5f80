"""``higanbana experiment GRID.toml``: the paper's experiment design — configurations × seeds ×
checkpoints, one factor varied at a time — trained, evaluated together, aggregated and reported.

```toml
out = "experiment"                     # everything goes here (runs/, eval/)
train = "train.toml"                   # the base training config (model, data, defaults)
evaluate = "eval.toml"                 # the base evaluation config (concepts, encoders, prompts)
seeds = [23, 24, 25]
epochs = [10, 30, 50]                  # the checkpoints evaluated (every run trains to the last)

[[configs]]                            # a configuration = overrides of the training config
name = "lora"
set = { "network.algo" = "lora", "network.options" = { rank = 8, alpha = 4 }, "optimizer.unet_lr" = 5e-4 }
labels = { column = "LoRA" }           # optional: extra checkpoint parameters (e.g. for group_by)

[[vary]]                               # one factor at a time around a configuration
from = "lora"
key = "optimizer.unet_lr"
values = [1e-4, 1e-3]
```

Each (configuration, seed) is one training run in ``out/runs/<config>-s<seed>/`` saving every
epoch; a run whose final file exists is skipped, a run with saved states resumes from the latest.
Then one evaluation covers every (configuration, seed, epoch) checkpoint with the same prompts and
seeds (its images and features are cached, so adding a configuration only generates what is new).
The checkpoints carry their parameters (``config``, ``seed``, ``epoch`` and the short name of
every overridden key, e.g. ``algo``, ``unet_lr``, ``rank``) for the ranking and the importance.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, HiganbanaError, nearest
from .schema import load_toml

_GRID_KEYS = ("out", "train", "evaluate", "seeds", "epochs", "configs", "vary", "group_by")


@dataclass
class RunSpec:
    """One training run of the grid."""

    config: str  # the configuration's name
    seed: int
    overrides: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.config}-s{self.seed}"


@dataclass
class Grid:
    out: Path
    train: Path
    evaluate: Path
    seeds: list[int]
    epochs: list[int]
    configs: dict[str, dict[str, Any]]  # name -> overrides
    group_by: str = "algo"
    source: str = "grid"
    labels: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> extra checkpoint parameters

    @classmethod
    def load(cls, path: str | os.PathLike) -> Grid:
        path = Path(path)
        data = load_toml(path)
        where = str(path)
        for key in data:
            if key not in _GRID_KEYS:
                raise ConfigError(f"{where}: unknown key {key!r}{nearest(key, _GRID_KEYS)}")
        for key in ("train", "evaluate"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise ConfigError(f"{where}: {key} must name the base {key} config file")
        root = path.parent

        def rel(p: str) -> Path:
            return Path(p) if Path(p).is_absolute() else root / p

        seeds = data.get("seeds", [42])
        epochs = data.get("epochs", [1])
        for key, values in (("seeds", seeds), ("epochs", epochs)):
            if not (isinstance(values, list) and values and all(isinstance(v, int) for v in values)):
                raise ConfigError(f"{where}: {key} must be a non-empty list of integers")
        if min(epochs) < 1:
            raise ConfigError(f"{where}: epochs must be at least 1")
        configs: dict[str, dict[str, Any]] = {}
        labels: dict[str, dict[str, Any]] = {}
        for i, entry in enumerate(data.get("configs", [])):
            if not isinstance(entry, dict) or set(entry) - {"name", "set", "labels"} or "name" not in entry:
                raise ConfigError(f"{where}: configs[{i}] must be a table with name and set (and optional labels)")
            name = entry["name"]
            if not re.fullmatch(r"[A-Za-z0-9._+=-]+", str(name)) or name in configs:
                raise ConfigError(f"{where}: configs[{i}].name {name!r} must be a unique plain file name")
            configs[name] = dict(entry.get("set", {}))
            extra = entry.get("labels", {})
            if not isinstance(extra, dict) or not all(isinstance(v, int | float | str | bool) for v in extra.values()):
                raise ConfigError(f"{where}: configs[{i}].labels must be a table of numbers, strings or booleans")
            reserved = sorted(set(extra) & {"config", "seed", "epoch"})
            if reserved:
                raise ConfigError(f"{where}: configs[{i}].labels: {reserved[0]!r} is set by the grid itself")
            labels[name] = dict(extra)
        for i, entry in enumerate(data.get("vary", [])):
            if not isinstance(entry, dict) or set(entry) - {"from", "key", "values", "names"}:
                raise ConfigError(f"{where}: vary[{i}] takes from, key, values (and optional names)")
            base = entry.get("from")
            if base not in configs:
                raise ConfigError(
                    f"{where}: vary[{i}].from {base!r} is not a configuration{nearest(str(base), configs)}"
                )
            values = entry.get("values", [])
            names = entry.get("names") or [f"{base}-{entry['key'].rpartition('.')[2]}={v}" for v in values]
            if len(names) != len(values):
                raise ConfigError(f"{where}: vary[{i}] has {len(values)} values but {len(names)} names")
            for value, name in zip(values, names, strict=True):
                name = re.sub(r"[^A-Za-z0-9._+=-]", "_", str(name))
                if name in configs:
                    raise ConfigError(f"{where}: vary[{i}] makes configuration {name!r} twice")
                configs[name] = {**configs[base], entry["key"]: value}
        if not configs:
            raise ConfigError(f"{where}: no [[configs]]")
        return cls(
            out=rel(data.get("out", "experiment")),
            train=rel(data["train"]),
            evaluate=rel(data["evaluate"]),
            seeds=list(seeds),
            epochs=sorted(set(epochs)),
            configs=configs,
            group_by=str(data.get("group_by", "algo")),
            source=where,
            labels=labels,
        )

    def runs(self) -> list[RunSpec]:
        out = []
        for name, overrides in self.configs.items():
            params = {"config": name}
            for key, value in overrides.items():
                short = key.rpartition(".")[2]
                if isinstance(value, dict):
                    params.update({k: v for k, v in value.items() if isinstance(v, (int, float, str, bool))})
                elif isinstance(value, (int, float, str, bool)):
                    params[short] = value
            params.update(self.labels.get(name, {}))
            for seed in self.seeds:
                out.append(RunSpec(name, seed, overrides, {**params, "seed": seed}))
        return out


def _toml_literal(value: Any) -> str:
    from .schema import toml_value

    return toml_value(value)


def train_run(grid: Grid, run: RunSpec, *, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Train one (configuration, seed) to the last epoch, saving every epoch; skip when done."""
    from .train import TrainConfig, train

    folder = grid.out / "runs" / run.name
    final = folder / "model.safetensors"
    overrides = [f"{k}={_toml_literal(v)}" for k, v in run.overrides.items()]
    overrides += [
        f"training.seed={run.seed}",
        f"training.max_train_epochs={max(grid.epochs)}",
        "training.max_train_steps=0",
        f'save.output_dir="{folder.as_posix()}"',
        'save.output_name="model"',
        "save.every_n_epochs=1",
        "save.every_n_steps=0",
        "save.keep_last=0",
        "save.save_state=true",
        'training.resume="latest"',
    ]
    config = TrainConfig.load(grid.train, overrides)
    run.params.setdefault("algo", config.network.algo)
    run.params.setdefault("preset", config.network.preset)
    run.params.setdefault("lr", config.optimizer.unet_lr)
    recorded = folder / "config.toml"
    if recorded.is_file() and recorded.read_text(encoding="utf-8") != config.to_toml():
        raise HiganbanaError(
            f"{folder} holds a run of another configuration (its config.toml differs); "
            "remove the folder or rename the configuration"
        )
    if final.is_file():
        log(f"{run.name}: done, skipped")
        return folder
    log(f"{run.name}: training")
    train(config, progress=progress, log=log)
    return folder


def checkpoint_file(folder: Path, epoch: int, last: int) -> Path:
    return folder / ("model.safetensors" if epoch == last else f"model-{epoch:06d}.safetensors")


def run_experiment(
    grid_path: str | os.PathLike,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    evaluate_overrides: list[str] | tuple[str, ...] = (),
) -> Any:
    """Train every run of the grid, then evaluate all checkpoints together; returns the EvalResult."""
    from .evaluate.config import Checkpoint, EvalConfig
    from .evaluate.run import evaluate

    grid = Grid.load(grid_path)
    runs = grid.runs()
    log(f"{len(grid.configs)} configuration(s) × {len(grid.seeds)} seed(s) = {len(runs)} run(s); epochs {grid.epochs}")
    last = max(grid.epochs)
    checkpoints = []
    for run in runs:
        folder = train_run(grid, run, progress=progress, log=log)
        for epoch in grid.epochs:
            path = checkpoint_file(folder, epoch, last)
            if not path.is_file():
                raise HiganbanaError(f"{run.name}: no checkpoint for epoch {epoch} ({path})")
            checkpoints.append(Checkpoint(f"{run.name}-e{epoch}", str(path), 1.0, {**run.params, "epoch": epoch}))
    config = EvalConfig.load(grid.evaluate, [f'output.dir="{(grid.out / "eval").as_posix()}"', *evaluate_overrides])
    config.checkpoints = checkpoints
    if grid.group_by:
        config.report.group_by = grid.group_by
    labels = {k for extra in grid.labels.values() for k in extra}  # descriptions, not factors
    params = sorted({k for c in checkpoints for k in c.params} - {"config"} - labels)
    config.report.features = config.report.features or params
    config.validate()
    grid.out.mkdir(parents=True, exist_ok=True)
    (grid.out / "checkpoints.json").write_text(
        json.dumps([c.__dict__ for c in checkpoints], indent=1, default=str), encoding="utf-8"
    )
    return evaluate(config, progress=progress, log=log)

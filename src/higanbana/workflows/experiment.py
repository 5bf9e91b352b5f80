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

``workers`` > 1 trains the runs in that many processes of ``threads`` torch threads each, and
splits the generation of the evaluation's images among them (CPU: several one-thread processes
degrade gracefully on a busy machine where one many-thread process stalls; see docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, HiganbanaError, nearest
from ..evaluate.config import Checkpoint, EvalConfig
from ..evaluate.prompts import concepts_from_toml
from ..evaluate.run import evaluate, generate_all
from ..evaluate.run import preflight as evaluation_preflight
from ..safeio import check_name, inside, writable_folder, write_text
from ..schema import SEED_MAX, check_finite, load_toml, sections_of, toml_value
from ..train import train
from ..train.config import TrainConfig
from ..train.setup import preflight as training_preflight
from ..train.state import STATE_PREFIX

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
        data = load_toml(path, "grid file")
        where = str(path)
        for key in data:
            if key not in _GRID_KEYS:
                raise ConfigError(f"{where}: unknown key {key!r}{nearest(key, _GRID_KEYS)}")
        for key, value in data.items():  # NaN/Inf anywhere: in set, vary values, labels
            check_finite(value, f"{where}: {key}")
        for key in ("train", "evaluate"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise ConfigError(f"{where}: {key} must name the base {key} config file")
        for key in ("out", "group_by"):
            if key in data and (not isinstance(data[key], str) or not data[key]):
                raise ConfigError(f"{where}: {key} must be a non-empty string, got {data[key]!r}")
        root = path.parent

        def rel(p: str) -> Path:
            return Path(p) if Path(p).is_absolute() else root / p

        seeds = data.get("seeds", [42])
        epochs = data.get("epochs", [1])
        for key, values, low, high in (("seeds", seeds, 0, SEED_MAX), ("epochs", epochs, 1, None)):
            if not (isinstance(values, list) and values and all(_is_int(v) for v in values)):
                raise ConfigError(f"{where}: {key} must be a non-empty list of integers, got {values!r}")
            bad = [v for v in values if v < low or (high is not None and v > high)]
            if bad:
                limit = f"in [{low}, {high}]" if high is not None else f"at least {low}"
                raise ConfigError(f"{where}: {key} must be {limit}, got {bad[0]}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{where}: seeds lists {sorted({s for s in seeds if seeds.count(s) > 1})} twice")
        configs: dict[str, dict[str, Any]] = {}
        labels: dict[str, dict[str, Any]] = {}
        folded: dict[str, str] = {}  # case-folded name -> name: one run folder on macOS and Windows

        def add(name: str, what: str, overrides: dict[str, Any]) -> None:
            key = name.casefold()
            if key in folded:
                same = "" if folded[key] == name else f" (as {folded[key]!r}: names that differ only in case)"
                raise ConfigError(f"{where}: {what} makes configuration {name!r} twice{same}")
            folded[key] = name
            configs[name] = overrides

        entries = data.get("configs", [])
        if not isinstance(entries, list):
            raise ConfigError(f"{where}: configs must be an array of tables ([[configs]])")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or set(entry) - {"name", "set", "labels"} or "name" not in entry:
                raise ConfigError(f"{where}: configs[{i}] must be a table with name and set (and optional labels)")
            name = _config_name(entry["name"], f"{where}: configs[{i}].name")
            overrides = entry.get("set", {})
            if not isinstance(overrides, dict):
                raise ConfigError(
                    f"{where}: configs[{i}].set must be a table of section.key = value, got {overrides!r}"
                )
            _check_set_keys(overrides, f"{where}: configs[{i}].set")
            add(name, f"configs[{i}]", dict(overrides))
            extra = entry.get("labels", {})
            if not isinstance(extra, dict) or not all(isinstance(v, int | float | str | bool) for v in extra.values()):
                raise ConfigError(f"{where}: configs[{i}].labels must be a table of numbers, strings or booleans")
            reserved = sorted(set(extra) & {"config", "seed", "epoch"})
            if reserved:
                raise ConfigError(f"{where}: configs[{i}].labels: {reserved[0]!r} is set by the grid itself")
            labels[name] = dict(extra)
        varies = data.get("vary", [])
        if not isinstance(varies, list):
            raise ConfigError(f"{where}: vary must be an array of tables ([[vary]])")
        for i, entry in enumerate(varies):
            if not isinstance(entry, dict) or set(entry) - {"from", "key", "values", "names"}:
                raise ConfigError(f"{where}: vary[{i}] takes from, key, values (and optional names)")
            base = entry.get("from")
            if base not in configs:
                raise ConfigError(
                    f"{where}: vary[{i}].from {base!r} is not a configuration{nearest(str(base), configs)}"
                )
            key = entry.get("key")
            if not isinstance(key, str) or "." not in key:
                raise ConfigError(f"{where}: vary[{i}].key must be a training config key 'section.key', got {key!r}")
            _check_set_keys({key: None}, f"{where}: vary[{i}].key")
            values = entry.get("values")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: vary[{i}].values must be a non-empty list, got {values!r}")
            given = entry.get("names")
            if given is not None and not (isinstance(given, list) and all(isinstance(n, str) for n in given)):
                raise ConfigError(f"{where}: vary[{i}].names must be a list of strings, got {given!r}")
            if given is not None and len(given) != len(values):
                raise ConfigError(f"{where}: vary[{i}] has {len(values)} values but {len(given)} names")
            for j, value in enumerate(values):
                if given is not None:
                    name = _config_name(given[j], f"{where}: vary[{i}].names[{j}]")
                else:  # generated from the value: characters a folder name cannot hold become "_"
                    made = re.sub(r"[^A-Za-z0-9._+=-]", "_", f"{base}-{key.rpartition('.')[2]}={value}")
                    name = _config_name(made, f"{where}: vary[{i}] value {value!r} gives the name", hint=True)
                add(name, f"vary[{i}]", {**configs[base], key: value})
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _config_name(name: Any, where: str, *, hint: bool = False) -> str:
    """A configuration name: one plain path component of ``[A-Za-z0-9._+=-]`` (it names run folders)."""
    try:
        check_name(name, where)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{'; give the vary entry names = [...]' if hint else ''}") from None
    if not re.fullmatch(r"[A-Za-z0-9._+=-]+", name):
        raise ConfigError(f"{where}: {name!r} must be a plain file name ([A-Za-z0-9._+=-])")
    return name


#: training keys every run's own settings decide (see :func:`run_config`): a grid may not set them
_GRID_OWNED = {
    "training.seed": "use seeds = [...]",
    "training.max_train_epochs": "use epochs = [...]",
    "training.max_train_steps": "runs train to the last of epochs = [...]",
    "training.resume": "a run resumes from its own latest state",
    "save.output_dir": "runs go to out/runs/<configuration>-s<seed>",
    "save.output_name": "runs save model*.safetensors",
    "save.every_n_epochs": "runs save every epoch",
    "save.every_n_steps": "runs save every epoch",
    "save.keep_last": "runs keep every epoch's file",
    "save.save_state": "runs save their states",
}


def _check_set_keys(overrides: dict[str, Any], where: str) -> None:
    """The keys of a ``set`` table: ``section.key`` of the training config (values are checked with it),
    not one the grid sets itself (it would be silently replaced)."""
    sections = sections_of(TrainConfig)
    for key in overrides:
        if key in _GRID_OWNED:
            raise ConfigError(f"{where}: {key!r} is set by the grid itself ({_GRID_OWNED[key]})")
        section, dot, _name = str(key).partition(".")
        if not dot or section not in sections:
            hint = nearest(section, sections) if dot else ""
            raise ConfigError(f"{where}: {key!r} is not a training config key 'section.key'{hint}")


def _toml_literal(value: Any) -> str:
    return toml_value(value)


def run_config(grid: Grid, run: RunSpec) -> Any:
    """The validated :class:`~higanbana.train.TrainConfig` of one run (an error names the grid and the run)."""
    folder = run_folder(grid, run)
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
    try:
        return TrainConfig.load(grid.train, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{grid.source}: configuration {run.config!r} (run {run.name}): {exc}") from None


def run_folder(grid: Grid, run: RunSpec) -> Path:
    """``out/runs/<configuration>-s<seed>``; the name is checked, so the folder stays under ``out/runs``."""
    check_name(run.name, f"{grid.source}: run {run.name!r}")
    return inside(grid.out / "runs", grid.out / "runs" / run.name, f"{grid.source}: run {run.name!r}")


def _record_params(run: RunSpec, config: Any) -> None:
    """The checkpoint parameters every run has, whether or not the grid overrides them."""
    run.params.setdefault("algo", config.network.algo)
    run.params.setdefault("preset", config.network.preset)
    run.params.setdefault("lr", config.optimizer.unet_lr)


def train_run(grid: Grid, run: RunSpec, *, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Train one (configuration, seed) to the last epoch, saving every epoch; skip when done."""
    folder = run_folder(grid, run)
    final = folder / "model.safetensors"
    config = run_config(grid, run)
    _record_params(run, config)
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
    prune_run(folder, grid.epochs)
    return folder


def prune_run(folder: Path, epochs: list[int]) -> None:
    """A finished run keeps its final file and the checkpoints of the grid's ``epochs``; its
    resumable states and the other epochs' files go (27 demo runs kept 5.6 GB of them). A run that
    stopped early is not pruned, so it resumes from its latest state."""
    keep = {checkpoint_file(folder, e, max(epochs)).name for e in epochs}
    for path in folder.iterdir():
        if path.is_dir() and path.name.startswith(STATE_PREFIX):
            shutil.rmtree(path)
        elif path.name.startswith("model-") and path.suffix == ".safetensors" and path.name not in keep:
            path.unlink()


def checkpoint_file(folder: Path, epoch: int, last: int) -> Path:
    return folder / ("model.safetensors" if epoch == last else f"model-{epoch:06d}.safetensors")


# ----------------------------------------------------------------------------- worker processes


def _worker_start(threads: int) -> None:
    """A pool process: ``threads`` torch threads; Ctrl-C is the parent's to handle (it stops the pool,
    and a killed run resumes from its last saved epoch)."""
    import torch
    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    transformers_logging.disable_progress_bar()  # "Loading weights" bars from every worker
    # tqdm's default lock is a multiprocessing semaphore that a stopped worker would leave to the
    # resource tracker (a "leaked semaphore" warning after Ctrl-C); a thread lock serves one process
    tqdm.set_lock(threading.RLock())


def _train_in_worker(grid_path: str, index: int) -> tuple[str, float]:
    """Train run ``index`` of the grid; its log goes to ``out/runs/<run>.log``."""
    grid = Grid.load(grid_path)
    run = grid.runs()[index]
    lines: list[str] = []
    start = time.perf_counter()
    try:
        train_run(grid, run, progress=False, log=lines.append)
    finally:
        write_text(grid.out / "runs" / f"{run.name}.log", "\n".join(lines) + "\n")
    return run.name, time.perf_counter() - start


def _generate_in_worker(config: EvalConfig, items: list[Any], share: tuple[int, int], progress: bool) -> int:
    generate_all(config, items, progress=progress, share=share)
    return share[0]


@contextlib.contextmanager
def _worker_pool(workers: int, threads: int) -> Iterator[Any]:
    """A pool of ``workers`` spawned processes (fork would copy the parent's torch thread pools),
    stopped at once on any error or Ctrl-C (a killed run resumes from its last saved epoch)."""
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_start, initargs=(threads,))
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _train_parallel(grid: Grid, runs: list[RunSpec], workers: int, threads: int, log: Callable[[str], None]) -> None:
    """Train the unfinished ``runs`` in ``workers`` processes, a line per finished run with the time left."""
    todo = [i for i, run in enumerate(runs) if not (run_folder(grid, run) / "model.safetensors").is_file()]
    if len(todo) < len(runs):
        log(f"{len(runs) - len(todo)} run(s) done before, skipped")
    if not todo:
        return
    log(f"training {len(todo)} run(s) in {workers} processes × {threads} torch thread(s) (logs: {grid.out}/runs/*.log)")
    start = time.perf_counter()
    with _worker_pool(min(workers, len(todo)), threads) as pool:
        tasks = [(str(grid.source), i) for i in todo]
        for done, (name, _seconds) in enumerate(pool.imap_unordered(_train_run_star, tasks), start=1):
            elapsed = time.perf_counter() - start
            left = elapsed / done * (len(todo) - done)
            log(f"{name}: trained ({done}/{len(todo)}; {elapsed / 60:.1f} min so far, about {left / 60:.1f} min left)")


def _train_run_star(args: tuple[str, int]) -> tuple[str, float]:
    return _train_in_worker(*args)


def _generate_parallel(config: EvalConfig, items: list[Any], workers: int, threads: int, log, progress: bool) -> None:
    """Generate the evaluation's images in ``workers`` processes (each a share of every model's
    items; the first shows its progress bars); the evaluation then finds them all on disk."""
    log(f"generating images in {workers} processes × {threads} torch thread(s)")
    with _worker_pool(workers, threads) as pool:
        shares = [(config, items, (i, workers), progress and i == 0) for i in range(workers)]
        pool.starmap(_generate_in_worker, shares)


def run_experiment(
    grid_path: str | os.PathLike,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    evaluate_overrides: list[str] | tuple[str, ...] = (),
    workers: int = 1,
    threads: int = 1,
) -> Any:
    """Train every run of the grid, then evaluate all checkpoints together; returns the EvalResult.
    ``workers`` > 1: runs and image generation in that many processes of ``threads`` torch threads."""
    if workers < 1 or threads < 1:
        raise ConfigError(f"workers and threads must be at least 1, got {workers} and {threads}")
    if workers > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--workers is for one process; under accelerate launch the processes share the work already")
    grid = Grid.load(grid_path)
    runs = grid.runs()
    writable_folder(grid.out, where=f"{grid.source}: out", create=False)
    # every run's training config and the evaluation's are checked before the first run trains
    for run in runs:
        config = run_config(grid, run)
        try:
            training_preflight(config)
        except ConfigError as exc:
            raise ConfigError(f"{grid.source}: configuration {run.config!r} (run {run.name}): {exc}") from None
        _record_params(run, config)
    eval_overrides = [f'output.dir="{(grid.out / "eval").as_posix()}"', *evaluate_overrides]
    eval_config = EvalConfig.load(grid.evaluate, eval_overrides)
    evaluation_preflight(eval_config)
    concepts_from_toml(eval_config.concepts.file)
    log(f"{len(grid.configs)} configuration(s) × {len(grid.seeds)} seed(s) = {len(runs)} run(s); epochs {grid.epochs}")
    last = max(grid.epochs)
    checkpoints = []
    if workers > 1:
        _train_parallel(grid, runs, workers, threads, log)

    def quiet_skips(line: str) -> None:  # the runs trained in parallel are said done already
        if workers == 1 or not line.endswith(": done, skipped"):
            log(line)

    for run in runs:
        folder = train_run(grid, run, progress=progress, log=quiet_skips)
        for epoch in grid.epochs:
            path = checkpoint_file(folder, epoch, last)
            if not path.is_file():
                raise HiganbanaError(f"{run.name}: no checkpoint for epoch {epoch} ({path})")
            checkpoints.append(Checkpoint(f"{run.name}-e{epoch}", str(path), 1.0, {**run.params, "epoch": epoch}))
    config = EvalConfig.load(grid.evaluate, eval_overrides)
    config.checkpoints = checkpoints
    if grid.group_by:
        config.report.group_by = grid.group_by
    labels = {k for extra in grid.labels.values() for k in extra}  # descriptions, not factors
    params = sorted({k for c in checkpoints for k in c.params} - {"config"} - labels)
    config.report.features = config.report.features or params
    config.validate()
    write_text(grid.out / "checkpoints.json", json.dumps([c.__dict__ for c in checkpoints], indent=1, default=str))
    if workers > 1:

        def pregenerate(config: EvalConfig, items: list[Any]) -> None:
            _generate_parallel(config, items, workers, threads, log, progress)

        return evaluate(config, progress=progress, log=log, pregenerate=pregenerate)
    return evaluate(config, progress=progress, log=log)

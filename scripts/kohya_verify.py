"""Post-run checks of one sd-scripts training run with ``--network_module higanbana.kohya``.

Inputs: the ``.safetensors`` the trainer saved and the probe folder ``scripts/kohya_probe.py``
filled during that run (``initial.safetensors``: the network before training; ``final.safetensors``:
the live network at save time; ``save.json``: the in-trainer comparison of the file with the live
network, rebuilt onto the same models). :func:`verify_run` answers three questions:

* **loads** — the file passes higanbana's reader/validator (``read_network_file``), is a higanbana
  file (``higanbana.modules`` records) and ``higanbana info`` describes it (exit 0, no NaN/Inf
  module; the ComfyUI/A1111/diffusers verdicts are kept for the notes);
* **equal** — the file's tensors are the live network's at save time (read back here, independently
  of the probe's own read), and the probe found the rebuilt network identical module by module
  (records, merged weights, outputs);
* **trained** — every trainable tensor in the file differs from the network before training (an
  ``alpha`` or integer tensor is a constant, not counted), every part the trainer trains (UNet, text
  encoder) has modules in the file; for a resumed run, the network before training equals the file
  it resumed from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: merged weights/outputs of the rebuilt network vs the live one: both come from the same float32
#: tensors through the same code, so they are expected to be bit-identical; this allows only rounding
REBUILT_REL_TOL = 1e-6


@dataclass
class Verdict:
    loads: bool = False
    equal: bool = False
    trained: bool = False
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.loads and self.equal and self.trained


def _constant_key(key: str, tensor: Any) -> bool:
    return key.endswith(".alpha") or not tensor.is_floating_point()


def _load(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same(a: Any, b: Any) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool((a == b).all())


def check_loads(file: Path, verdict: Verdict, python: str | None = None, run_cli: bool = True) -> None:
    """``read_network_file`` + ``file_info`` in this process, and the ``higanbana info`` command."""
    from higanbana.formats.inspect import file_info
    from higanbana.formats.reader import read_network_file

    try:
        tensors, records, metadata = read_network_file(file)
    except Exception as exc:
        verdict.notes.append(f"does not load: {type(exc).__name__}: {exc}"[:300])
        return
    info = file_info(file)
    verdict.details["info"] = {
        k: info[k] for k in ("format", "algorithms", "modules", "modules_per_prefix", "parameters", "base_model")
    }
    verdict.details["compatibility"] = {v["tool"]: v["status"] for v in info["compatibility"]}
    verdict.details["ss_network_module"] = metadata.get("ss_network_module", "")
    problems = []
    if info["format"] != "higanbana":
        problems.append("no higanbana.modules records")
    if info["non_finite_modules"]:
        problems.append(f"NaN/Inf in {len(info['non_finite_modules'])} module(s)")
    if metadata.get("ss_network_module") != "higanbana.kohya":
        problems.append(f"ss_network_module={metadata.get('ss_network_module')!r}")
    if run_cli:
        cmd = [python or sys.executable, "-m", "higanbana", "info", "--json", str(file)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            problems.append(f"`higanbana info` exit {proc.returncode}: {proc.stderr.strip()[-200:]}")
        else:
            try:
                json.loads(proc.stdout)
            except ValueError:
                problems.append("`higanbana info --json` printed no JSON")
    verdict.notes.extend(problems)
    verdict.loads = not problems and bool(tensors) and bool(records)


def check_parts(file: Path, probe_dir: Path, verdict: Verdict) -> None:
    """Every part the trainer trains (``apply_to``'s kept prefixes) has modules in the file: a preset
    that matches no layer of a model adapts nothing there, and training still "succeeds"."""
    initial = probe_dir / "initial.json"
    if not initial.is_file():
        return
    parts = json.loads(initial.read_text(encoding="utf-8")).get("parts", [])
    per_prefix = verdict.details.get("info", {}).get("modules_per_prefix", {})
    empty = [p for p in parts if not per_prefix.get(p)]
    if empty:
        verdict.notes.append(f"no module on {', '.join(empty)} (trained part(s) with nothing adapted)")
        verdict.trained = False


def check_equal(file: Path, probe_dir: Path, verdict: Verdict) -> None:
    """The file vs the live network at save time (our read), and the probe's rebuilt comparison."""
    final_path, save_path = probe_dir / "final.safetensors", probe_dir / "save.json"
    if not final_path.is_file() or not save_path.is_file():
        verdict.notes.append("probe saw no save_weights call (no final.safetensors/save.json)")
        return
    saves = json.loads(save_path.read_text(encoding="utf-8"))["saves"]
    last = saves[-1]
    verdict.details["probe"] = {k: v for k, v in last.items() if k != "traceback"}
    problems = []
    if Path(last["file"]).resolve() != file.resolve():
        problems.append(f"the last save was {last['file']}, not {file}")
    if "error" in last:
        problems.append(f"probe error: {last['error']}"[:300])
        verdict.details["probe_traceback"] = last.get("traceback", "")
    saved, live = _load(file), _load(final_path)
    if sorted(saved) != sorted(live):
        only_file = sorted(set(saved) - set(live))[:3]
        only_live = sorted(set(live) - set(saved))[:3]
        problems.append(f"keys differ (file only {only_file}, live only {only_live})")
    else:
        differ = [k for k in saved if not _same(saved[k], live[k].to(saved[k].dtype))]
        if differ:
            problems.append(f"{len(differ)} tensor(s) differ from the live network, e.g. {differ[0]}")
    rebuilt = last.get("rebuilt")
    if rebuilt:
        if not rebuilt.get("records_equal"):
            problems.append("rebuilt network's records differ")
        if rebuilt.get("modules_rebuilt") != rebuilt.get("modules_live"):
            problems.append(f"rebuilt {rebuilt.get('modules_rebuilt')} modules of {rebuilt.get('modules_live')}")
        rel = rebuilt.get("merged_weight_max_rel_diff", float("inf"))
        if not rel <= REBUILT_REL_TOL:
            problems.append(
                f"rebuilt merged weights differ (rel {rel:.2e}, {rebuilt.get('merged_weight_worst_module')})"
            )
        if not rebuilt.get("merged_bias_max_abs_diff", float("inf")) <= REBUILT_REL_TOL:
            problems.append(f"rebuilt merged biases differ ({rebuilt.get('merged_bias_max_abs_diff')})")
        if not rebuilt.get("forward_max_abs_diff", float("inf")) <= 1e-5:
            problems.append(f"rebuilt outputs differ ({rebuilt.get('forward_max_abs_diff')})")
    elif "error" not in last:
        problems.append("probe did not rebuild the network")
    verdict.notes.extend(problems)
    verdict.equal = not problems


def check_trained(file: Path, probe_dir: Path, verdict: Verdict, resumed_from: Path | None = None) -> None:
    """Every trainable tensor moved from its value before training; a resume started from its file."""
    initial_path = probe_dir / "initial.safetensors"
    if not initial_path.is_file():
        verdict.notes.append("probe saw no prepare_optimizer_params call (no initial.safetensors)")
        return
    initial, saved = _load(initial_path), _load(file)
    keys = [k for k in saved if k in initial and not _constant_key(k, saved[k])]
    moved = [k for k in keys if not _same(saved[k], initial[k].to(saved[k].dtype))]
    still = [k for k in keys if k not in set(moved)]
    verdict.details["moved"] = f"{len(moved)}/{len(keys)}"
    problems = []
    if not keys:
        problems.append("no trainable tensor in the file")
    elif still:
        problems.append(f"{len(still)}/{len(keys)} trainable tensor(s) did not move, e.g. {still[0]}")
    if resumed_from is not None:
        source = _load(resumed_from)
        if sorted(source) != sorted(initial):
            problems.append("the resumed network's keys differ from the file it resumed from")
        else:
            differ = [k for k in source if not _same(source[k].float(), initial[k].float())]
            if differ:
                problems.append(f"resume did not start from the file: {len(differ)} tensor(s) differ, e.g. {differ[0]}")
            else:
                verdict.details["resumed_exactly"] = True
    verdict.notes.extend(problems)
    verdict.trained = not problems


def verify_run(
    file: str | Path,
    probe_dir: str | Path,
    *,
    resumed_from: str | Path | None = None,
    python: str | None = None,
    run_cli: bool = True,
) -> Verdict:
    """All three checks of one run (see the module docstring)."""
    file, probe_dir = Path(file), Path(probe_dir)
    verdict = Verdict()
    if not file.is_file():
        verdict.notes.append(f"no file {file.name}")
        return verdict
    check_loads(file, verdict, python=python, run_cli=run_cli)
    for check in (
        lambda: check_equal(file, probe_dir, verdict),
        lambda: check_trained(file, probe_dir, verdict, Path(resumed_from) if resumed_from else None),
        lambda: check_parts(file, probe_dir, verdict),
    ):
        try:
            check()
        except Exception as exc:  # an unreadable file or probe output: a failed check, not a crash
            verdict.notes.append(f"check failed: {type(exc).__name__}: {exc}"[:300])
    return verdict

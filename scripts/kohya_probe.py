"""Run an sd-scripts training script with probes on higanbana's kohya network (inside the trainer).

    python scripts/kohya_probe.py --probe-dir DIR SD_SCRIPTS/train_network.py [trainer args ...]

Runs the trainer in this process (``runpy``, as ``__main__``, its folder first on ``sys.path``)
after wrapping two methods of ``higanbana.integrations.kohya.KohyaNetwork`` — the class that
``--network_module higanbana.kohya`` creates. Nothing in the trainer or in the plug-in changes:

* ``prepare_optimizer_params`` (called once, after ``apply_to`` and ``load_weights``): the network's
  tensors *before training* go to ``DIR/initial.safetensors`` (file keys, float32) and the network's
  shape to ``DIR/initial.json``;
* ``save_weights`` (every checkpoint the trainer writes): the live network's tensors *at save time*
  go to ``DIR/final.safetensors``; after the real save, the written file is read back and compared
  with them, rebuilt onto the very same models with the plug-in's ``create_network_from_weights``
  (what sd-scripts' inference and ``--base_weights`` use) and compared module by module — records,
  merged weights/biases and the adapters' outputs on random inputs — against the live network.
  The numbers go to ``DIR/save.json``. A probe error is recorded there, never raised into training.

PyPI's ``torchvision`` wheels for Linux are CUDA builds whose ``_C`` extension does not load with
the CPU ``torch``; sd-scripts only uses ``torchvision.transforms``. When the extension does not
load, the two operator schemas that ``torchvision/_meta_registrations.py`` registers fake kernels
for unconditionally (``nms``, ``qnms``) are declared first, so ``import torchvision`` works.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from kohya_fixture import torchvision_shim


def _peak_rss_mib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _tensors(net: Any) -> dict[str, torch.Tensor]:
    from higanbana.formats import network_tensors

    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in network_tensors(net, torch.float32).items()}


def _save_st(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if a.shape != b.shape:
        return float("inf")
    return float((a.detach().float() - b.detach().float()).abs().max()) if a.numel() else 0.0


def _probe_input(layer: torch.nn.Module, gen: torch.Generator) -> torch.Tensor | None:
    weight = getattr(layer, "weight", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
    if isinstance(layer, torch.nn.Linear):
        return torch.randn(2, layer.in_features, generator=gen).to(dtype)
    if isinstance(layer, torch.nn.Conv2d):
        return torch.randn(1, layer.in_channels, 8, 8, generator=gen).to(dtype)
    return None


def compare_rebuilt(net: Any, file: str) -> dict[str, Any]:
    """Rebuild ``file`` onto ``net``'s own models with the plug-in; compare with ``net`` module by module."""
    from higanbana.integrations.kohya import create_network_from_weights

    unet = next((p.module for p in net.parts.values() if p.kind == "unet"), None)
    tes = [p.module for prefix, p in sorted(net.parts.items()) if p.kind == "text_encoder"]
    rebuilt, _ = create_network_from_weights(
        net.multiplier, file, None, tes or None, unet, for_inference=True, model_kind=net.model_kind
    )
    out: dict[str, Any] = {
        "modules_live": len(net.adapters),
        "modules_rebuilt": len(rebuilt.adapters),
        "records_equal": rebuilt.module_records() == net.module_records(),
    }
    worst_w = worst_b = worst_rel = 0.0
    worst_name = ""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            for name, live in net.adapters.items():
                if name not in rebuilt.adapters:
                    out.setdefault("missing_in_rebuilt", []).append(name)
                    continue
                other = rebuilt.adapters[name]
                w_live, w_other = live.merged_weight(1.0), other.merged_weight(1.0)
                diff = _max_diff(w_live, w_other)
                scale = float(w_live.detach().float().abs().max()) or 1.0
                if diff / scale > worst_rel:
                    worst_rel, worst_name = diff / scale, name
                worst_w = max(worst_w, diff)
                worst_b = max(worst_b, _max_diff(live.merged_bias(1.0), other.merged_bias(1.0)))
            # the adapters' outputs on random inputs, for a spread of modules (each call is a full layer)
            gen = torch.Generator().manual_seed(0)
            names = [n for n in net.adapters if n in rebuilt.adapters]
            picked = names[:: max(1, len(names) // 12)][:12]
            worst_out, tried = 0.0, 0
            for name in picked:
                x = _probe_input(net.adapters[name].layer, gen)
                if x is None:
                    continue
                worst_out = max(worst_out, _max_diff(net.adapters[name](x), rebuilt.adapters[name](x)))
                tried += 1
    finally:
        net.train(was_training)
        del rebuilt
    out.update(
        merged_weight_max_abs_diff=worst_w,
        merged_weight_max_rel_diff=worst_rel,
        merged_weight_worst_module=worst_name,
        merged_bias_max_abs_diff=worst_b,
        forward_modules_compared=tried,
        forward_max_abs_diff=worst_out,
    )
    return out


def install(probe_dir: Path) -> None:
    """Wrap ``KohyaNetwork.prepare_optimizer_params`` and ``save_weights`` (see the module docstring)."""
    from higanbana.formats.reader import read_network_file
    from higanbana.integrations import kohya

    cls = kohya.KohyaNetwork
    original_prepare = cls.prepare_optimizer_params
    original_save = cls.save_weights
    state: dict[str, Any] = {"initial": False, "saves": []}

    def prepare_optimizer_params(self, *args: Any, **kwargs: Any) -> Any:
        if not state["initial"]:
            state["initial"] = True
            _save_st(_tensors(self), probe_dir / "initial.safetensors")
            algos: dict[str, int] = {}
            for record in self.module_records().values():
                algos[record["algo"]] = algos.get(record["algo"], 0) + 1
            _write_json(
                probe_dir / "initial.json",
                {
                    "modules": len(self.adapters),
                    "parts": sorted(self.parts),
                    "algos": algos,
                    "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad),
                    "model_kind": self.model_kind,
                },
            )
        return original_prepare(self, *args, **kwargs)

    def save_weights(self, file: Any, dtype: Any = None, metadata: Any = None) -> Any:
        peak_before = _peak_rss_mib()  # training's peak (the probe's own work comes after)
        live = _tensors(self)
        result = original_save(self, file, dtype, metadata)
        entry: dict[str, Any] = {
            "file": str(file),
            "dtype": str(dtype),
            "time": time.time(),
            "peak_rss_mib_before_save": peak_before,
        }
        try:
            started = time.perf_counter()
            _save_st(live, probe_dir / "final.safetensors")
            saved, _records, _meta = read_network_file(file)
            entry["keys_equal"] = sorted(saved) == sorted(live)
            cast = dtype if isinstance(dtype, torch.dtype) else torch.float32
            entry["file_vs_live_max_abs_diff"] = max(
                (_max_diff(saved[k], live[k].to(saved[k].dtype)) for k in saved if k in live), default=0.0
            )
            entry["save_dtype"] = str(cast)
            entry["rebuilt"] = compare_rebuilt(self, str(file))
            entry["probe_seconds"] = round(time.perf_counter() - started, 2)
            entry["peak_rss_mib_after_probe"] = _peak_rss_mib()
        except Exception as exc:  # recorded, not raised: the trainer's own outcome stays its own
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()[-4000:]
        state["saves"].append(entry)
        _write_json(probe_dir / "save.json", {"saves": state["saves"]})
        return result

    cls.prepare_optimizer_params = prepare_optimizer_params  # type: ignore[method-assign]
    cls.save_weights = save_weights  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="run an sd-scripts trainer with higanbana network probes")
    parser.add_argument("--probe-dir", required=True)
    parser.add_argument("script", help="the trainer, e.g. SD_SCRIPTS/train_network.py")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    probe_dir = Path(ns.probe_dir)
    probe_dir.mkdir(parents=True, exist_ok=True)
    note = torchvision_shim()
    _write_json(probe_dir / "env.json", {"torchvision": note, "torch": torch.__version__})
    install(probe_dir)
    script = str(Path(ns.script).resolve())
    sys.argv = [script, *ns.args]
    sys.path.insert(0, str(Path(script).parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()

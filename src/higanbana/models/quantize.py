"""A frozen base in 8 bits: the Linear weights of a UNet or transformer quantized in place (torchao's
int8 weight-only quantization), so that a model whose bf16 weights do not fit trains where its int8
weights do (Flux.1's 12B parameters: 24 GB in bf16, 12 GB in int8). Adapters then run in bypass over
the quantized layers (``Adapter.quantized_base``): ``op(x, W0_int8) + branch(x)``, never a merged
weight. torchao is an optional dependency (``pip install 'higanbana[quantize]'``).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError

QUANTIZATIONS = ("none", "int8")


def _torchao(scheme: str):
    """torchao's config for ``scheme``, imported quietly (or a ConfigError naming the extra)."""
    # torchao reports its absent CUDA kernels on import, torch a deprecation in torchao's registrations
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8WeightOnlyConfig
    except ImportError as exc:
        raise ConfigError(
            f"model.quantize = {scheme!r} needs torchao: pip install 'higanbana[quantize]' ({exc})"
        ) from None
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return Int8WeightOnlyConfig()


def loading_config(scheme: str):
    """diffusers' ``quantization_config`` that quantizes a model's Linears while it loads (``None`` for
    ``"none"``): a 12B Flux never exists in memory at full precision."""
    if scheme not in QUANTIZATIONS:
        raise ConfigError(f"quantization {scheme!r}: expected one of {QUANTIZATIONS}")
    if scheme == "none":
        return None
    from diffusers import TorchAoConfig

    return TorchAoConfig(_torchao(scheme))


def quantize_weights(module: nn.Module, scheme: str) -> int:
    """Quantize every ``nn.Linear`` weight of ``module`` in place by ``scheme`` (``"int8"``: per-row
    symmetric int8, weight-only); returns how many layers were quantized (0 for ``"none"``)."""
    if scheme not in QUANTIZATIONS:
        raise ConfigError(f"quantization {scheme!r}: expected one of {QUANTIZATIONS}")
    if scheme == "none":
        return 0
    config = _torchao(scheme)
    from torchao.quantization import quantize_

    count = sum(1 for m in module.modules() if isinstance(m, nn.Linear))
    module.requires_grad_(False)
    quantize_(module, config, filter_fn=lambda m, _name: isinstance(m, nn.Linear))
    return count


def load_quantized(cls: type, folder: str | Path, dtype: torch.dtype, scheme: str) -> nn.Module:
    """A diffusers model (``cls``, e.g. ``FluxTransformer2DModel``) from a local component folder, its
    Linear weights quantized by ``scheme`` one by one as they are read: built on the meta device, each
    tensor read from its shard, cast to ``dtype``, and a Linear's weight quantized at once — so memory
    holds the quantized model and one tensor, never the model at full precision (diffusers' own
    quantized loading peaked at 23 GiB for Flux.1's 12B parameters, where this needs ~13)."""
    from safetensors import safe_open

    folder = Path(folder)
    config = _torchao(scheme)
    from torchao.quantization import quantize_

    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder))
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        files = [folder / n for n in names]
    else:
        files = [folder / "diffusion_pytorch_model.safetensors"]
    modules = dict(model.named_modules())
    for file in files:
        if not file.is_file():
            raise ConfigError(f"{folder}: no {file.name} (only .safetensors weights are read)")
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                path, _, name = key.rpartition(".")
                module = modules.get(path)
                if module is None or (name not in module._parameters and name not in module._buffers):
                    raise ConfigError(f"{file}: tensor {key!r} is not a parameter of {cls.__name__}")
                t = f.get_tensor(key)
                # a copy of its own, so that no tensor keeps the shard's memory map (and its pages) alive
                t = t.to(dtype, copy=True) if t.is_floating_point() else t.clone()
                if name in module._parameters:
                    module._parameters[name] = nn.Parameter(t, requires_grad=False)
                else:
                    module._buffers[name] = t
                if isinstance(module, nn.Linear) and name == "weight":
                    quantize_(module, config)
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ConfigError(f"{folder}: no weights for {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}")
    return model.eval().requires_grad_(False)

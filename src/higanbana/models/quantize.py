"""A frozen base in 8 bits: the Linear weights of a UNet or transformer quantized in place (torchao's
int8 weight-only quantization), so that a model whose bf16 weights do not fit trains where its int8
weights do (Flux.1's 12B parameters: 24 GB in bf16, 12 GB in int8). Adapters then run in bypass over
the quantized layers (``Adapter.quantized_base``): ``op(x, W0_int8) + branch(x)``, never a merged
weight. torchao is an optional dependency (``pip install 'higanbana[quantize]'``).
"""

from __future__ import annotations

import logging
import warnings

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

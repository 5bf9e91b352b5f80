"""SD3/SD3.5 and Flux.1 model parts (transformer, text encoders, 16-channel VAE, tokenizers), local only.

:func:`load_dit` reads a diffusers folder (``model_index.json`` naming ``StableDiffusion3Pipeline`` or
``FluxPipeline``) or an original single-file checkpoint (Stability's MMDiT, Black Forest Labs' Flux)
with a local diffusers folder for everything the file does not hold. Nothing is downloaded: the hub
client is offline while loading, and a missing config is an error naming what to provide.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import HiganbanaError
from .quantize import load_quantized, loading_config
from .sd import _hub_offline, _variant

DIT_KINDS = ("sd3", "flux")
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
TRANSFORMERS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
#: the text encoders and tokenizers of each family, in the pipelines' order (CLIP-L, [CLIP-G,] T5)
TEXT_ENTRIES = {
    "sd3": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")),
    "flux": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
}
#: classes a folder may name (anything else is refused rather than imported by name)
_TE_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
_TOKENIZER_CLASSES = (
    "CLIPTokenizer",
    "CLIPTokenizerFast",
    "T5Tokenizer",
    "T5TokenizerFast",
    "PreTrainedTokenizerFast",
    "TokenizersBackend",  # transformers 5: a fast tokenizer from tokenizer.json
)


@dataclass
class DitParts:
    """A diffusion transformer and what goes with it. ``kind`` is ``"sd3"`` or ``"flux"``;
    ``text_encoders``/``tokenizers`` are in the pipeline's order (CLIP-L, [CLIP-G,] T5);
    ``scheduler_config`` is the folder's ``FlowMatchEulerDiscreteScheduler`` config (shift, dynamic
    shifting)."""

    kind: str
    transformer: nn.Module
    text_encoders: list[nn.Module]
    vae: nn.Module | None = None
    tokenizers: list | None = None
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    v_parameterization: bool = False  # flow matching: the velocity target is its own (see train.flow)

    def __post_init__(self) -> None:
        if self.kind not in DIT_KINDS:
            raise HiganbanaError(f"unknown transformer family {self.kind!r}; expected one of {DIT_KINDS}")
        expected = len(TEXT_ENTRIES[self.kind])
        if len(self.text_encoders) != expected:
            raise HiganbanaError(f"{self.kind} takes {expected} text encoders, got {len(self.text_encoders)}")

    @property
    def denoiser(self) -> nn.Module:
        """The network that predicts (here: the transformer)."""
        return self.transformer


def dit_pipeline(parts: Any, scheduler_config: dict[str, Any] | None = None):
    """The family's diffusers pipeline over ``parts``' own modules (no copies)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    scheduler = FlowMatchEulerDiscreteScheduler(**(scheduler_config or parts.scheduler_config))
    te, tok = parts.text_encoders, parts.tokenizers
    if tok is None:
        raise HiganbanaError(f"the {parts.kind} model has no tokenizers; give a folder that has them")
    common = {"transformer": parts.transformer, "scheduler": scheduler, "vae": parts.vae}
    common |= {"text_encoder": te[0], "tokenizer": tok[0], "text_encoder_2": te[1], "tokenizer_2": tok[1]}
    if parts.kind == "flux":
        return FluxPipeline(**common)
    return StableDiffusion3Pipeline(**common, text_encoder_3=te[2], tokenizer_3=tok[2])


def dit_kind_of(path: str | os.PathLike) -> str | None:
    """``"sd3"``/``"flux"`` for a diffusers folder of those pipelines or an original single file of
    those models (MMDiT ``joint_blocks``, Flux ``double_blocks``), None for anything else."""
    p = Path(path)
    if p.is_dir():
        index = p / "model_index.json"
        if not index.is_file():
            return None
        try:
            name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
        except (OSError, ValueError):
            return None
        return next((k for k, v in PIPELINES.items() if name == v), None)
    if p.suffix.lower() != ".safetensors" or not p.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(p), "pt") as f:
            keys = list(f.keys())
    except Exception:  # not a readable safetensors file: not ours to classify
        return None
    prefixes = ("", "model.diffusion_model.")
    if any(k.startswith(tuple(f"{p}joint_blocks." for p in prefixes)) for k in keys):
        return "sd3"
    if any(k.startswith(tuple(f"{p}double_blocks." for p in prefixes)) for k in keys):
        return "flux"
    return None


def load_dit(
    path: str | os.PathLike,
    kind: str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    config: str | os.PathLike | None = None,
    quantize: str = "none",
) -> DitParts:
    """Load SD3/SD3.5 or Flux.1 from a local diffusers folder, or from an original single-file checkpoint
    plus ``config`` (a local diffusers folder of the same model for the configs, text encoders, VAE and
    tokenizers the file does not hold). ``quantize="int8"`` quantizes the transformer's Linears while it
    loads (:mod:`.quantize`), so it never exists in memory at full precision."""
    p = Path(path)
    if not p.exists():
        raise HiganbanaError(f"model path {str(p)!r} does not exist")
    found = dit_kind_of(p)
    if found is None:
        raise HiganbanaError(
            f"{str(p)!r} is neither an SD3/Flux diffusers folder (model_index.json naming "
            "StableDiffusion3Pipeline or FluxPipeline) nor an original SD3/Flux .safetensors checkpoint"
        )
    if kind is not None and kind != found:
        raise HiganbanaError(f"{str(p)!r} holds a {found} model, not {kind}")
    with _hub_offline():
        if p.is_dir():
            return _load_folder(p, found, dtype, quantize)
        if config is None:
            raise HiganbanaError(
                f"{str(p)!r} is a single-file {found} checkpoint: give model.config, a local diffusers folder of "
                "the same model, for its configs, text encoders, VAE and tokenizers (nothing is downloaded)"
            )
        return _load_single_file(p, found, dtype, Path(config), quantize)


def _named(root: Path, index: dict[str, Any], entry: str) -> str | None:
    value = index.get(entry)
    ok = isinstance(value, list) and len(value) == 2 and value[1] is not None
    return value[1] if ok and (root / entry).is_dir() else None


def _component(root: Path, index: dict[str, Any], entry: str, allowed: tuple[str, ...], dtype: torch.dtype):
    import transformers

    name = _named(root, index, entry)
    if name is None:
        raise HiganbanaError(f"{str(root)!r}: model_index.json names no {entry}/ (or the folder is missing)")
    if name not in allowed:
        raise HiganbanaError(f"{str(root / entry)!r}: unsupported class {name!r} (expected one of {allowed})")
    cls = getattr(transformers, name)
    if "Tokenizer" in name:
        return cls.from_pretrained(root / entry, local_files_only=True)
    return cls.from_pretrained(
        root, subfolder=entry, dtype=dtype, local_files_only=True, variant=_variant(root / entry)
    )


def _text_parts(root: Path, kind: str, dtype: torch.dtype) -> tuple[list[nn.Module], list, dict[str, Any]]:
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    encoders, tokenizers = [], []
    for te_entry, tok_entry in TEXT_ENTRIES[kind]:
        encoders.append(_component(root, index, te_entry, _TE_CLASSES, dtype))
        tokenizers.append(_component(root, index, tok_entry, _TOKENIZER_CLASSES, dtype))
    scheduler = root / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text(encoding="utf-8")) if scheduler.is_file() else {}
    return encoders, tokenizers, config


def _quantized(quantize: str) -> dict[str, Any]:
    config = loading_config(quantize)
    return {} if config is None else {"quantization_config": config}


def _load_folder(root: Path, kind: str, dtype: torch.dtype, quantize: str = "none") -> DitParts:
    import diffusers

    try:
        cls = getattr(diffusers, TRANSFORMERS[kind])
        if quantize != "none":  # read and quantized tensor by tensor: never the whole model at full precision
            transformer = load_quantized(cls, root / "transformer", dtype, quantize)
        else:
            transformer = cls.from_pretrained(
                root,
                subfolder="transformer",
                torch_dtype=dtype,
                local_files_only=True,
                variant=_variant(root / "transformer"),
            )
        vae = diffusers.AutoencoderKL.from_pretrained(
            root, subfolder="vae", torch_dtype=dtype, local_files_only=True, variant=_variant(root / "vae")
        )
        encoders, tokenizers, scheduler = _text_parts(root, kind, dtype)
    except HiganbanaError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise HiganbanaError(f"cannot load the {kind} diffusers model in {str(root)!r}: {e}") from e
    return _finish(DitParts(kind, transformer, encoders, vae, tokenizers, scheduler))


def _load_single_file(path: Path, kind: str, dtype: torch.dtype, config: Path, quantize: str = "none") -> DitParts:
    import diffusers

    if dit_kind_of(config) != kind:
        raise HiganbanaError(f"model.config {str(config)!r} is not a local diffusers folder of a {kind} model")
    try:
        transformer = getattr(diffusers, TRANSFORMERS[kind]).from_single_file(
            str(path),
            config=str(config),
            subfolder="transformer",
            torch_dtype=dtype,
            local_files_only=True,
            **_quantized(quantize),
        )
    except Exception as e:  # diffusers raises OSError, ValueError, its own and hub errors here
        reason = str(e).strip().rstrip(".")
        raise HiganbanaError(
            f"cannot read the {kind} transformer of the single-file checkpoint {str(path)!r} offline "
            f"({type(e).__name__}: {reason})"
        ) from e
    empty = [n for n, t in [*transformer.named_parameters(), *transformer.named_buffers()] if t.is_meta]
    if empty:  # diffusers leaves what its converter did not find on the meta device, silently
        raise HiganbanaError(
            f"{str(path)!r}: the transformer was not fully read (no weights for {', '.join(empty[:3])}"
            f"{' …' if len(empty) > 3 else ''}); is it a complete {kind} checkpoint of model.config's model?"
        )
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(config, subfolder="vae", torch_dtype=dtype, local_files_only=True)
        encoders, tokenizers, scheduler = _text_parts(config, kind, dtype)
    except HiganbanaError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise HiganbanaError(f"cannot load the rest of the {kind} model from {str(config)!r}: {e}") from e
    return _finish(DitParts(kind, transformer, encoders, vae, tokenizers, scheduler))


def _finish(parts: DitParts) -> DitParts:
    for module in (parts.transformer, parts.vae, *parts.text_encoders):
        if module is not None:
            module.eval()
    return parts

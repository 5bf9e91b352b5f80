"""Stable Diffusion model parts (UNet, text encoders, VAE, tokenizers) loaded from local files only.

:class:`SDParts` is what :mod:`higanbana.formats.sd_network` builds networks on. :func:`load_sd` reads a
diffusers folder (``model_index.json``) or a single ``.safetensors`` checkpoint and never downloads:
every loader runs with ``local_files_only=True`` and a missing config is an error that says what to
provide instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import HiganbanaError

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

SD_KINDS = ("sd1", "sd2", "sdxl")

#: Text-encoder classes a diffusers folder may name (anything else is refused, not imported by name).
_TE_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
_SINGLE_FILE_PIPELINES = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
}


@dataclass
class SDParts:
    """The trainable parts of an SD model and what goes with them.

    ``text_encoders`` is ``[CLIPTextModel]`` on SD1/SD2 and ``[CLIPTextModel,
    CLIPTextModelWithProjection]`` on SDXL; ``tokenizers`` (same order) is ``None`` when the source
    had none. ``v_parameterization`` is true for v-prediction models (e.g. SD2 768-v).
    """

    kind: str
    unet: UNet2DConditionModel
    text_encoders: list[nn.Module]
    vae: nn.Module | None = None
    tokenizers: list | None = None
    v_parameterization: bool = False

    def __post_init__(self) -> None:
        if self.kind not in SD_KINDS:
            raise HiganbanaError(f"unknown model kind {self.kind!r}; expected one of {SD_KINDS}")
        expected = 2 if self.kind == "sdxl" else 1
        if len(self.text_encoders) != expected:
            raise HiganbanaError(f"{self.kind} takes {expected} text encoder(s), got {len(self.text_encoders)}")
        if self.tokenizers is not None and len(self.tokenizers) != expected:
            raise HiganbanaError(f"{self.kind} takes {expected} tokenizer(s), got {len(self.tokenizers)}")

    @property
    def te_prefixes(self) -> list[str]:
        """kohya's text-encoder prefixes: ``["lora_te"]`` on SD1/SD2, ``["lora_te1", "lora_te2"]`` on SDXL."""
        return ["lora_te1", "lora_te2"] if self.kind == "sdxl" else ["lora_te"]


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    """A field of a diffusers/transformers config or a plain dict."""
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _te_config(text_encoder: nn.Module) -> Any:
    config = getattr(text_encoder, "config", None)
    return getattr(config, "text_config", config)


def detect_kind(unet: Any, text_encoders: list[nn.Module] | tuple[nn.Module, ...] = ()) -> str:
    """Which SD family a UNet + text encoders belong to: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.

    - ``sdxl``: two text encoders, or the UNet's ``addition_embed_type == "text_time"``.
    - ``sd2``: ``cross_attention_dim == 1024`` or a 1024-wide text encoder (real SD2), or — the rule
      that also holds for tiny models of any width — the UNet uses linear projections
      (``use_linear_projection``) or the text encoder's ``hidden_act`` is ``"gelu"`` (OpenCLIP-H);
      SD1 has conv projections and CLIP-L's ``quick_gelu``.
    - ``sd1``: everything else.
    """
    config = getattr(unet, "config", unet)
    if len(text_encoders) >= 2 or _cfg(config, "addition_embed_type") == "text_time":
        return "sdxl"
    te_configs = [_te_config(te) for te in text_encoders]
    if _cfg(config, "cross_attention_dim") == 1024 or any(_cfg(c, "hidden_size") == 1024 for c in te_configs):
        return "sd2"
    if _cfg(config, "use_linear_projection", False) or any(_cfg(c, "hidden_act") == "gelu" for c in te_configs):
        return "sd2"
    return "sd1"


def load_sd(
    path: str | os.PathLike,
    kind: str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    config: str | os.PathLike | None = None,
) -> SDParts:
    """Load an SD model from a local diffusers folder or a single ``.safetensors`` checkpoint.

    ``kind`` is detected when not given. ``config`` (single files only) is a local diffusers folder
    or hub id whose configs are used instead of the one diffusers would look up; it must be on disk
    or in the offline Hugging Face cache — nothing is ever downloaded.
    """
    if kind is not None and kind not in SD_KINDS:
        raise HiganbanaError(f"unknown model kind {kind!r}; expected one of {SD_KINDS}")
    p = Path(path)
    if not p.exists():
        raise HiganbanaError(f"model path {str(p)!r} does not exist")
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise HiganbanaError(
                f"{str(p)!r} is a folder without model_index.json; give a diffusers model folder "
                "(unet/, text_encoder/, …, model_index.json) or a single .safetensors checkpoint"
            )
        with _hub_offline():
            return _load_folder(p, kind, dtype)
    if p.suffix.lower() != ".safetensors":
        raise HiganbanaError(
            f"{str(p)!r} is not a .safetensors checkpoint nor a diffusers folder (pickled .ckpt/.pt "
            "checkpoints are not loaded; convert them to .safetensors first)"
        )
    with _hub_offline():
        return _load_single_file(p, kind, dtype, config)


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Switch the Hugging Face hub client to offline mode for the duration (every HTTP request raises).

    ``local_files_only=True`` is not enough: diffusers' ``from_single_file`` retries with downloads
    allowed when the configs are not cached.
    """
    import huggingface_hub.constants as hub_constants

    targets = [hub_constants]
    try:
        import diffusers.utils.constants as diffusers_constants

        targets.append(diffusers_constants)
    except ImportError:  # pragma: no cover - layout of other diffusers versions
        pass
    saved = [(t, t.HF_HUB_OFFLINE) for t in targets if hasattr(t, "HF_HUB_OFFLINE")]
    try:
        for target, _ in saved:
            target.HF_HUB_OFFLINE = True
        yield
    finally:
        for target, value in saved:
            target.HF_HUB_OFFLINE = value


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HiganbanaError(f"cannot read {str(path)!r}: {e}") from e


def _variant(folder: Path) -> str | None:
    """``"fp16"`` when a component folder only has ``*.fp16.*`` weights (a common diffusers layout)."""
    weights = [f.name for f in folder.iterdir() if f.suffix in (".safetensors", ".bin")] if folder.is_dir() else []
    plain = [w for w in weights if ".fp16." not in w]
    return "fp16" if weights and not plain else None


def _load_folder(root: Path, kind: str | None, dtype: torch.dtype) -> SDParts:
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    index = _load_json(root / "model_index.json")

    def named(entry: str) -> str | None:
        value = index.get(entry)
        ok = isinstance(value, list) and len(value) == 2 and value[1] is not None
        return value[1] if ok and (root / entry).is_dir() else None

    try:
        unet = UNet2DConditionModel.from_pretrained(
            root, subfolder="unet", torch_dtype=dtype, local_files_only=True, variant=_variant(root / "unet")
        )
        te_entries = [e for e in ("text_encoder", "text_encoder_2") if named(e)]
        text_encoders = []
        for entry in te_entries:
            cls_name = named(entry)
            if cls_name not in _TE_CLASSES:
                raise HiganbanaError(f"{str(root / entry)!r}: unsupported text encoder class {cls_name!r}")
            cls = getattr(transformers, cls_name)
            te = cls.from_pretrained(
                root, subfolder=entry, dtype=dtype, local_files_only=True, variant=_variant(root / entry)
            )
            text_encoders.append(te)
        vae = None
        if named("vae"):
            vae = AutoencoderKL.from_pretrained(
                root, subfolder="vae", torch_dtype=dtype, local_files_only=True, variant=_variant(root / "vae")
            )
        tok_entries = ["tokenizer", "tokenizer_2"][: len(text_encoders)]
        tokenizers = None
        if text_encoders and all(named(e) for e in tok_entries):
            tokenizers = [
                transformers.CLIPTokenizer.from_pretrained(root / e, local_files_only=True) for e in tok_entries
            ]
    except HiganbanaError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise HiganbanaError(f"cannot load the diffusers model in {str(root)!r}: {e}") from e
    if not text_encoders:
        raise HiganbanaError(f"{str(root)!r} has no text_encoder/ named in model_index.json")
    if kind is None:
        kind = "sdxl" if "XL" in str(index.get("_class_name", "")) else detect_kind(unet, text_encoders)
    scheduler = root / "scheduler" / "scheduler_config.json"
    v_param = scheduler.is_file() and _load_json(scheduler).get("prediction_type") == "v_prediction"
    for module in (unet, vae, *text_encoders):
        if module is not None:
            module.eval()
    return SDParts(kind, unet, text_encoders, vae, tokenizers, v_param)


def _kind_of_checkpoint(path: Path) -> str:
    """The SD family of an original (LDM/SGM) checkpoint, from its text-encoder key names."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise HiganbanaError(f"cannot read the safetensors checkpoint {str(path)!r}: {e}") from e
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise HiganbanaError(
        f"{str(path)!r} is not a recognisable SD1/SD2/SDXL checkpoint (no cond_stage_model/conditioner "
        "keys); pass kind= or give a diffusers folder"
    )


def _load_single_file(path: Path, kind: str | None, dtype: torch.dtype, config: Any) -> SDParts:
    import diffusers

    kind = kind or _kind_of_checkpoint(path)
    pipeline_cls = getattr(diffusers, _SINGLE_FILE_PIPELINES[kind])
    extra = {"config": str(config)} if config is not None else {}
    try:
        pipe = pipeline_cls.from_single_file(
            str(path), torch_dtype=dtype, local_files_only=True, safety_checker=None, **extra
        )
    except Exception as e:  # diffusers raises OSError, ValueError, its own and hub errors here
        reason = str(e).strip().rstrip(".")
        raise HiganbanaError(
            f"cannot load the single-file checkpoint {str(path)!r} offline ({type(e).__name__}: {reason}). "
            "diffusers needs the model's configs, which are never downloaded here: give a diffusers "
            "model folder (with model_index.json) instead, pass config= a local diffusers folder, or "
            "make the configs available in the offline Hugging Face cache"
        ) from e
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if kind == "sdxl" else [])
    components = {"unet": pipe.unet, "vae": pipe.vae, **{f"text_encoder_{i}": te for i, te in enumerate(text_encoders)}}
    for label, module in components.items():
        empty = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if empty:  # diffusers leaves what its converter did not find on the meta device, silently
            raise HiganbanaError(
                f"{str(path)!r}: {label} was not fully read from the checkpoint (no weights for "
                f"{', '.join(empty[:3])}{' …' if len(empty) > 3 else ''}); is it a complete {kind} checkpoint?"
            )
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if kind == "sdxl" else [])
    if any(t is None for t in tokenizers):
        tokenizers = None
    v_param = _cfg(getattr(pipe.scheduler, "config", None), "prediction_type") == "v_prediction"
    return SDParts(kind, pipe.unet, text_encoders, pipe.vae, tokenizers, v_param)

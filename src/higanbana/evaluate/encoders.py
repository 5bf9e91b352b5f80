"""Image and text encoders of the evaluation (docs/design.md §5): DINOv2, CLIP and VGG-19 Gram matrices.

One file on purpose: every encoder shares the preprocessing, the local-only loading and the
protocols, and :func:`load_encoder`/:func:`encoder_kind_of` choose among all of them.

The miniature world's tiny models stand in for them at its scale: a CLIP folder in the DINOv2 slot
gives CLIP's projected image features, and an SD/``AutoencoderKL`` folder in the VGG-19 slot gives
Gram matrices of the VAE encoder's conv features (:class:`VaeStyleEncoder`); see
:func:`encoder_kind_of`.

Models load only from local folders/files or an offline Hugging Face cache — nothing is downloaded; a
missing model raises :class:`~higanbana.errors.HiganbanaError` naming what to provide. Preprocessing
(letterbox/resize, normalisation) is our own, so neither torchvision nor image processors are needed.
transformers is imported lazily, when a model is loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import ConfigError, HiganbanaError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Hugging Face repos tried in the offline cache when no path is given (the paper's encoders).
DEFAULT_MODELS = {
    "dinov2": "facebook/dinov2-large",  # = torch.hub dinov2_vitl14
    "clip": "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K",  # = OpenCLIP ViT-L-14 datacomp_xl_s13b_b90k
}
#: torchvision's IMAGENET1K_V1 VGG-19 file name (looked up in the torch hub checkpoint folder).
VGG19_TORCHVISION_FILE = "vgg19-dcbb9e9d.pth"

# ----------------------------------------------------------------------------------------------
# preprocessing


def _rgb(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise HiganbanaError(f"expected a PIL image, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def letterbox(image: Image.Image, size: int, fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Resize (bicubic, aspect kept) so the long side is ``size`` and pad to ``size``×``size``, centred.

    The paper's preprocessing of dataset images; square images are simply resized.
    """
    image = _rgb(image)
    w, h = image.size
    if w == h:
        return image.resize((size, size), Image.Resampling.BICUBIC)
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", (size, size), tuple(fill))
    canvas.paste(image.resize((nw, nh), Image.Resampling.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
    return canvas


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Resize (bicubic, aspect kept) so the short side is ``size`` (the VGG style-loss preprocessing)."""
    image = _rgb(image)
    w, h = image.size
    scale = size / min(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)


def _to_tensor(images: Iterable[Image.Image], mean: tuple, std: tuple) -> torch.Tensor:
    """Stack same-sized RGB images into a normalised (n, 3, h, w) float32 tensor."""
    arr = np.stack([np.asarray(_rgb(im), dtype=np.float32) / 255.0 for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _check_images(images: list[Image.Image]) -> list[Image.Image]:
    images = list(images)
    if not images:
        raise HiganbanaError("no images to encode: pass a non-empty list of PIL images")
    return images


def _check_batch(batch_size: int) -> int:
    if batch_size < 1:
        raise HiganbanaError(f"batch_size must be >= 1, got {batch_size}")
    return batch_size


# ----------------------------------------------------------------------------------------------
# loading


def _is_repo_id(path: str) -> bool:
    """Whether ``path`` looks like a Hugging Face repo id ("org/name") rather than a file path."""
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and "\\" not in path and not path.startswith((".", "~"))


def _load_pretrained(cls: Any, path: str | os.PathLike, what: str, hint: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` on a local folder or an offline-cache repo id; never downloads."""
    p = Path(path).expanduser()
    if p.exists():
        source: str | Path = p
    elif _is_repo_id(str(path)):
        source = str(path)  # a repo id: looked up in the Hugging Face cache only
    else:
        raise HiganbanaError(f"{what} weights not found at {path}: provide {hint}")
    try:
        return cls.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        if p.exists():
            raise HiganbanaError(f"{what} could not be loaded from {p}: provide {hint} ({exc})") from exc
        raise HiganbanaError(
            f"{what} weights not found at {path} (no such folder, and not in the offline Hugging Face cache): "
            f"provide {hint}"
        ) from exc


DINOV2_HINT = (
    "a local transformers Dinov2Model folder (config.json + model.safetensors, e.g. a snapshot of "
    f"{DEFAULT_MODELS['dinov2']}) or have that repo in the offline Hugging Face cache"
)
CLIP_HINT = (
    "a local transformers CLIPModel folder with its tokenizer files (e.g. a snapshot of "
    f"{DEFAULT_MODELS['clip']}) or have that repo in the offline Hugging Face cache"
)
VAE_HINT = "a diffusers AutoencoderKL folder (config.json + weights) or a Stable Diffusion folder with a vae/ subfolder"
VGG19_HINT = (
    "a torchvision vgg19 state dict file (.pth or .safetensors, keys features.0.weight … features.34.bias; "
    f"torchvision's IMAGENET1K_V1 weights are {VGG19_TORCHVISION_FILE})"
)


# ----------------------------------------------------------------------------------------------
# encoder protocols


class ImageEncoder:
    """Maps images to (n, d) float32 CPU features (not normalised)."""

    name: str = "image"

    @property
    def image_size(self) -> int:
        return self._image_size

    def encode_images(self, images: list[Image.Image], *, batch_size: int = 32) -> torch.Tensor:
        raise NotImplementedError


class TextImageEncoder(ImageEncoder):
    """An image encoder with texts in the same feature space."""

    def encode_texts(self, texts: list[str], *, batch_size: int = 64) -> torch.Tensor:
        raise NotImplementedError


class QualityScorer:
    """Maps images to one quality score each (higher is better); optional, pluggable."""

    name: str = "quality"

    def score(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError


def load_plugin(spec: str, **kw: Any) -> Any:
    """``"package.module:factory"`` → ``factory(**kw)``: how another encoder (ConvNeXt, an image-quality
    scorer) plugs in without changing this package. The factory receives ``device`` (and may ignore it)."""
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise HiganbanaError(f"plug-in {spec!r}: expected 'package.module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise HiganbanaError(f"plug-in {spec!r} cannot be imported ({exc})") from exc
    return factory(**kw)


class StyleEncoder:
    """Maps images to per-layer Gram matrices (one (n, c_i, c_i) tensor per layer)."""

    name: str = "style"

    def gram_matrices(self, images: list[Image.Image], *, batch_size: int = 8) -> list[torch.Tensor]:
        raise NotImplementedError


class _HFImageEncoder(ImageEncoder):
    """Shared batching for the transformers-backed encoders."""

    _mean: tuple = IMAGENET_MEAN
    _std: tuple = IMAGENET_STD

    def __init__(self, model: nn.Module, *, device: str | torch.device, dtype: torch.dtype, image_size: int,
                 letterbox: bool) -> None:  # fmt: skip
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device, dtype).eval()
        self._image_size = int(image_size)
        self.letterbox = letterbox

    def _prepare(self, image: Image.Image) -> Image.Image:
        if self.letterbox:
            return letterbox(image, self._image_size)
        return _rgb(image).resize((self._image_size, self._image_size), Image.Resampling.BICUBIC)

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image], *, batch_size: int = 32) -> torch.Tensor:
        """Preprocess each image to ``image_size`` and return (n, d) float32 CPU features."""
        images, batch_size = _check_images(images), _check_batch(batch_size)
        out = []
        for i in range(0, len(images), batch_size):
            x = _to_tensor([self._prepare(im) for im in images[i : i + batch_size]], self._mean, self._std)
            out.append(self._features(x.to(self.device, self.dtype)).float().cpu())
        return torch.cat(out)


def _pooled(output: Any) -> torch.Tensor:
    """A features tensor from a transformers output (v5 returns a ModelOutput, v4 a tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


# ----------------------------------------------------------------------------------------------
# DINOv2


class Dinov2Encoder(_HFImageEncoder):
    """DINOv2 (transformers ``Dinov2Model``): the CLS token after the final layernorm.

    That is ``pooler_output`` = ``last_hidden_state[:, 0]`` (already layer-normed), the same vector as
    torch.hub's ``dinov2_vitl14(x)`` used by the paper. ImageNet normalisation; images letterboxed (or,
    with ``letterbox=False``, plainly resized) to ``image_size`` (position embeddings are interpolated).
    """

    name = "dinov2"

    def __init__(self, model_or_path: Any, *, device: str | torch.device = "cpu", image_size: int = 224,
                 dtype: torch.dtype = torch.float32, letterbox: bool = True) -> None:  # fmt: skip
        if isinstance(model_or_path, nn.Module):
            model = model_or_path
        else:
            from transformers import Dinov2Model

            model = _load_pretrained(Dinov2Model, model_or_path, "DINOv2", DINOV2_HINT)
        super().__init__(model, device=device, dtype=dtype, image_size=image_size, letterbox=letterbox)

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output


# ----------------------------------------------------------------------------------------------
# CLIP


class ClipEncoder(_HFImageEncoder, TextImageEncoder):
    """CLIP (transformers ``CLIPModel``): projected image and text features in one space.

    Images are letterboxed to the vision tower's size with CLIP's mean/std; texts are tokenized with
    the model folder's tokenizer (or ``processor_or_path``), padded and truncated to the context length.
    """

    name = "clip"
    _mean = CLIP_MEAN
    _std = CLIP_STD

    def __init__(self, model_or_path: Any, *, processor_or_path: Any = None, device: str | torch.device = "cpu",
                 image_size: int | None = None, dtype: torch.dtype = torch.float32,
                 letterbox: bool = True) -> None:  # fmt: skip
        if isinstance(model_or_path, nn.Module):
            model = model_or_path
        else:
            from transformers import CLIPModel

            model = _load_pretrained(CLIPModel, model_or_path, "CLIP", CLIP_HINT)
        tok_source = processor_or_path if processor_or_path is not None else model_or_path
        if isinstance(tok_source, nn.Module):
            raise HiganbanaError(
                "ClipEncoder got a CLIPModel instance but no tokenizer: pass processor_or_path= (a tokenizer, "
                "a processor or a local folder holding the CLIP tokenizer files)"
            )
        if isinstance(tok_source, str | os.PathLike):
            from transformers import AutoTokenizer

            tok_source = _load_pretrained(AutoTokenizer, tok_source, "CLIP tokenizer", CLIP_HINT)
        self.tokenizer = getattr(tok_source, "tokenizer", tok_source)  # a processor carries its tokenizer
        size = image_size if image_size is not None else model.config.vision_config.image_size
        super().__init__(model, device=device, dtype=dtype, image_size=size, letterbox=letterbox)
        self.max_length = int(
            min(model.config.text_config.max_position_embeddings, getattr(self.tokenizer, "model_max_length", 77))
        )

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    @torch.no_grad()
    def encode_texts(self, texts: list[str], *, batch_size: int = 64) -> torch.Tensor:
        """Tokenize (pad, truncate to the context length) and return (n, d) float32 CPU features."""
        texts, batch_size = list(texts), _check_batch(batch_size)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise HiganbanaError("encode_texts needs a non-empty list of strings")
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            feats = self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
            )
            out.append(_pooled(feats).float().cpu())
        return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# VGG-19 (Gram matrices for the style loss)

#: VGG-19's conv widths per stage (4 stages of convs after the first two of 2 each: 2, 2, 4, 4, 4).
VGG19_WIDTHS = (64, 128, 256, 512, 512)
_VGG19_CONVS_PER_STAGE = (2, 2, 4, 4, 4)
#: Indices of conv1_1, conv2_1, conv3_1, conv4_1, conv5_1 in torchvision's ``vgg19().features``.
VGG19_STYLE_LAYERS = (0, 5, 10, 19, 28)


def vgg19_features(widths: tuple[int, ...] = VGG19_WIDTHS) -> nn.Sequential:
    """VGG-19's ``features`` stack with torchvision's module indexing (conv 3×3, ReLU, 2×2 max-pool).

    ReLUs are not in-place, so the conv outputs tapped for the Gram matrices stay pre-activation.
    """
    layers: list[nn.Module] = []
    in_ch = 3
    for width, n in zip(widths, _VGG19_CONVS_PER_STAGE, strict=True):
        for _ in range(n):
            layers += [nn.Conv2d(in_ch, width, kernel_size=3, padding=1), nn.ReLU()]
            in_ch = width
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def _vgg_state_dict(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Keep the ``features`` weights, with or without the ``features.`` prefix; drop ``classifier.*``."""
    out = {}
    for key, value in sd.items():
        if key.startswith("classifier."):
            continue
        out[key.removeprefix("features.")] = value
    if not out:
        raise HiganbanaError(f"{source} holds no VGG-19 features weights: provide {VGG19_HINT}")
    return out


def _read_vgg_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise HiganbanaError(f"VGG-19 weights not found at {path}: provide {VGG19_HINT}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HiganbanaError(f"could not read VGG-19 weights from {path}: provide {VGG19_HINT} ({exc})") from exc
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise HiganbanaError(f"{path} is not a state dict: provide {VGG19_HINT}")
    return dict(sd), {}


class Vgg19StyleEncoder(StyleEncoder):
    """VGG-19 Gram matrices G = ψψᵀ/(c·h·w) at conv1_1 … conv5_1, before ReLU (Johnson et al.'s style loss).

    ``weights``: a torchvision ``vgg19`` state dict or a file holding one (``.pth``/``.safetensors``;
    ``features.`` prefix optional, ``classifier.*`` ignored). ``None`` is an error unless
    ``random_init=True`` (tests). Images are resized (short side ``short_side``), ImageNet-normalised,
    and batched by size, so images of any shape can be mixed in one call. ``widths`` shrinks the
    network for tests; a file whose metadata records ``widths`` (the tests' tiny VGG) is read at them.
    """

    name = "vgg19"

    def __init__(self, weights: str | os.PathLike | Mapping[str, torch.Tensor] | None, *,
                 device: str | torch.device = "cpu", short_side: int = 224, random_init: bool = False,
                 widths: tuple[int, ...] | None = None, seed: int = 0) -> None:  # fmt: skip
        self.device = torch.device(device)
        self.short_side = int(short_side)
        metadata: dict[str, str] = {}
        if weights is None:
            if not random_init:
                raise HiganbanaError(
                    f"VGG-19 weights are required: provide {VGG19_HINT} (random_init=True is for tests only)"
                )
            sd, source = None, "random init"
        elif isinstance(weights, Mapping):
            sd, source = _vgg_state_dict(weights, "the given state dict"), "the given state dict"
        else:
            path = Path(weights).expanduser()
            raw, metadata = _read_vgg_file(path)
            sd, source = _vgg_state_dict(raw, str(path)), str(path)
        if widths is None:
            widths = tuple(int(w) for w in metadata["widths"].split(",")) if "widths" in metadata else VGG19_WIDTHS
        if len(widths) != 5:
            raise HiganbanaError(f"VGG-19 widths must give 5 stage widths, got {widths}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.features = vgg19_features(tuple(widths))
        if sd is not None:
            self._load(sd, source)
        # the full stack is kept so torchvision files load as they are; forward stops at conv5_1
        self.features = self.features.to(self.device).eval().requires_grad_(False)
        self.layers = VGG19_STYLE_LAYERS

    def _load(self, sd: dict[str, torch.Tensor], source: str) -> None:
        expected = self.features.state_dict()
        missing = [k for k in expected if k not in sd]
        unexpected = [k for k in sd if k not in expected]
        if missing or unexpected:
            raise HiganbanaError(
                f"{source} is not a VGG-19 features state dict: missing keys {missing[:4]}, unexpected keys "
                f"{unexpected[:4]} (expected features.0.weight … features.34.bias); provide {VGG19_HINT}"
            )
        for key, ref in expected.items():
            if tuple(sd[key].shape) != tuple(ref.shape):
                raise HiganbanaError(
                    f"{source}: features.{key} has shape {tuple(sd[key].shape)}, VGG-19 expects "
                    f"{tuple(ref.shape)}; provide {VGG19_HINT}"
                )
        self.features.load_state_dict({k: v.float() for k, v in sd.items()})

    @property
    def image_size(self) -> int:
        return self.short_side

    def _activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        last = max(self.layers)
        for i, module in enumerate(self.features):
            x = module(x)
            if i in self.layers:
                taps.append(x)
            if i == last:
                break
        return taps

    @staticmethod
    def gram(psi: torch.Tensor) -> torch.Tensor:
        """(n, c, h, w) activations → (n, c, c) Gram matrices ψψᵀ/(c·h·w)."""
        n, c, h, w = psi.shape
        flat = psi.reshape(n, c, h * w)
        return flat @ flat.transpose(1, 2) / (c * h * w)

    @torch.no_grad()
    def gram_matrices(self, images: list[Image.Image], *, batch_size: int = 8) -> list[torch.Tensor]:
        """One (n, c_i, c_i) float32 CPU tensor per tapped layer, in the order of ``images``."""
        images, batch_size = _check_images(images), _check_batch(batch_size)
        prepared = [resize_short_side(im, self.short_side) for im in images]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(prepared):
            by_size.setdefault(im.size, []).append(i)
        results: list[list[torch.Tensor | None]] = [[None] * len(images) for _ in self.layers]
        for indices in by_size.values():
            for j in range(0, len(indices), batch_size):
                chunk = indices[j : j + batch_size]
                x = _to_tensor([prepared[i] for i in chunk], IMAGENET_MEAN, IMAGENET_STD).to(self.device)
                for layer, psi in enumerate(self._activations(x)):
                    grams = self.gram(psi.float()).cpu()
                    for k, i in enumerate(chunk):
                        results[layer][i] = grams[k]
        return [torch.stack(per_layer) for per_layer in results]  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# the miniature world's VAE (Gram matrices for the style loss at the world's scale)


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """(n, 3, h, w) float32 in [-1, 1] (the VAE's range) from same-sized PIL images (as RGB)."""
    arr = np.stack([np.asarray(_rgb(im), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0


def _read_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict; ``{}`` when it is missing or not a JSON object."""
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _vae_folder(path: Path) -> Path | None:
    """The folder holding an ``AutoencoderKL`` config: ``path`` itself or its ``vae/``; else ``None``."""
    for folder in (path, path / "vae"):
        if _read_config(folder).get("_class_name") == "AutoencoderKL":
            return folder
    return None


class VaeStyleEncoder(StyleEncoder):
    """Gram matrices of the miniature VAE encoder's conv features (``conv_in`` and each down block):
    a conv net trained on the world stands in for VGG-19 in the style loss, at the world's scale.

    ``vae_or_path`` is an ``AutoencoderKL`` or a diffusers folder holding one (an SD folder's
    ``vae/`` or the SD folder itself). Images are resized to the VAE's ``sample_size``."""

    name = "vae_gram"

    def __init__(self, vae_or_path: Any, *, device: str | torch.device = "cpu") -> None:
        if isinstance(vae_or_path, nn.Module):
            vae = vae_or_path
        else:
            from diffusers import AutoencoderKL

            path = Path(vae_or_path).expanduser()
            folder = _vae_folder(path)
            if folder is None:
                raise ConfigError(
                    f"{str(path)!r} holds no AutoencoderKL (no config.json naming it): provide {VAE_HINT}"
                )
            try:
                vae = AutoencoderKL.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise HiganbanaError(
                    f"AutoencoderKL could not be loaded from {folder}: provide {VAE_HINT} ({exc})"
                ) from exc
        self.device = torch.device(device)
        self.vae = vae.eval().to(self.device).requires_grad_(False)
        if self.vae.dtype != torch.float32:
            self.vae = self.vae.float()

    @property
    def image_size(self) -> int:
        return int(self.vae.config.sample_size)

    def _activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        enc = self.vae.encoder
        x = enc.conv_in(x)
        taps = [x]
        for block in enc.down_blocks:
            x = block(x)
            taps.append(x)
        return taps

    @torch.no_grad()
    def gram_matrices(self, images: list[Image.Image], *, batch_size: int = 8) -> list[torch.Tensor]:
        """One (n, c_i, c_i) float32 CPU tensor per tapped layer, in the order of ``images``."""
        images = list(images)
        if not images:
            raise ConfigError("gram_matrices needs at least one image")
        batch_size = _check_batch(batch_size)
        size = self.image_size
        prepared = [_rgb(im).resize((size, size), Image.Resampling.BICUBIC) for im in images]
        chunks = []
        for i in range(0, len(prepared), batch_size):
            x = images_to_tensor(prepared[i : i + batch_size]).to(self.device)
            chunks.append([Vgg19StyleEncoder.gram(a.float()).cpu() for a in self._activations(x)])
        return [torch.cat(per_layer) for per_layer in zip(*chunks, strict=True)]


# ----------------------------------------------------------------------------------------------
# factory

ENCODER_KINDS = ("dinov2", "clip", "clip_image", "vgg19", "vae_gram")
#: The evaluation's encoder slots (``[encoders]`` keys) and what each one computes.
ENCODER_SLOTS = ("dinov2", "clip", "vgg19")


def load_encoder(kind: str, path: Any = None, **kw: Any) -> ImageEncoder | StyleEncoder:
    """Build the ``kind`` encoder from a local path (or offline cache); ``kind`` is one of

    - ``"dinov2"``: :class:`Dinov2Encoder` (a transformers ``Dinov2Model`` folder);
    - ``"clip"``: :class:`ClipEncoder` (a transformers ``CLIPModel`` folder with its tokenizer);
    - ``"clip_image"``: the same :class:`ClipEncoder`, used as a plain image encoder (its projected
      image features stand in for DINOv2's, e.g. the miniature world's CLIP);
    - ``"vgg19"``: :class:`Vgg19StyleEncoder` (a torchvision ``vgg19`` state dict file);
    - ``"vae_gram"``: :class:`VaeStyleEncoder` (an ``AutoencoderKL`` folder or an SD folder with ``vae/``).

    ``path=None`` uses the paper's model: the default repo in the offline Hugging Face cache, or for
    VGG-19 torchvision's file in the torch hub checkpoint folder (``"vae_gram"`` needs a path).
    :func:`encoder_kind_of` picks the kind for an evaluation slot from the files at a path.
    """
    key = kind.lower().replace("-", "").replace("_", "")
    if key == "dinov2":
        return Dinov2Encoder(path if path is not None else DEFAULT_MODELS["dinov2"], **kw)
    if key in ("clip", "clipimage"):
        return ClipEncoder(path if path is not None else DEFAULT_MODELS["clip"], **kw)
    if key == "vgg19":
        if path is None and not kw.get("random_init"):
            path = Path(torch.hub.get_dir()) / "checkpoints" / VGG19_TORCHVISION_FILE
        return Vgg19StyleEncoder(path, **kw)
    if key == "vaegram":
        if path is None:
            raise HiganbanaError(f"encoder kind {kind!r} needs a path: provide {VAE_HINT}")
        return VaeStyleEncoder(path, **kw)
    raise HiganbanaError(f"unknown encoder kind {kind!r}: expected one of {ENCODER_KINDS}")


def encoder_kind_of(slot: str, path: Any) -> str:
    """The :func:`load_encoder` kind for the evaluation slot ``slot`` ("dinov2" | "clip" | "vgg19") at ``path``.

    Reads only ``config.json`` files, never weights:

    - ``dinov2`` slot: a folder whose ``config.json`` has ``"model_type": "clip"`` → ``"clip_image"``
      (CLIP's projected image features stand in for DINOv2's); otherwise ``"dinov2"``;
    - ``clip`` slot: always ``"clip"``;
    - ``vgg19`` slot: a folder holding an ``AutoencoderKL`` (its own ``config.json`` names it, or its
      ``vae/`` subfolder's does) → ``"vae_gram"``; otherwise ``"vgg19"``.

    ``path=None`` and Hugging Face repo ids ("org/name", looked up in the offline cache) keep the
    slot's own kind; any other path that does not exist raises :class:`~higanbana.errors.HiganbanaError`.
    """
    if slot not in ENCODER_SLOTS:
        raise HiganbanaError(f"unknown encoder slot {slot!r}: expected one of {ENCODER_SLOTS}")
    if path is None:
        return slot
    p = Path(path).expanduser()
    if not p.exists():
        if slot != "vgg19" and _is_repo_id(str(path)):
            return slot
        hint = {"dinov2": f"{DINOV2_HINT}, or a CLIPModel folder", "clip": CLIP_HINT,
                "vgg19": f"{VGG19_HINT}, or {VAE_HINT}"}[slot]  # fmt: skip
        raise HiganbanaError(f"encoders.{slot}: {path} does not exist: provide {hint}")
    if slot == "dinov2" and p.is_dir() and _read_config(p).get("model_type") == "clip":
        return "clip_image"
    if slot == "vgg19" and p.is_dir() and _vae_folder(p) is not None:
        return "vae_gram"
    return slot

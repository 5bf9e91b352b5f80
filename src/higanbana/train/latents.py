"""VAE latent cache: encode each training image once, in memory or on disk.

The cache stores the VAE's latent *distribution parameters* (mean and logvar, as diffusers'
``DiagonalGaussianDistribution.parameters``), not one sample: training draws a fresh latent every
step with :func:`sample_latents` from a seeded generator, so the cached and uncached paths give the
same numbers and caching does not freeze the VAE's sampling noise.

Disk entries are named by the image's content fingerprint, the flip, the bucket, the storage dtype
and the VAE's fingerprint (plus a pipeline version). A changed image, bucket or VAE therefore simply
looks for a different file; stale files are never read (and never deleted: clear the folder to
reclaim space). Files are written to a temporary name and moved into place, so an interrupted run
never leaves a half-written entry, and the temporaries a killed run left are removed when the next
run opens the cache.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from ..errors import ConfigError, HiganbanaError
from ..safeio import atomic_path, clean_stale_temps
from .data import TrainingData

__all__ = ["CACHE_MODES", "LatentCache", "encode_pixels", "sample_latents", "vae_fingerprint"]

CACHE_MODES = ("memory", "disk")
#: bump when the pixel pipeline (decode, resize, crop, normalisation) changes: old disk entries go stale
_PIPELINE_VERSION = "v1"


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def vae_fingerprint(vae) -> str:
    """sha1 over the VAE's config, dtype and the weights that encoding uses.

    Only the encoder side (``encoder`` and ``quant_conv``) decides the latents, so a decoder-only
    fine-tune keeps the cache valid; those weights are hashed completely (about 35M parameters for
    SD's VAE, a fraction of a second), so any change to them is seen."""
    h = hashlib.sha1()
    config = getattr(vae, "config", None)
    # keys starting with "_" (_name_or_path, _diffusers_version, ...) say where it came from, not what it is
    settings = {k: v for k, v in dict(config or {}).items() if not str(k).startswith("_")}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    parts = [getattr(vae, name) for name in ("encoder", "quant_conv") if getattr(vae, name, None) is not None]
    modules = parts or [vae]
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(_tensor_bytes(tensor))
    return h.hexdigest()


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Distribution parameters (B, 2C, h, w) of ``pixels`` (B, 3, H, W) in [-1, 1]."""
    param = next(vae.parameters())
    out = vae.encode(pixels.to(device=param.device, dtype=param.dtype))
    dist = out.latent_dist if hasattr(out, "latent_dist") else out[0]
    return dist.parameters


def sample_latents(
    params: torch.Tensor, generator: torch.Generator, scaling_factor: float, shift_factor: float | None = None
) -> torch.Tensor:
    """A latent drawn from cached distribution ``params`` ((2C, h, w) or (B, 2C, h, w)):
    ``mean + exp(logvar / 2) * noise``, then ``(z - shift) * scaling`` (SD: shift None).

    logvar is clamped to [-30, 20] as diffusers does. The noise is drawn in float32 on the
    generator's device and then moved to ``params``' device and dtype, so a CPU generator gives the
    same latents whether ``params`` live on the CPU or a GPU."""
    mean, logvar = params.chunk(2, dim=-3)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
    noise = noise.to(device=params.device, dtype=mean.dtype)
    z = mean + std * noise
    if shift_factor is not None:
        z = z - shift_factor
    return z * scaling_factor


class LatentCache:
    """Latent distribution parameters of every (item, flip) of ``data``, in memory or on disk.

    ``get`` returns a CPU tensor of ``dtype``; an entry missing at ``get`` time is encoded on the
    spot (and stored), so :meth:`fill` is an optimisation, not a requirement. ``device`` is where
    the VAE runs (the VAE is not moved; pass the device it is on)."""

    def __init__(
        self,
        vae,
        data: TrainingData,
        *,
        mode: str = "memory",
        folder: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        batch_size: int = 4,
        progress: bool = True,
    ) -> None:
        if mode not in CACHE_MODES:
            raise ConfigError(f"data.cache_latents must be one of {CACHE_MODES}, got {mode!r}")
        if mode == "disk" and folder is None:
            raise ConfigError("data.cache_dir is required when data.cache_latents = 'disk'")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"latent cache batch_size must be a positive integer, got {batch_size!r}")
        self.vae, self.data, self.mode = vae, data, mode
        self.folder = Path(folder) if folder is not None else None
        self.dtype, self.device, self.batch_size, self.progress = dtype, torch.device(device), batch_size, progress
        self.vae_fp = vae_fingerprint(vae)
        self._memory: dict[tuple[int, bool], torch.Tensor] = {}
        if self.folder is not None and mode == "disk":
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise HiganbanaError(f"data.cache_dir: cannot write {self.folder}: {exc.strerror or exc}") from None
            clean_stale_temps(self.folder)  # a killed run's temporaries (entries are then written with sweep=False)

    # --- keys and files --------------------------------------------------------------------

    def entries(self) -> list[tuple[int, bool]]:
        """Every (item index, flip) the training can ask for: flipped only where the subset has flip_aug."""
        out = []
        for index, item in enumerate(self.data.items):
            out.append((index, False))
            if self.data.subsets[item.subset].flip_aug:
                out.append((index, True))
        return out

    def path(self, index: int, flip: bool) -> Path:
        """The disk file of (index, flip): fingerprint, bucket, flip, dtype and VAE in the name."""
        if self.folder is None:
            raise ConfigError("this latent cache has no folder (mode 'memory')")
        item = self.data.items[index]
        w, h = item.bucket
        dtype = str(self.dtype).removeprefix("torch.")
        name = f"{item.fingerprint}-{w}x{h}-{'flip' if flip else 'noflip'}-{dtype}-{self.vae_fp[:16]}"
        return self.folder / f"{name}-{_PIPELINE_VERSION}.safetensors"

    def _has(self, key: tuple[int, bool]) -> bool:
        if self.mode == "memory":
            return key in self._memory
        return self.path(*key).is_file()

    # --- encoding --------------------------------------------------------------------------

    def _encode(self, keys: list[tuple[int, bool]]) -> torch.Tensor:
        pixels = torch.stack([self.data.load_pixels(i, flip) for i, flip in keys]).to(self.device)
        return encode_pixels(self.vae, pixels).to(device="cpu", dtype=self.dtype)

    def _store(self, key: tuple[int, bool], params: torch.Tensor) -> None:
        params = params.contiguous()
        if self.mode == "memory":
            self._memory[key] = params
            return
        from safetensors.torch import save_file

        target = self.path(*key)
        item = self.data.items[key[0]]
        meta = {"image": str(item.path), "bucket": f"{item.bucket[0]}x{item.bucket[1]}", "vae": self.vae_fp}
        with atomic_path(target, sweep=False) as tmp:
            save_file({"params": params}, str(tmp), metadata=meta)

    def fill(self) -> None:
        """Encode every missing (item, flip) up front, batched per bucket, with a progress bar."""
        missing = [key for key in self.entries() if not self._has(key)]
        if not missing:
            return
        by_bucket: dict[tuple[int, int], list[tuple[int, bool]]] = {}
        for key in missing:
            by_bucket.setdefault(self.data.items[key[0]].bucket, []).append(key)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(missing), desc="caching latents", unit="img")
        try:
            for keys in by_bucket.values():
                for start in range(0, len(keys), self.batch_size):
                    chunk = keys[start : start + self.batch_size]
                    for key, params in zip(chunk, self._encode(chunk), strict=True):
                        self._store(key, params)
                    if bar is not None:
                        bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()

    def get(self, index: int, flip: bool) -> torch.Tensor:
        """Distribution parameters (2C, h, w) of item ``index`` (flipped or not), on the CPU."""
        key = (index, bool(flip))
        if self.mode == "memory":
            if key not in self._memory:
                self._store(key, self._encode([key])[0])
            return self._memory[key]
        path = self.path(*key)
        if path.is_file():
            from safetensors.torch import load_file

            try:
                return load_file(str(path))["params"]
            except Exception as exc:  # a damaged file: re-encode rather than stop training
                warnings.warn(f"latent cache entry {path} is unreadable ({exc}); re-encoding it", stacklevel=2)
        params = self._encode([key])[0]
        self._store(key, params)  # (an unwritable entry: "cannot write PATH: reason", from safeio)
        return params

"""File formats: safe safetensors IO with our metadata (kohya/PEFT naming comes with the files issue)."""

from .safetensors_io import FORMAT_VERSION, load_tensors, save_tensors

__all__ = ["FORMAT_VERSION", "load_tensors", "save_tensors"]

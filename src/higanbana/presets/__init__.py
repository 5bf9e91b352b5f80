"""Built-in network presets: which layers of a UNet / text encoder to adapt, as TOML files.

A preset is plain data in the schema of :class:`higanbana.network.NetworkConfig` (``[unet]``,
``[text_encoder]``, ``[model]`` targets, ``enable_conv``, ``train_norm``, ``[[rules]]``). The names
follow LyCORIS' built-in presets so users can keep their habits.
"""

from __future__ import annotations

import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError, nearest
from ..schema import load_toml


def list_presets() -> list[str]:
    """Names of the presets shipped with higanbana."""
    return sorted(p.name[: -len(".toml")] for p in resources.files(__name__).iterdir() if p.name.endswith(".toml"))


def load_preset(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """A built-in preset by name, or a TOML file by path, as a plain dict."""
    text = str(name_or_path)
    if text.endswith(".toml") or os.sep in text:
        return load_toml(Path(text), "preset file")
    names = list_presets()
    if text not in names:
        raise ConfigError(f"unknown preset {text!r}{nearest(text, names)}; built-in presets: {', '.join(names)}")
    return tomllib.loads(resources.files(__name__).joinpath(f"{text}.toml").read_text())

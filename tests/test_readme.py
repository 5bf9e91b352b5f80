"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert {"lokr_w1", "alpha"} <= set(namespace["tensors"])
    assert not namespace["adapter"].merged


def test_readme_whole_model_example_runs(tmp_path, monkeypatch):
    from higanbana.models.tiny import save_tiny_sd, tiny_sd_parts

    block = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[1]
    folder = save_tiny_sd(tiny_sd_parts("sdxl"), tmp_path / "sdxl")
    assert "path/to/sdxl-diffusers-folder" in block
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.replace("path/to/sdxl-diffusers-folder", str(folder)), "README.md", "exec"), namespace)
    assert namespace["sd"].kind == "sdxl"
    loaded = namespace["load_sd_network"](tmp_path / "my.safetensors", namespace["sd"])
    assert set(loaded.adapters) == set(namespace["net"].adapters)

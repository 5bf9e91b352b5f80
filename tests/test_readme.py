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
    """As written, on the shipped miniature SD1; and with an SDXL folder where the comment says so."""
    from higanbana.models.tiny import save_tiny_sd, tiny_sd_parts

    block = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[1]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["sd"].kind == "sd1"
    loaded = namespace["load_sd_network"](tmp_path / "my.safetensors", namespace["sd"])
    assert set(loaded.adapters) == set(namespace["net"].adapters)

    folder = save_tiny_sd(tiny_sd_parts("sdxl"), tmp_path / "sdxl")
    yours = 'load_sd("path/to/sdxl-diffusers-folder")'
    assert yours in block
    sdxl = re.sub(r"load_sd\(shipped_model\(\)\).*", f"load_sd({str(folder)!r})", block)
    namespace = {}
    exec(compile(sdxl, "README.md", "exec"), namespace)
    assert namespace["sd"].kind == "sdxl"


def test_readme_training_config_is_valid_and_dry_runs(tmp_path, monkeypatch, capsys):
    """The README's TOML is a valid trainer config; with real paths it dry-runs."""
    from higanbana.cli import main
    from higanbana.models.tiny import save_tiny_sd, tiny_sd_parts
    from tests.train.test_trainer import make_images

    block = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S)[0]
    folder = save_tiny_sd(tiny_sd_parts("sd1", with_vae=True), tmp_path / "sd15")
    make_images(tmp_path / "images" / "5_sks toy")
    text = block.replace("path/to/sd15-diffusers-folder", str(folder)).replace(
        "path/to/images", str(tmp_path / "images")
    )
    (tmp_path / "my_lora.toml").write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    args = [
        "train",
        "my_lora.toml",
        "--dry-run",
        "data.resolution=32",
        "data.min_bucket_reso=16",
        "data.bucket_reso_steps=8",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "lokr" in out and "5_sks toy" in out

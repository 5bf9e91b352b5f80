"""kohya ``ss_*`` metadata, ``sshs_*`` hashes, sai modelspec keys and base-model classification."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load, save

from higanbana.formats.metadata import (
    SS_METADATA_MINIMUM_KEYS,
    kohya_metadata,
    model_hashes,
    modelspec_metadata,
    read_base_model,
)


def _tensors(big: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 768 if big else 8  # 768*768*2 float32 = 4.5 MiB > the 1 MiB legacy offset
    return {
        "lora_unet_x.lora_down.weight": torch.randn(4, n, generator=g),
        "lora_unet_x.lora_up.weight": torch.randn(n, 4, generator=g),
        "lora_unet_x.alpha": torch.tensor(4.0),
        "lora_unet_y.lora_down.weight": torch.randn(n, n, generator=g) if big else torch.randn(4, 8, generator=g),
    }


def _meta(**kw) -> dict[str, str]:
    args = dict(base="sd1", network_dim=16, network_alpha=8, algo="lora", output_name="my_lora")
    args.update(kw)
    return kohya_metadata(**args)


def _independent_payload_hash(tensors, metadata) -> str:
    data = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    (n,) = struct.unpack("<Q", data[:8])
    json.loads(data[8 : 8 + n])  # the header really is the JSON that precedes the payload
    return hashlib.sha256(data[8 + n :]).hexdigest()


# ---------------------------------------------------------------- kohya ss_* keys


def test_kohya_minimum_keys_all_strings():
    meta = _meta(network_args={"conv_dim": 8, "conv_alpha": 4.0}, training={"seed": 42, "ss_steps": 100})
    for key in (*SS_METADATA_MINIMUM_KEYS, "ss_output_name"):
        assert key in meta
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["ss_v2"] == "False"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert meta["ss_network_dim"] == "16"
    assert meta["ss_network_alpha"] == "8.0"
    assert meta["ss_output_name"] == "my_lora"
    assert meta["ss_seed"] == "42" and meta["ss_steps"] == "100"


def test_network_args_json_with_algo():
    meta = _meta(algo="loha", network_args={"conv_dim": 8, "use_tucker": True})
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == "loha"
    assert args == {"algo": "loha", "conv_dim": "8", "use_tucker": "True"}  # kohya's k=v strings
    assert json.loads(_meta()["ss_network_args"]) == {"algo": "lora"}
    with pytest.raises(ValueError):
        _meta(algo="loha", network_args={"algo": "lokr"})


@pytest.mark.parametrize(
    ("base", "v", "version", "v2"),
    [
        ("sd1", False, "sd_v1", "False"),
        ("sd1", True, "sd_v1_v", "False"),
        ("sd2", False, "sd_v2", "True"),
        ("sd2", True, "sd_v2_v", "True"),
        ("sdxl", False, "sdxl_base_v1-0", "False"),
    ],
)
def test_base_model_version_strings(base, v, version, v2):
    meta = _meta(base=base, v_parameterization=v)
    assert meta["ss_base_model_version"] == version
    assert meta["ss_v2"] == v2


def test_training_facts_containers_and_collisions():
    meta = _meta(training={"tag_frequency": {"d": {"cat": 3}}, "ss_dataset_dirs": {"d": {"n_repeats": 1}}})
    assert json.loads(meta["ss_tag_frequency"]) == {"d": {"cat": 3}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"d": {"n_repeats": 1}}
    with pytest.raises(ValueError):
        _meta(training={"network_dim": 4})
    with pytest.raises(ValueError):
        _meta(base="sd4")
    # the diffusion transformers: kohya's sd3/flux trainers' versions, never v2
    assert _meta(base="flux")["ss_base_model_version"] == "flux1" and _meta(base="flux")["ss_v2"] == "False"
    assert _meta(base="sd3")["ss_base_model_version"] == "sd3"


# ---------------------------------------------------------------- sshs hashes


def test_model_hash_matches_independent_computation():
    tensors, meta = _tensors(), _meta()
    model_hash, legacy = model_hashes(tensors, meta)
    assert model_hash == _independent_payload_hash(tensors, meta)
    assert len(model_hash) == 64 and len(legacy) == 8


def test_model_hash_ignores_non_ss_metadata_and_tracks_tensors():
    tensors, meta = _tensors(), _meta()
    base = model_hashes(tensors, meta)
    extra = {**meta, **modelspec_metadata(base="sd1", title="x"), "higanbana.format_version": "1"}
    assert model_hashes(tensors, extra) == base  # both hashes: non-ss_ keys are dropped before serialising
    changed = dict(tensors)
    changed["lora_unet_x.alpha"] = torch.tensor(2.0)
    assert model_hashes(changed, meta)[0] != base[0]


def test_legacy_hash_definition_on_large_file():
    tensors, meta = _tensors(big=True), _meta()
    data = save(tensors, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    assert len(data) > 0x110000
    expected = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    model_hash, legacy = model_hashes(tensors, meta)
    assert legacy == expected
    assert model_hash == _independent_payload_hash(tensors, meta)
    # The legacy hash reads the whole file, header included, so ss_* metadata (which shifts the payload) moves it;
    # a tensor change inside the window moves it too.
    assert model_hashes(tensors, {**meta, "ss_training_comment": "x" * 37})[1] != legacy
    changed = {k: v.clone() for k, v in tensors.items()}
    changed["lora_unet_y.lora_down.weight"][300:400] += 1.0
    assert model_hashes(changed, meta)[1] != legacy
    # The serialised file round-trips (the bytes hashed are a valid safetensors file).
    assert torch.equal(load(data)["lora_unet_y.lora_down.weight"], tensors["lora_unet_y.lora_down.weight"])


def test_legacy_hash_small_file_is_empty_sha():
    _, legacy = model_hashes(_tensors(), _meta())
    assert legacy == hashlib.sha256(b"").hexdigest()[:8]


# ---------------------------------------------------------------- modelspec


def test_modelspec_sd15():
    date = dt.datetime(2024, 5, 1, 12, 30, 0)
    meta = modelspec_metadata(base="sd1", title="my_lora", date=date, trigger_phrase="sks dog")
    assert meta == {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "my_lora",
        "modelspec.resolution": "512x512",
        "modelspec.date": "2024-05-01T12:30:00",
        "modelspec.prediction_type": "epsilon",
        "modelspec.trigger_phrase": "sks dog",
    }


def test_modelspec_sdxl():
    meta = modelspec_metadata(base="sdxl", title="xl", date=0.0)
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "1024x1024"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert "modelspec.trigger_phrase" not in meta
    assert dt.datetime.fromisoformat(meta["modelspec.date"]) == dt.datetime.fromtimestamp(0.0)
    assert all(isinstance(v, str) for v in meta.values())


def test_modelspec_sd2_and_extras():
    v = modelspec_metadata(base="sd2", title="t", v_parameterization=True)
    assert v["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert v["modelspec.resolution"] == "768x768" and v["modelspec.prediction_type"] == "v"
    e = modelspec_metadata(base="sd2", title="t", resolution=(640, 512), extra={"author": "me", "tags": ["a", "b"]})
    assert e["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert e["modelspec.resolution"] == "640x512"
    assert e["modelspec.author"] == "me" and e["modelspec.tags"] == "a, b"
    dt.datetime.fromisoformat(e["modelspec.date"])


# ---------------------------------------------------------------- read_base_model


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}, "sdxl"),
        ({"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "True"}, "sdxl"),
        ({"ss_base_model_version": "sd_v2_v", "ss_v2": "True"}, "sd2"),
        ({"ss_v2": "True"}, "sd2"),
        ({"ss_v2": "False", "ss_base_model_version": "sd_v1"}, "sd1"),
        ({"modelspec.title": "x"}, "sd1"),  # any metadata at all
        ({}, "unknown"),
        (None, "unknown"),
    ],
)
def test_read_base_model(metadata, expected):
    assert read_base_model(metadata) == expected


@pytest.mark.parametrize("base", ["sd1", "sd2", "sdxl"])
def test_read_base_model_round_trips_kohya_metadata(base):
    assert read_base_model(_meta(base=base)) == base

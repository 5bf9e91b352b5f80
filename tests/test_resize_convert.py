"""tools.resize and tools.convert: ranks per mode, exact SVD truncation, metadata, round trips, refusals."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from torch import nn

from higanbana.cli.tools import add_convert_parser, add_resize_parser
from higanbana.errors import HiganbanaError
from higanbana.formats import load_network, save_network
from higanbana.formats.metadata import model_hashes
from higanbana.formats.reader import read_network_file
from higanbana.formats.safetensors_io import load_tensors, save_tensors
from higanbana.formats.sd_network import load_sd_network, save_sd_network, sd_network
from higanbana.models.tiny import tiny_sd_parts
from higanbana.network import AdapterNetwork
from higanbana.tools.convert import convert
from higanbana.tools.resize import resize, select_rank

SPECTRUM = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 12)
        self.conv = nn.Conv2d(6, 8, 3)
        self.convt = nn.Conv2d(6, 8, 3)


def _orth(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def _spectrum_file(path, alpha=2.0):
    """One Linear LoRA (16 -> 12, rank 6) whose scaled ΔW = U·diag(SPECTRUM)·Vᵀ; kohya-style metadata."""
    u, v = _orth(12, 6, 1), _orth(16, 6, 2)
    scale = alpha / 6
    tensors = {
        "lycoris_lin.lora_up.weight": (u * SPECTRUM / scale).float(),
        "lycoris_lin.lora_down.weight": v.T.float(),
        "lycoris_lin.alpha": torch.tensor(alpha),
    }
    meta = {"ss_network_dim": "6", "ss_network_alpha": str(alpha), "sshs_model_hash": "x", "sshs_legacy_hash": "y"}
    save_tensors(tensors, path, meta)
    return u, v


def _scaled_delta(net: AdapterNetwork, name: str) -> torch.Tensor:
    a = net.adapters[name]
    return (a.scale * a.delta_weight()).detach().double()


def test_select_rank_modes():
    assert select_rank(SPECTRUM, "fixed", 3) == 3
    assert select_rank(SPECTRUM, "fixed", 10) == 6
    assert select_rank(SPECTRUM, "threshold", 1.5) == 3
    assert select_rank(SPECTRUM, "ratio", 0.2) == 3  # σ > 1.6
    assert select_rank(SPECTRUM, "ratio", 1.0) == 1  # clamped to ≥ 1
    assert select_rank(SPECTRUM, "quantile", 0.9) == 3  # cumsum 8, 12, 14 < 14.175
    assert select_rank(SPECTRUM, "quantile", 1.0) == 6
    with pytest.raises(HiganbanaError, match="whole rank"):
        select_rank(SPECTRUM, "fixed", 2.5)
    with pytest.raises(HiganbanaError, match="unknown resize mode"):
        select_rank(SPECTRUM, "sv_fro", 0.5)


@pytest.mark.parametrize(
    ("mode", "param", "rank"), [("fixed", 2, 2), ("threshold", 0.75, 4), ("ratio", 0.1, 4), ("quantile", 0.8, 2)]
)
def test_resize_known_spectrum(tmp_path, mode, param, rank):
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    u, v = _spectrum_file(src)
    (report,) = resize(src, dst, mode=mode, param=param)
    assert (report.old_rank, report.new_rank) == (6, rank)
    tail = float((SPECTRUM[rank:] ** 2).sum() / (SPECTRUM**2).sum())
    assert report.rel_error == pytest.approx(math.sqrt(tail), rel=1e-6)
    assert report.retained == pytest.approx(1 - tail, rel=1e-6)
    net = load_network(dst, Tiny())
    expected = u[:, :rank] * SPECTRUM[:rank] @ v[:, :rank].T
    assert torch.allclose(_scaled_delta(net, "lycoris_lin"), expected, atol=1e-5)
    tensors, meta = load_tensors(dst)
    assert float(tensors["lycoris_lin.alpha"]) == rank and tensors["lycoris_lin.alpha"].dtype == torch.float32
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(rank), f"{float(rank)}")
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == model_hashes(tensors, meta)
    assert json.loads(meta["higanbana.resize"])["mode"] == mode


def test_resize_keep_alpha_ratio_and_refusals(tmp_path):
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    u, v = _spectrum_file(src, alpha=3.0)
    resize(src, dst, param=3, keep_alpha_ratio=True, dtype="fp16")
    tensors, _ = load_tensors(dst)
    assert float(tensors["lycoris_lin.alpha"]) == pytest.approx(1.5)  # (3/6)·3
    assert tensors["lycoris_lin.lora_up.weight"].dtype == torch.float16
    net = load_network(dst, Tiny())
    expected = u[:, :3] * SPECTRUM[:3] @ v[:, :3].T
    assert torch.allclose(_scaled_delta(net, "lycoris_lin"), expected, atol=1e-2)
    with pytest.raises(HiganbanaError, match="exists"):
        resize(src, dst, param=2)
    resize(src, dst, param=2, overwrite=True)


def _random_network(model, seed=0, **options):
    net = AdapterNetwork(model, "lora", **options)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return net


def test_resize_exact_at_old_rank_tucker_dora_and_records(tmp_path):
    model = Tiny()
    net = _random_network(
        model,
        rank=4,
        alpha=2,
        per_module_options={"lycoris_convt": {"rank": 4, "alpha": 2, "use_tucker": True, "weight_decompose": True}},
    )
    src = tmp_path / "ours.safetensors"
    save_network(net, src, metadata={"ss_network_dim": "4", "ss_network_alpha": "2.0"})
    reports = resize(src, tmp_path / "same.safetensors", param=16)
    assert all(r.new_rank == 4 and r.rel_error < 1e-6 for r in reports)
    again = load_network(tmp_path / "same.safetensors", Tiny())
    for name in net.adapters:
        assert torch.allclose(_scaled_delta(again, name), _scaled_delta(net, name), atol=1e-5), name
    # rank 2: flat modules are the truncated SVD; the Tucker module stays Tucker (HOSVD), DoRA scale kept
    reports = {r.name: r for r in resize(src, tmp_path / "r2.safetensors", param=2)}
    assert reports["lycoris_convt"].tucker and reports["lycoris_convt"].new_rank == 2
    tensors, records, meta = read_network_file(tmp_path / "r2.safetensors")
    assert tensors["lycoris_convt.lora_mid.weight"].shape == (2, 2, 3, 3)
    assert torch.equal(tensors["lycoris_convt.dora_scale"], net.adapters["lycoris_convt"].dora_scale.detach())
    assert records["lycoris_lin"]["options"]["rank"] == 2 and records["lycoris_lin"]["options"]["alpha"] == 2.0
    assert meta["ss_network_dim"] == "2"
    small = load_network(tmp_path / "r2.safetensors", Tiny())
    for name in ("lycoris_lin", "lycoris_conv"):
        d = _scaled_delta(net, name).flatten(1)
        uu, ss, vh = torch.linalg.svd(d, full_matrices=False)
        best = (uu[:, :2] * ss[:2] @ vh[:2]).reshape(d.shape)
        assert torch.allclose(_scaled_delta(small, name).flatten(1), best, atol=1e-5), name
        err = float((d - best).norm() / d.norm())
        assert reports[name].rel_error == pytest.approx(err, rel=1e-4)
    d = _scaled_delta(net, "lycoris_convt")
    got = _scaled_delta(small, "lycoris_convt")
    assert float((d - got).norm() / d.norm()) == pytest.approx(reports["lycoris_convt"].rel_error, rel=1e-4)


def test_resize_refuses_other_algorithms_unless_skipped(tmp_path):
    model = Tiny()
    net = AdapterNetwork(model, "lora", rank=4, per_module_algos={"lycoris_conv": "loha"})
    src = tmp_path / "mixed.safetensors"
    save_network(net, src)
    with pytest.raises(HiganbanaError, match=r"lycoris_conv \(loha\).*--skip-other"):
        resize(src, tmp_path / "out.safetensors", param=2)
    reports = resize(src, tmp_path / "out.safetensors", param=2, skip_other=True)
    assert [r.name for r in reports if r.skipped] == ["lycoris_conv"]
    before, _ = load_tensors(src)
    after, _ = load_tensors(tmp_path / "out.safetensors")
    assert torch.equal(before["lycoris_conv.hada_w1_a"], after["lycoris_conv.hada_w1_a"])


# --------------------------------------------------------------------------- convert
@pytest.fixture(scope="module")
def sd1():
    return tiny_sd_parts("sd1")


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sd_parts("sdxl")


def _sd_file(parts, path, seed=0, **options):
    net = sd_network(parts, "attn-mlp", "lora", rank=4, alpha=2, **options)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    save_sd_network(net, path, parts.kind)
    return net


def _merged(net):
    return {n: a.merged_weight(1.0).detach() for n, a in net.adapters.items()}


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_kohya_peft_kohya_round_trip(kind, sd1, sdxl, tmp_path):
    parts = sd1 if kind == "sd1" else sdxl
    src = tmp_path / "kohya.safetensors"
    net = _sd_file(parts, src)
    with pytest.raises(HiganbanaError, match="one part.*allow_lossy"):
        convert(src, tmp_path / "peft", to="peft", model=parts)
    report = convert(src, tmp_path / "peft", to="peft", model=parts, part="lora_unet")
    assert not report.lossy and (tmp_path / "peft" / "adapter_config.json").is_file()
    back = convert(tmp_path / "peft", tmp_path / "back.safetensors", to="kohya", model=parts)
    assert back.source_format.startswith("peft")
    loaded = load_sd_network(tmp_path / "back.safetensors", parts)
    unet = {n: w for n, w in _merged(net).items() if n.startswith("lora_unet_")}
    assert set(loaded.adapters) == set(unet)
    if kind == "sdxl":
        assert any(n.startswith("lora_unet_input_blocks_") for n in loaded.adapters)
    for name, w in _merged(loaded).items():
        assert torch.allclose(w, unet[name], atol=1e-6), name
    _, meta = load_tensors(tmp_path / "back.safetensors")
    assert "higanbana.modules" in meta and meta["ss_base_model_version"].startswith("sdxl" if kind == "sdxl" else "sd")


def test_diffusers_target_dora_is_lossy_and_dtype(sd1, tmp_path):
    src = tmp_path / "dora.safetensors"
    _sd_file(sd1, src, weight_decompose=True)
    with pytest.raises(HiganbanaError, match="dora_scale.*allow_lossy"):
        convert(src, tmp_path / "d", to="diffusers", model=sd1, part="lora_unet")
    report = convert(src, tmp_path / "d", to="diffusers", model=sd1, allow_lossy=True, dtype="fp16")
    assert any("dora_scale" in s for s in report.lossy) and any("dropped" in s for s in report.lossy)
    tensors, _ = load_tensors(tmp_path / "d" / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("unet.") and "magnitude" not in k for k in tensors)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    # PEFT holds output-axis DoRA exactly: not lossy
    report = convert(src, tmp_path / "p", to="peft", model=sd1, part="lora_unet")
    assert not report.lossy
    with pytest.raises(HiganbanaError, match="exist"):
        convert(src, tmp_path / "p", to="peft", model=sd1, part="lora_unet")


def test_oft_into_peft_is_refused_even_when_lossy_is_allowed(sd1, tmp_path):
    net = sd_network(sd1, "attn-mlp", "oft", train_text_encoder=False)
    src = tmp_path / "oft.safetensors"
    save_sd_network(net, src, "sd1")
    for lossy in (False, True):
        with pytest.raises(HiganbanaError, match="oft.*cannot be written to peft: PEFT's OFT"):
            convert(src, tmp_path / "o", to="peft", model=sd1, allow_lossy=lossy)
    with pytest.raises(HiganbanaError, match="base=BASE"):
        convert(src, tmp_path / "o", to="peft")


def test_lycoris_prefix_to_kohya_and_dtype(sd1, tmp_path):
    src = tmp_path / "kohya.safetensors"
    net = _sd_file(sd1, src, train_text_encoder=False)
    tensors, _ = load_tensors(src)
    lyco = tmp_path / "simpletuner.safetensors"
    save_tensors({k.replace("lora_unet_", "lycoris_", 1): v for k, v in tensors.items()}, lyco)
    with pytest.raises(HiganbanaError, match="lycoris_ prefix.*prefix_map"):
        convert(lyco, tmp_path / "a.safetensors")
    report = convert(lyco, tmp_path / "a.safetensors", prefix_map={"lycoris": "lora_unet"}, dtype="bf16")
    out, meta = load_tensors(tmp_path / "a.safetensors")
    assert set(out) == set(tensors) and report.modules == len(net.adapters)
    assert all(t.dtype == (torch.float32 if k.endswith(".alpha") else torch.bfloat16) for k, t in out.items())
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == model_hashes(out, meta)
    convert(lyco, tmp_path / "b.safetensors", model=sd1)  # the model resolves lycoris_ UNet names
    loaded = load_sd_network(tmp_path / "b.safetensors", sd1)
    for name, w in _merged(loaded).items():
        assert torch.allclose(w, net.adapters[name].merged_weight(1.0).detach(), atol=1e-6), name


def test_cli_parsers(sd1, tmp_path, capsys):
    from higanbana.models.tiny import save_tiny_sd

    parser = argparse.ArgumentParser(prog="higanbana")
    sub = parser.add_subparsers(dest="command", required=True)
    add_resize_parser(sub)
    add_convert_parser(sub)
    for cmd in ("resize", "convert"):
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--help"])
        assert "examples:" in capsys.readouterr().out
    src = tmp_path / "in.safetensors"
    _spectrum_file(src)
    args = parser.parse_args(["resize", str(src), str(tmp_path / "r.safetensors"), "--rank", "2"])
    assert args.func(args) == 0 and "6->2" in capsys.readouterr().out
    args = parser.parse_args(["resize", str(src), str(tmp_path / "r.safetensors"), "--rank", "2"])
    with pytest.raises(HiganbanaError, match="exists"):  # `higanbana` prints it as one error line, exit 2
        args.func(args)
    base = save_tiny_sd(sd1, tmp_path / "base")
    lora = tmp_path / "lora.safetensors"
    _sd_file(sd1, lora, train_text_encoder=False)
    args = parser.parse_args(["convert", str(lora), str(tmp_path / "peft"), "--to", "peft", "--base", str(base)])
    capsys.readouterr()
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "(peft)" in captured.out
    assert "convert" in captured.err and "4/4" in captured.err  # the stage bar: load base, read, map, write

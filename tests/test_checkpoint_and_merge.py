"""Whole-checkpoint IO (diffusers folders, original single files) and ``higanbana merge``."""

from __future__ import annotations

import argparse
import errno
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from higanbana.cli.tools import add_merge_parser
from higanbana.errors import HiganbanaError
from higanbana.formats import streaming
from higanbana.formats.checkpoint import open_checkpoint
from higanbana.formats.sd_network import save_sd_network, sd_network
from higanbana.formats.sdxl_names import SgmNameMap
from higanbana.formats.streaming import write_streaming
from higanbana.models.sd import load_sd
from higanbana.models.tiny import save_tiny_sd, tiny_sd_inputs, tiny_sd_parts
from higanbana.tools.merge import merge

_OPENCLIP = {
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
}
_TE_STARTS = {
    "sd1": [("cond_stage_model.transformer.", "hf")],
    "sd2": [("cond_stage_model.model.", "openclip")],
    "sdxl": [("conditioner.embedders.0.transformer.", "hf"), ("conditioner.embedders.1.model.", "openclip")],
}


def _openclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP state dict -> OpenCLIP names (q/k/v fused into in_proj)."""
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("text_model.")
        if key.startswith("encoder.layers."):
            i, _, rest = key[len("encoder.layers.") :].partition(".")
            base = f"transformer.resblocks.{i}"
            if rest.startswith("self_attn.q_proj."):
                param = rest.rpartition(".")[2]
                qkv = [sd[f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{param}"] for p in "qkv"]
                out[f"{base}.attn.in_proj_{param}"] = torch.cat(qkv)
                continue
            if rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                continue
            path, _, param = rest.rpartition(".")
            out[f"{base}.{_OPENCLIP[path]}.{param}"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.rpartition(".")[2]] = value
        elif key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
    return out


def _vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> the original (LDM) VAE names single files carry."""
    n_up = len(vae.config.block_out_channels)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in vae.state_dict().items():
        k = key
        for side in ("encoder", "decoder"):
            k = k.replace(f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.")
            k = k.replace(f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.")
            if f"{side}.mid_block.attentions.0." in k:
                rest = k.split(f"{side}.mid_block.attentions.0.")[1]
                module, _, param = rest.rpartition(".")
                k = f"{side}.mid.attn_1.{attn[module]}.{param}"
                if module != "group_norm" and param == "weight":
                    value = value[:, :, None, None]
        k = k.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
        if k.startswith("encoder.down_blocks."):
            i, _, rest = k[len("encoder.down_blocks.") :].partition(".")
            rest = rest.replace("resnets.", "block.").replace("downsamplers.0.", "downsample.")
            k = f"encoder.down.{i}.{rest}"
        elif k.startswith("decoder.up_blocks."):
            i, _, rest = k[len("decoder.up_blocks.") :].partition(".")
            rest = rest.replace("resnets.", "block.").replace("upsamplers.0.", "upsample.")
            k = f"decoder.up.{n_up - 1 - int(i)}.{rest}"
        out[k] = value
    return out


def to_original(parts) -> dict[str, torch.Tensor]:
    """A test-side diffusers -> original (LDM/SGM) converter, the layout real single files have."""
    names = SgmNameMap(parts.unet.config)
    sd = {"model.diffusion_model." + names.to_sgm(k): v for k, v in parts.unet.state_dict().items()}
    for (start, layout), te in zip(_TE_STARTS[parts.kind], parts.text_encoders, strict=True):
        te_sd = {
            (k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v
            for k, v in te.state_dict().items()
        }
        if layout == "openclip":
            te_sd = _openclip(te_sd)
        sd.update({start + k: v for k, v in te_sd.items()})
    if parts.vae is not None:
        sd.update({"first_stage_model." + k: v for k, v in _vae_to_ldm(parts.vae).items()})
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny SD1/SD2/SDXL models, each as a diffusers folder and an original single file."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for kind in ("sd1", "sd2", "sdxl"):
        parts = tiny_sd_parts(kind, seed=1, with_vae=True)
        folder = save_tiny_sd(parts, root / f"{kind}-folder")
        single = root / f"{kind}.safetensors"
        save_file(to_original(parts), str(single))
        out[kind] = (parts, folder, single)
    return out


def _params(parts, net):
    """``{kohya name: {param: tensor}}`` of the network's layers, for every record."""
    out = {}
    for name, rec in net.records.items():
        part = net.parts[rec.prefix]
        layer = part.module.get_submodule(rec.path)
        out[name] = {p: getattr(layer, p) for p in ("weight", "bias") if getattr(layer, p, None) is not None}
    return out


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("form", ["folder", "single"])
def test_module_key_maps_every_adaptable_tensor(models, kind, form):
    parts, folder, single = models[kind]
    ck = open_checkpoint(folder if form == "folder" else single)
    assert ck.kind == kind
    net = sd_network(parts, {"preset": "full", "train_norm": True}, "lora")
    modules = ck.modules()
    missing = [n for n in net.records if n not in modules]
    assert not missing, missing[:5]
    for name, params in _params(parts, net).items():
        for param, tensor in params.items():
            key, rows = modules[name][param]
            value = ck.get_tensor(key)
            value = value[rows] if rows is not None else value
            assert torch.equal(value, tensor.detach()), (name, param, key)
            assert (name, param, rows) in ck.module_keys(key)


def test_kind_detection_errors_name_what_was_found(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"foo.bar.weight": torch.zeros(2), "baz.weight": torch.zeros(1)}, str(path))
    with pytest.raises(HiganbanaError, match="foo.bar"):
        open_checkpoint(path)


def test_streaming_writer_memory_and_round_trip(tmp_path):
    keys = [(f"t{i:02d}", (512, 512), torch.float32) for i in range(40)]  # 40 x 1 MiB

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    peak = [0]
    base = rss()

    def produce(key):
        peak[0] = max(peak[0], rss() - base)
        return torch.full((512, 512), float(int(key[1:])))

    out = write_streaming(tmp_path / "big.safetensors", keys, produce, {"a": "b"})
    loaded = load_file(str(out))
    assert list(loaded) == [k for k, _, _ in keys]
    assert all(loaded[k][0, 0].item() == i for i, (k, _, _) in enumerate(keys))
    assert peak[0] < 10 * 2**20, f"peak RSS growth {peak[0] / 2**20:.1f} MiB for a 40 MiB file"


def _randomized(parts, config, algo, **options):
    net = sd_network(parts, config, algo, **options)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return net


SETUPS = [
    ("lora", "full", "lora", {"rank": 4}),
    ("locon-tucker", "full", "lora", {"rank": 4, "use_tucker": True}),
    ("loha", "full", "loha", {"rank": 4}),
    ("lokr", "full", "lokr", {"rank": 4, "factor": 4}),
    ("ia3", "full", "ia3", {}),
    ("glora", "full", "glora", {"rank": 4}),
    ("oft", "full", "oft", {"rank": 4}),
    ("boft", "full", "boft", {"rank": 4}),
    ("full", "full", "full", {}),
    ("norm", {"preset": "full", "train_norm": True}, "lora", {"rank": 2}),
    ("dora", "full", "lora", {"rank": 4, "weight_decompose": True}),
]


def _unet_out(parts):
    with torch.no_grad():
        return parts.unet(**tiny_sd_inputs(parts, seed=5)).sample


def _close(a, b, rel=1e-5):
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1e-12)


def _check_single(parts, net, merged_path, merged_folder=None):
    """Merged single file (and folder) == the network's merge(), tensor by tensor."""
    net.merge()
    try:
        expected = to_original(parts)
        components = {"unet/diffusion_pytorch_model.safetensors": parts.unet.state_dict()}
        for i, te in enumerate(parts.text_encoders):
            components[f"text_encoder{'_2' if i else ''}/model.safetensors"] = te.state_dict()
        components = {f: {k: v.detach().clone() for k, v in sd.items()} for f, sd in components.items()}
    finally:
        net.restore()
    ck = open_checkpoint(merged_path)
    assert set(ck.keys()) == set(expected)
    for key, value in expected.items():
        got = ck.get_tensor(key)
        assert got.dtype == value.dtype
        assert _close(got.float(), value.float()), key
    if merged_folder is not None:
        for file, sd in components.items():
            got = load_file(str(merged_folder / file))
            assert set(got) == set(sd), file
            assert all(_close(got[k], v) for k, v in sd.items()), file


#: the folder is also reloaded with load_sd and run for these (the others: tensor-exact against merge())
FORWARD_CHECKED = {"lora", "oft", "norm", "dora"}


@pytest.mark.parametrize("label,config,algo,options", SETUPS, ids=[s[0] for s in SETUPS])
def test_merge_equals_attached_network_sd1(models, tmp_path, label, config, algo, options):
    parts, folder, single = models["sd1"]
    net = _randomized(parts, config, algo, **options)
    file = save_sd_network(net, tmp_path / f"{label}.safetensors", "sd1")
    report = merge(single, [(file, 1.0)], tmp_path / "merged.safetensors")
    assert sorted(report.merged[str(file)]) == sorted(net.records)
    merge(folder, [(file, 1.0)], tmp_path / "merged-folder")
    _check_single(parts, net, tmp_path / "merged.safetensors", tmp_path / "merged-folder")
    if label not in FORWARD_CHECKED:
        return
    merged = load_sd(tmp_path / "merged-folder")
    net.attach()
    try:
        expected = _unet_out(parts)
    finally:
        net.detach()
    assert _close(_unet_out(merged), expected)


@pytest.mark.parametrize("label", ["lora", "oft", "dora"])
def test_merge_sdxl_with_fused_in_proj(models, tmp_path, label):
    """SDXL: SGM names, and te2's fused OpenCLIP in_proj merged per q/k/v row slice."""
    _, config, algo, options = next(s for s in SETUPS if s[0] == label)
    parts, folder, single = models["sdxl"]
    net = _randomized(parts, config, algo, **options)
    file = save_sd_network(net, tmp_path / "a.safetensors", "sdxl")
    merge(single, [(file, 1.0)], tmp_path / "merged.safetensors")
    _check_single(parts, net, tmp_path / "merged.safetensors")
    if label != "lora":
        return
    merge(folder, [(file, 1.0)], tmp_path / "merged-folder")
    net.attach()
    try:
        expected = _unet_out(parts)
    finally:
        net.detach()
    assert _close(_unet_out(load_sd(tmp_path / "merged-folder")), expected)


def test_two_files_merge_sequentially_with_strengths(models, tmp_path):
    parts, _folder, single = models["sdxl"]
    a = _randomized(parts, "full", "lora", rank=4)
    b = _randomized(parts, "full", "oft", rank=4)
    fa = save_sd_network(a, tmp_path / "a.safetensors", "sdxl")
    fb = save_sd_network(b, tmp_path / "b.safetensors", "sdxl")
    merge(single, [(fa, 0.7), (fb, 0.5)], tmp_path / "m.safetensors")
    a.set_multiplier(0.7)
    a.merge()
    b.set_multiplier(0.5)
    b.merge()
    try:
        expected = to_original(parts)
    finally:
        b.restore()
        a.restore()
    ck = open_checkpoint(tmp_path / "m.safetensors")
    for key, value in expected.items():
        assert _close(ck.get_tensor(key), value, 1e-5), key


def test_fp16_output_and_refusals(models, tmp_path):
    parts, folder, single = models["sd1"]
    net = _randomized(parts, "full", "lora", rank=4)
    file = save_sd_network(net, tmp_path / "a.safetensors", "sd1")
    out = tmp_path / "half.safetensors"
    merge(single, [(file, 1.0)], out, dtype="fp16")
    assert {t.dtype for t in load_file(str(out)).values()} == {torch.float16}
    merge(folder, [(file, 1.0)], tmp_path / "half-folder", dtype=torch.float16)
    assert load_sd(tmp_path / "half-folder", dtype=torch.float16).unet.dtype == torch.float16
    with pytest.raises(HiganbanaError, match="already exists"):
        merge(single, [(file, 1.0)], out)
    merge(single, [(file, 1.0)], out, overwrite=True)
    xl_parts = models["sdxl"][0]
    xl = save_sd_network(sd_network(xl_parts, "full", "lora"), tmp_path / "xl.safetensors", "sdxl")
    with pytest.raises(HiganbanaError, match="SDXL"):
        merge(single, [(xl, 1.0)], tmp_path / "no.safetensors")
    assert not (tmp_path / "no.safetensors").exists()


@pytest.mark.parametrize("form", ["single", "folder"])
def test_full_disk_leaves_nothing(models, tmp_path, monkeypatch, form):
    parts, folder, single = models["sd1"]
    file = save_sd_network(_randomized(parts, "full", "lora", rank=2), tmp_path / "a.safetensors", "sd1")
    outdir = tmp_path / "out"
    outdir.mkdir()
    calls = [0]

    def full_disk(f, data):
        calls[0] += 1
        if calls[0] > 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write(data)

    monkeypatch.setattr(streaming, "_write_bytes", full_disk)
    out = outdir / ("m.safetensors" if form == "single" else "m")
    with pytest.raises(HiganbanaError, match="No space left"):
        merge(single if form == "single" else folder, [(file, 1.0)], out)
    assert list(outdir.iterdir()) == []


def test_cli_parser(models, tmp_path, capsys):
    parts, _folder, single = models["sd1"]
    file = save_sd_network(_randomized(parts, "full", "lora", rank=2), tmp_path / "a.safetensors", "sd1")
    parser = argparse.ArgumentParser(prog="higanbana")
    add_merge_parser(parser.add_subparsers(dest="command"))
    help_text = parser._subparsers._group_actions[0].choices["merge"].format_help()
    assert "--lora" in help_text and "example" in help_text
    args = parser.parse_args(["merge", str(single), str(tmp_path / "o.safetensors"), "--lora", f"{file}:0.5"])
    assert args.func(args) == 0
    assert "merged" in capsys.readouterr().out
    with pytest.raises(HiganbanaError, match="already exists"):  # exists now (`higanbana` prints one error line)
        args.func(args)


def test_foreign_file_with_diffusers_names_on_sdxl(models, tmp_path):
    """A kohya-style file without our records, naming SDXL UNet modules by diffusers paths, merges the same."""
    parts, _folder, single = models["sdxl"]
    net = _randomized(parts, "full", "lora", rank=4)
    ours = save_sd_network(net, tmp_path / "ours.safetensors", "sdxl")
    ck = open_checkpoint(single)
    to_diffusers = {v: k for k, v in ck.aliases().items() if not k.startswith("lycoris_")}
    tensors = load_file(str(ours))
    foreign = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        foreign[f"{to_diffusers.get(name, name)}.{suffix}"] = value
    assert any(k.startswith("lora_unet_down_blocks_") for k in foreign)
    path = tmp_path / "foreign.safetensors"
    save_file(foreign, str(path), {"ss_base_model_version": "sdxl_base_v1-0"})
    merge(single, [(ours, 0.8)], tmp_path / "a.safetensors")
    report = merge(single, [(path, 0.8)], tmp_path / "b.safetensors")
    assert sorted(report.merged[str(path)]) == sorted(net.records)
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(_close(b[k], v) for k, v in a.items())
    bad = tmp_path / "bad.safetensors"
    save_file(
        {
            "lora_unet_nowhere.lora_down.weight": torch.zeros(1, 4),
            "lora_unet_nowhere.lora_up.weight": torch.zeros(4, 1),
        },
        str(bad),
    )
    with pytest.raises(HiganbanaError, match="lora_unet_nowhere"):
        merge(single, [(bad, 1.0)], tmp_path / "c.safetensors")


# --------------------------------------------------------------------------- extract from single files
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_extract_reads_single_files_and_mixed_forms(models, kind, tmp_path):
    """``extract`` streams original single files (no configs needed) and a folder/single-file mix:
    a known rank-2 update is recovered either way."""
    import warnings

    from higanbana.formats.sd_network import load_sd_network
    from higanbana.tools.extract import extract_models

    _parts, folder, single = models[kind]
    tuned = tiny_sd_parts(kind, seed=1, with_vae=True)
    net = sd_network(tuned, "full", "lora", rank=2)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    net.merge()
    tuned_single = tmp_path / "tuned.safetensors"
    save_file(to_original(tuned), str(tuned_single))
    for base_form in (single, folder):
        out = tmp_path / f"x-{base_form.name}.safetensors"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reports = extract_models(base_form, tuned_single, out, mode="fixed", linear_param=2, progress=False)
        if kind == "sdxl" and base_form == folder:  # the folder has text_projection as a Linear, the file not
            assert any("lora_te2_text_projection" in str(w.message) for w in caught)
        assert "lora" in {r.kind for r in reports}
        loaded = load_sd_network(out, tiny_sd_parts(kind, seed=1))
        assert set(loaded.adapters) == set(net.adapters)
        loaded.merge()
        for name, rec in net.records.items():
            got = loaded.parts[rec.prefix].module.get_submodule(rec.path).weight
            want = net.parts[rec.prefix].module.get_submodule(rec.path).weight
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")

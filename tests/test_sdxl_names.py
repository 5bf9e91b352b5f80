"""diffusers <-> SGM UNet names, checked against diffusers' own LDM->diffusers converter."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from higanbana.formats.sdxl_names import (
    NameMappingError,
    SgmNameMap,
    diffusers_to_sgm,
    kohya_unet_name,
    sgm_to_diffusers,
)
from higanbana.models.tiny import TINY_SDXL_UNET as SDXL_TINY

# A differently shaped UNet (1 resnet per block, 2 blocks, attention first, conv projections) so the
# index arithmetic is visibly derived from the config, and the "upsampler at .1" branch is exercised.
OTHER_TINY = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    transformer_layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    use_linear_projection=False,
    norm_num_groups=32,
)


@pytest.fixture(scope="module", params=["sdxl_tiny", "other_tiny"])
def unet(request):
    torch.manual_seed(0)
    kwargs = SDXL_TINY if request.param == "sdxl_tiny" else OTHER_TINY
    return UNet2DConditionModel(**kwargs)


@pytest.fixture(scope="module")
def sdxl_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**SDXL_TINY)


def _module_and_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def test_diffusers_converter_inverts_our_mapping_for_every_parameter(unet):
    state = unet.state_dict()
    ldm = {}
    for key, tensor in state.items():
        module, param = _module_and_param(key)
        ldm[f"model.diffusion_model.{diffusers_to_sgm(module, unet.config)}.{param}"] = tensor
    assert len(ldm) == len(state)  # no two diffusers keys collapse onto one SGM key

    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(converted) == set(state)
    for key, tensor in state.items():
        assert converted[key] is tensor or torch.equal(converted[key], tensor), key


def test_round_trip_every_module_with_parameters(unet):
    cfg = unet.config
    modules = {_module_and_param(k)[0] for k, _ in unet.named_parameters()}
    sgm = {diffusers_to_sgm(m, cfg) for m in modules}
    assert len(sgm) == len(modules)
    for m in modules:
        s = diffusers_to_sgm(m, cfg)
        assert sgm_to_diffusers(s, cfg) == m
        assert sgm_to_diffusers(s + ".weight", cfg) == m + ".weight"


def test_round_trip_block_level_modules(unet):
    # Every named module that maps (blocks, resnets, attentions, samplers...) maps back to itself;
    # the ones that do not are pure containers or parameter-free helpers.
    cfg = unet.config
    unmapped = []
    for name, _module in unet.named_modules():
        if not name:
            continue
        try:
            s = diffusers_to_sgm(name, cfg)
        except NameMappingError:
            unmapped.append(name)
            continue
        assert sgm_to_diffusers(s, cfg) == name
    for name in unmapped:
        own = list(unet.get_submodule(name).parameters(recurse=False))
        assert not own, f"{name} has parameters but no SGM name"


SDXL_EXPECTED = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": ("input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    "down_blocks.2.attentions.1.transformer_blocks.1.ff.net.0.proj": (
        "input_blocks.8.1.transformer_blocks.1.ff.net.0.proj"
    ),
    "down_blocks.1.attentions.1.proj_in": "input_blocks.5.1.proj_in",
    "down_blocks.1.attentions.1.norm": "input_blocks.5.1.norm",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.resnets.0.conv2": "input_blocks.1.0.out_layers.3",
    "down_blocks.0.resnets.0.time_emb_proj": "input_blocks.1.0.emb_layers.1",
    "down_blocks.0.resnets.0.norm1": "input_blocks.1.0.in_layers.0",
    "down_blocks.0.resnets.0.norm2": "input_blocks.1.0.out_layers.0",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.0.attentions.2.proj_out": "output_blocks.2.1.proj_out",
    "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
    "mid_block.attentions.0.transformer_blocks.1.attn2.to_k": "middle_block.1.transformer_blocks.1.attn2.to_k",
    "mid_block.resnets.0.conv1": "middle_block.0.in_layers.2",
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "conv_norm_out": "out.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "down_blocks.1.attentions.0": "input_blocks.4.1",
    "up_blocks.1.upsamplers.0": "output_blocks.5.2",
}


@pytest.mark.parametrize(("diffusers", "sgm"), sorted(SDXL_EXPECTED.items()))
def test_hand_written_sdxl_names(sdxl_unet, diffusers, sgm):
    assert diffusers_to_sgm(diffusers, sdxl_unet.config) == sgm
    assert sgm_to_diffusers(sgm, sdxl_unet.config) == diffusers


def test_hand_written_names_follow_the_config():
    other = dict(OTHER_TINY)  # a plain dict works as the config too
    # layers_per_block=1: down block 0 = input_blocks.1 (+ downsampler input_blocks.2), block 1 = input_blocks.3.
    assert diffusers_to_sgm("down_blocks.0.attentions.0.proj_in", other) == "input_blocks.1.1.proj_in"
    assert diffusers_to_sgm("down_blocks.0.downsamplers.0.conv", other) == "input_blocks.2.0.op"
    assert diffusers_to_sgm("down_blocks.1.resnets.0.conv1", other) == "input_blocks.3.0.in_layers.2"
    # up block 0 has no attentions: its upsampler is at .1 of its last output block.
    assert diffusers_to_sgm("up_blocks.0.upsamplers.0.conv", other) == "output_blocks.1.1.conv"
    assert diffusers_to_sgm("up_blocks.1.attentions.1.proj_out", other) == "output_blocks.3.1.proj_out"


def test_kohya_names(sdxl_unet):
    cfg = sdxl_unet.config
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert kohya_unet_name(path, cfg, sdxl=True) == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert kohya_unet_name(path, cfg, sdxl=False) == (
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    )
    assert kohya_unet_name("mid_block.resnets.1.time_emb_proj", sdxl_unet, sdxl=True) == (
        "lora_unet_middle_block_2_emb_layers_1"
    )


@pytest.mark.parametrize(
    "path",
    [
        "down_blocks.7.resnets.0.conv1",  # no such block
        "down_blocks.0.attentions.0.proj_in",  # block 0 has no attentions in SDXL
        "down_blocks.2.downsamplers.0.conv",  # last down block has no downsampler
        "down_blocks.0.resnets.0.nonlinearity",  # parameter-free, no SGM counterpart
        "down_blocks.1",  # container with no SGM counterpart
        "encoder.conv_in",
        "",
    ],
)
def test_unknown_diffusers_path_raises_naming_it(sdxl_unet, path):
    with pytest.raises(NameMappingError, match=repr(path).replace(".", r"\.")):
        diffusers_to_sgm(path, sdxl_unet.config)


@pytest.mark.parametrize("path", ["input_blocks.99.0", "middle_block.1x", "input_blocks.1.0.in_layers.1", "out.1"])
def test_unknown_sgm_path_raises_naming_it(sdxl_unet, path):
    with pytest.raises(NameMappingError, match=repr(path).replace(".", r"\.")):
        sgm_to_diffusers(path, sdxl_unet.config)


def test_table_is_reusable(sdxl_unet):
    table = SgmNameMap(sdxl_unet)
    assert table.to_sgm("conv_in") == "input_blocks.0.0"
    assert table.to_diffusers("input_blocks.0.0.weight") == "conv_in.weight"

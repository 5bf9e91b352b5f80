"""SD3/Flux layouts (issue 19): the original (fused) names of every diffusers Linear, at the real
architectures and the tiny ones, and the exact algebra of stacking members into a fused module and
splitting it back, with refusals that name the module and the reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from higanbana.algorithms import algorithm_class
from higanbana.algorithms.files import LayoutRefused
from higanbana.formats.dit_layout import DitLayout, to_original, to_split
from higanbana.models.architectures import FLUX1_DEV_TRANSFORMER, SD35_MEDIUM_TRANSFORMER
from higanbana.models.tiny import TINY_FLUX_TRANSFORMER, TINY_SD3_TRANSFORMER

CONFIGS = {
    "flux-1-dev": ("flux", FLUX1_DEV_TRANSFORMER),
    "sd3.5-medium": ("sd3", SD35_MEDIUM_TRANSFORMER),
    "tiny-flux": ("flux", TINY_FLUX_TRANSFORMER),
    "tiny-sd3": ("sd3", TINY_SD3_TRANSFORMER),
}


def meta_model(family, config):
    """The diffusers transformer on the meta device: its modules and shapes, no memory."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    with torch.device("meta"):
        return (FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel)(**config)


@pytest.mark.parametrize("label", list(CONFIGS))
def test_every_layer_has_an_original_slot_of_its_rows(label):
    family, config = CONFIGS[label]
    model = meta_model(family, config)
    layout = DitLayout(family, config)
    layers = {p: m for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(layers) == set(layout.slots) | set(layout.unmapped)
    for original, members in layout.members.items():
        sizes = layout.slots[members[0]].sizes
        if len(members) > 1:  # the members' rows, in order, make the fused layer
            assert [layers[p].weight.shape[0] for p in members] == list(sizes), original
            assert len({layers[p].weight.shape[1] for p in members}) == 1, original
    if label == "flux-1-dev":  # BFL's widths: qkv 3·3072, linear1 3·3072 + 12288, 19 + 38 blocks
        assert layout.slots["single_transformer_blocks.37.proj_mlp"].sizes == (3072, 3072, 3072, 12288)
        assert layout.members["double_blocks.18.txt_attn.qkv"][2] == "transformer_blocks.18.attn.add_v_proj"
    if label == "sd3.5-medium":  # MMDiT-X: attn2 in the first 13 blocks; the last context block is pre-only
        assert "joint_blocks.12.x_block.attn2.qkv" in layout.members
        assert "joint_blocks.13.x_block.attn2.qkv" not in layout.members
        assert "joint_blocks.23.context_block.mlp.fc1" not in layout.members


def lora(out, inp, rank, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "lora_down.weight": torch.randn(rank, inp, generator=g, dtype=torch.float64),
        "lora_up.weight": torch.randn(out, rank, generator=g, dtype=torch.float64),
        "alpha": torch.tensor(float(alpha)),
    }


def delta(module):
    """LoRA's ΔW = (α/r)·up·down, written from the contract."""
    r = module["lora_down.weight"].shape[0]
    return float(module["alpha"]) / r * torch.einsum("or,ri->oi", module["lora_up.weight"], module["lora_down.weight"])


@pytest.mark.parametrize("alphas", [(4, 4, 4), (1, 8, 2)], ids=["equal-scales", "unequal-scales"])
def test_lora_stacks_with_concatenated_ranks_and_splits_back(alphas):
    LoRA = algorithm_class("lora")
    members = [lora(6, 5, 4, alphas[0], 0), None, lora(6, 5, 2, alphas[2], 2)]
    fused = LoRA.stack_outputs(members, [6, 6, 6])
    assert fused["lora_down.weight"].shape == (6, 5)
    want = torch.cat([delta(members[0]), torch.zeros(6, 5, dtype=torch.float64), delta(members[2])])
    torch.testing.assert_close(delta(fused), want, rtol=1e-12, atol=1e-12)
    for ranks in ([4, None, 2], None):  # our records, or the structure of a foreign file
        back = LoRA.split_outputs(fused, [6, 6, 6], ranks)
        assert back[1] is None
        for got, was in zip(back, members, strict=True):
            if was is not None:
                assert got["lora_down.weight"].shape == was["lora_down.weight"].shape
                torch.testing.assert_close(delta(got), delta(was), rtol=1e-12, atol=1e-12)


def test_a_lora_trained_on_the_fused_layer_splits_with_the_whole_down():
    fused = lora(12, 5, 3, 1.5, 7)
    pieces = algorithm_class("lora").split_outputs(fused, [4, 8])
    for (start, size), piece in zip([(0, 4), (4, 8)], pieces, strict=True):
        assert piece["lora_down.weight"].shape == (3, 5)
        torch.testing.assert_close(delta(piece), delta(fused)[start : start + size], rtol=1e-12, atol=1e-12)


def test_loha_and_lokr_split_exactly_by_rows_and_refuse_to_stack():
    g = torch.Generator().manual_seed(0)
    loha = {
        k: torch.randn(*s, generator=g, dtype=torch.float64)
        for k, s in {"hada_w1_a": (12, 2), "hada_w1_b": (2, 5), "hada_w2_a": (12, 2), "hada_w2_b": (2, 5)}.items()
    }
    loha["alpha"] = torch.tensor(1.0)

    def hada(m):
        return (m["hada_w1_a"] @ m["hada_w1_b"]) * (m["hada_w2_a"] @ m["hada_w2_b"])

    pieces = algorithm_class("loha").split_outputs(loha, [4, 8])
    torch.testing.assert_close(torch.cat([hada(p) for p in pieces]), hada(loha), rtol=1e-12, atol=1e-12)
    with pytest.raises(LayoutRefused, match="LoHa modules cannot be stacked"):
        algorithm_class("loha").stack_outputs([loha, loha], [12, 12])
    lokr = {
        "lokr_w1": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "lokr_w2": torch.randn(4, 3, generator=g, dtype=torch.float64),
    }
    pieces = algorithm_class("lokr").split_outputs(lokr, [4, 8])
    got = torch.cat([torch.kron(p["lokr_w1"], p["lokr_w2"]) for p in pieces])
    torch.testing.assert_close(got, torch.kron(lokr["lokr_w1"], lokr["lokr_w2"]), rtol=1e-12, atol=1e-12)
    with pytest.raises(LayoutRefused, match="does not divide"):
        algorithm_class("lokr").split_outputs(lokr, [6, 6])  # a member cuts through a block of w2's 4 rows


def test_full_and_ia3_stack_with_zeros_for_members_without_adapter():
    full = algorithm_class("full").stack_outputs([{"diff": torch.ones(2, 3), "diff_b": torch.ones(2)}, None], [2, 4])
    assert full["diff"].shape == (6, 3) and full["diff"][2:].eq(0).all() and full["diff_b"][2:].eq(0).all()
    ia3 = algorithm_class("ia3").stack_outputs([None, {"weight": torch.ones(4), "on_input": torch.tensor(0)}], [2, 4])
    assert ia3["weight"].tolist() == [0, 0, 1, 1, 1, 1]
    with pytest.raises(LayoutRefused, match="shared input"):
        algorithm_class("ia3").stack_outputs([None, {"weight": torch.ones(3), "on_input": torch.tensor(1)}], [2, 4])


def test_conversion_names_the_module_and_why():
    layout = DitLayout("flux", TINY_FLUX_TRANSFORMER)
    g = torch.Generator().manual_seed(0)
    tensors, records = {}, {}
    for n in ("to_q", "to_k"):
        name = f"lora_transformer_transformer_blocks_0_attn_{n}"
        for k, s in {"hada_w1_a": (16, 2), "hada_w1_b": (2, 16), "hada_w2_a": (16, 2), "hada_w2_b": (2, 16)}.items():
            tensors[f"{name}.{k}"] = torch.randn(*s, generator=g)
        records[name] = {"algo": "loha", "options": None}
    with pytest.raises(LayoutRefused, match=r"lora_unet_double_blocks_0_img_attn_qkv .*attn_to_q.*LoHa"):
        to_original(tensors, records, layout)
    tensors["lora_transformer_norm_out_linear.diff"] = torch.zeros(32, 16)
    records["lora_transformer_norm_out_linear"] = {"algo": "full", "options": None}
    with pytest.raises(LayoutRefused, match="norm_out_linear: ComfyUI maps this modulation Linear"):
        to_original(tensors, records, layout)
    with pytest.raises(Exception, match="lora_unet_double_blocks_7_img_attn_qkv: not a module"):
        to_split(
            {"lora_unet_double_blocks_7_img_attn_qkv.diff": torch.zeros(48, 16)},
            {"lora_unet_double_blocks_7_img_attn_qkv": {"algo": "full", "options": None}},
            layout,
        )

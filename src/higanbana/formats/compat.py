"""Which tools load a file, and how faithfully: ComfyUI, AUTOMATIC1111 and diffusers.

The rules are DESIGN.md §4 and ``shared/reference/interop.md`` (A: ComfyUI, B: A1111, D: diffusers),
applied per module from its algorithm, options and tensor shapes. The parity tests in
``tests/interop`` check the same rules numerically with reference loaders of each tool.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .detect import glora_layout

TOOLS = ("ComfyUI", "A1111", "diffusers")
LOADS, DEVIATES, FAILS = "loads", "loads with deviation", "does not load"

#: the text-encoder modules kohya names that ComfyUI maps (interop.md A.2, LORA_CLIP_MAP)
COMFY_TE_SUFFIXES = (
    "mlp_fc1",
    "mlp_fc2",
    "self_attn_q_proj",
    "self_attn_k_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
)
SD_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


@dataclass
class ToolVerdict:
    """One tool's verdict on a file, with the reasons (each naming modules)."""

    tool: str
    status: str = LOADS
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # modules the tool does not load
    deviating: list[str] = field(default_factory=list)  # modules it loads with a different result

    def as_dict(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "status": self.status,
            "notes": self.notes,
            "skipped": self.skipped,
            "deviating": self.deviating,
        }


@dataclass
class _Tally:
    loaded: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason → modules
    deviations: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, name: str) -> None:
        self.skipped.setdefault(reason, []).append(name)

    def deviate(self, reason: str, name: str) -> None:
        self.deviations.setdefault(reason, []).append(name)
        self.loaded += 1


def _examples(names: list[str]) -> str:
    head = ", ".join(names[:2])
    return f"{len(names)} module(s), e.g. {head}" if len(names) > 2 else head


def _verdict(tool: str, tally: _Tally, total: int, whole_file: str | None = None) -> ToolVerdict:
    verdict = ToolVerdict(tool)
    verdict.skipped = sorted(n for names in tally.skipped.values() for n in names)
    verdict.deviating = sorted(n for names in tally.deviations.values() for n in names)
    if whole_file:
        verdict.status, verdict.notes = FAILS, [whole_file]
        return verdict
    for reason, names in tally.skipped.items():
        verdict.notes.append(f"not loaded ({reason}): {_examples(names)}")
    for reason, names in tally.deviations.items():
        verdict.notes.append(f"{reason}: {_examples(names)}")
    if tally.loaded == 0:
        verdict.status = FAILS
    elif tally.skipped or tally.deviations:
        verdict.status = DEVIATES
    return verdict


def _dora_axis(module: Mapping[str, Tensor], options: Mapping[str, Any] | None) -> str | None:
    scale = module.get("dora_scale")
    if scale is None:
        return None
    if options and "wd_on_output" in options:
        return "output" if options["wd_on_output"] else "input"
    return "input" if scale.dim() >= 2 and scale.shape[0] == 1 and scale.shape[1] > 1 else "output"


def compatibility(
    modules: Mapping[str, Mapping[str, Tensor]],
    records: Mapping[str, Mapping[str, Any]],
    base: str = "unknown",
    non_finite: Sequence[str] = (),
) -> list[ToolVerdict]:
    """Verdicts of ComfyUI, A1111 and diffusers for modules ``{name: {suffix: tensor}}`` and their records.

    ``base`` (``sd1``, ``sd2``, ``sdxl`` or unknown) matters for A1111's OpenCLIP attention rule.
    ``non_finite`` names modules with NaN/Inf values: every tool loads them, and its output is NaN.
    """
    comfy, a1111, diffusers = _Tally(), _Tally(), _Tally()
    diffusers_whole: str | None = None
    partial_attention = _a1111_partial_attention(list(modules), base)
    for name, module in modules.items():
        record = records.get(name, {})
        algo, options = record.get("algo", ""), record.get("options") or {}
        alpha_zero = _alpha_zero_scales(algo, module)
        standalone = name.startswith("lycoris_")  # LyCORIS standalone / SimpleTuner: diffusers UNet paths
        if not name.startswith(SD_PREFIXES) and not standalone:
            prefix = name.split("_")[0]
            reason = f"prefix {prefix!r} is not an SD model name (kohya lora_unet_/lora_te*_)"
            comfy.skip(reason, name)
            a1111.skip(reason, name)
            diffusers_whole = diffusers_whole or f"module {name}: {reason}"
            continue
        # ------------------------------------------------------------------ ComfyUI (interop.md A)
        is_te = name.startswith("lora_te")
        if is_te and not name.endswith(COMFY_TE_SUFFIXES) and not name.endswith("text_projection"):
            comfy.skip("ComfyUI maps only q/k/v/out_proj and mlp fc1/fc2 of text encoders", name)
        elif algo == "ia3":
            comfy.skip("ComfyUI has no IA3", name)
        elif alpha_zero:
            comfy.deviate(ALPHA_ZERO.format(tool="ComfyUI"), name)
        elif algo == "glora" and glora_layout(module) == "old":
            comfy.deviate("old GLoRA layout: ComfyUI reads it (by shapes)", name)
        elif _dora_axis(module, options) == "output":
            comfy.deviate("DoRA on the output axis: ComfyUI divides by ‖W0‖ instead of ‖W0+ΔW‖", name)
        elif algo in ("oft", "boft") and _comfy_clamps_differently(module):
            comfy.deviate("OFT constraint: ComfyUI clamps ‖Q‖ with α instead of α·out", name)
        elif algo == "oft" and "rescale" in module:
            comfy.deviate("OFT rescale: ComfyUI ignores it", name)
        else:
            comfy.loaded += 1
        # ------------------------------------------------------------------ A1111 (interop.md B)
        if standalone:
            a1111.skip("A1111 has no mapping for the lycoris_ prefix", name)
            diffusers_whole = diffusers_whole or f"load_lora_weights has no mapping for the lycoris_ prefix ({name})"
            continue
        if name.startswith("lora_unet_") and not _A1111_UNET.fullmatch(name):
            a1111.skip("A1111 has no compvis name for this UNet module", name)
        elif name in partial_attention:
            a1111.skip("A1111 applies OpenCLIP attention q/k/v/out only all four together", name)
        elif algo == "boft":
            a1111.skip("A1111 has no BOFT", name)
        elif algo == "glora" and glora_layout(module) == "new":
            a1111.skip("A1111 reads only the old GLoRA layout", name)
        elif algo == "norm" and "b_norm" not in module:
            a1111.skip("A1111 needs both w_norm and b_norm", name)
        elif algo in ("oft", "boft") and "alpha" not in module:
            a1111.skip("A1111 needs alpha for OFT", name)
        elif alpha_zero:
            a1111.deviate(ALPHA_ZERO.format(tool="A1111"), name)
        elif algo == "oft" and float(module["alpha"]) == 0:
            a1111.deviate("OFT with alpha 0: A1111 applies no rotation", name)
        elif _dora_axis(module, options) == "output":
            a1111.deviate("DoRA on the output axis: A1111 supports only the input axis (wrong result)", name)
        elif algo == "oft" and "rescale" in module:
            a1111.deviate("OFT rescale: A1111 ignores it", name)
        elif algo == "lokr" and not ({"lokr_w1", "lokr_w1_a"} & set(module) and {"lokr_w2", "lokr_w2_a"} & set(module)):
            a1111.skip("A1111's LoKr needs both sides", name)
        else:
            a1111.loaded += 1
        # ------------------------------------------------------------------ diffusers (interop.md D)
        if algo != "lora" or "lora_mid.weight" in module:
            what = "LoCon with a Tucker mid" if algo == "lora" else algo
            diffusers_whole = diffusers_whole or f"load_lora_weights rejects non-LoRA keys ({what}: {name})"
        elif alpha_zero:
            diffusers.deviate(ALPHA_ZERO.format(tool="load_lora_weights"), name)
        elif "dora_scale" in module:
            diffusers.deviate("DoRA: load_lora_weights drops dora_scale (plain LoRA result)", name)
        else:
            diffusers.loaded += 1
    total = len(modules)
    out = [_verdict("ComfyUI", comfy, total), _verdict("A1111", a1111, total)]
    out.append(_verdict("diffusers", diffusers, total, diffusers_whole))
    if non_finite:
        for verdict in out:
            if verdict.status != FAILS:
                verdict.status = DEVIATES
                verdict.notes.append(f"NaN/Inf values, the output becomes NaN: {_examples(list(non_finite))}")
                verdict.deviating = sorted({*verdict.deviating, *non_finite})
    oft = [n for n, r in records.items() if r.get("algo") in ("oft", "boft")]
    if oft:
        for verdict in out[:2]:
            if verdict.status != FAILS:
                verdict.notes.append("OFT/BOFT at strengths other than 1: each tool interpolates differently")
    return out


#: the note for a factored module whose file alpha is 0
ALPHA_ZERO = "alpha 0: {tool} reads scale 0 (no effect), where higanbana, kohya and LyCORIS read alpha = rank"


def _alpha_zero_scales(algo: str, module: Mapping[str, Tensor]) -> bool:
    """Whether a module's ``alpha`` is 0 where ``α/r`` is its scale (LoRA, LoHa, GLoRA, factored LoKr)."""
    alpha = module.get("alpha")
    if alpha is None or algo not in ("lora", "loha", "lokr", "glora") or float(alpha.reshape(-1)[0]) != 0:
        return False
    return algo != "lokr" or bool({"lokr_w1_a", "lokr_w2_a"} & set(module))


def _comfy_clamps_differently(module: Mapping[str, Tensor]) -> bool:
    """Whether ComfyUI's raw-α clamp changes this OFT/BOFT module differently from the α·out clamp.

    Both clamp ``Q = B − Bᵀ`` by its norm over all blocks (per stage for BOFT): ComfyUI to α, the
    others to α·out. Whenever ComfyUI clamps (‖Q‖ > α), the results differ: the others either do not
    clamp or clamp to α·out. α = 0 and our 1e30 "no constraint" never engage.
    """
    alpha = module.get("alpha")
    blocks = module.get("oft_blocks")
    if alpha is None or blocks is None or not 0 < float(alpha) < 1e30:
        return False
    stages = blocks.float() if blocks.dim() == 4 else blocks.float().unsqueeze(0)
    return any(float((stage - stage.transpose(-1, -2)).norm()) > float(alpha) for stage in stages)


_A1111_UNET = re.compile(
    r"lora_unet_(conv_in|conv_out|time_embedding_linear_\d+|(down|up)_blocks_\d+_(attentions|resnets)_\d+_.+"
    r"|mid_block_(attentions|resnets)_\d+_.+|down_blocks_\d+_downsamplers_0_conv|up_blocks_\d+_upsamplers_0_conv"
    r"|(input_blocks|output_blocks|middle_block|time_embed|label_emb|out)_.*)"
)
_ATTENTION = re.compile(r"(lora_te2?_text_model_encoder_layers_\d+_self_attn)_(q|k|v|out)_proj")


def _a1111_partial_attention(names: list[str], base: str) -> set[str]:
    """Text-encoder attention modules A1111 skips: on OpenCLIP encoders (SD2's, SDXL's second) it
    applies q/k/v/out only when all four of a layer are present (interop.md B)."""
    prefix = {"sd2": "lora_te_", "sdxl": "lora_te2_"}.get(base)
    if prefix is None:
        return set()
    layers: dict[str, set[str]] = {}
    for name in names:
        match = _ATTENTION.fullmatch(name)
        if match and name.startswith(prefix):
            layers.setdefault(match[1], set()).add(name)
    return {n for layer, found in layers.items() if len(found) < 4 for n in found}

"""Which tools load a file, and how faithfully: ComfyUI, AUTOMATIC1111, diffusers and LyCORIS.

The rules are those of docs/compatibility.md, read from each tool's loading code (ComfyUI, A1111,
diffusers, lycoris-lora), applied per module from its name, algorithm, options and tensor shapes. The
tests in ``tests/interop`` check them against the real LyCORIS and diffusers and against reference
loaders that reproduce ComfyUI's and A1111's code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..algorithms import algorithm_class
from ..algorithms.files import DEVIATE, REJECT, SKIP, TOOLS, Kernel, Verdicts, merge_verdicts
from .detect import detect_algo

LOADS, DEVIATES, PARTLY, FAILS = "loads", "loads with deviation", "loads partly", "does not load"

#: the text-encoder modules kohya names that ComfyUI maps (ComfyUI's LORA_CLIP_MAP)
COMFY_TE_SUFFIXES = (
    "mlp_fc1",
    "mlp_fc2",
    "self_attn_q_proj",
    "self_attn_k_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
)
SD_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
#: lycoris-lora's create_lycoris_from_weights (lycoris/wrapper.py, 4.1.3) matches only
#: ``lycoris_<module path with _>`` of the one model it is given; other names are left unmatched
LYCORIS_NAMES = (
    "LyCORIS's create_lycoris_from_weights reads only lycoris_ names (convert --for lycoris renames the UNet's modules)"
)


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
    elif tally.skipped:
        verdict.status = PARTLY
    elif tally.deviations:
        verdict.status = DEVIATES
    return verdict


def compatibility(
    modules: Mapping[str, Mapping[str, Tensor]],
    records: Mapping[str, Mapping[str, Any]],
    base: str = "unknown",
    non_finite: Sequence[str] = (),
    naming: str = "kohya",
) -> list[ToolVerdict]:
    """Verdicts of ComfyUI, A1111, diffusers and LyCORIS for modules ``{name: {suffix: tensor}}`` and their
    records.

    The naming rules are the tools' and live here (an SD prefix, ComfyUI's text-encoder map, A1111's
    compvis names and OpenCLIP attention rule, the ``lycoris_`` prefix); what a tool does with an
    algorithm's module each algorithm declares (``tool_verdicts``). ``base`` (``sd1``, ``sd2``,
    ``sdxl`` or unknown) matters for A1111's OpenCLIP attention rule. ``non_finite`` names modules
    with NaN/Inf values: every tool loads them, and its output is NaN. ``naming`` is the file's own
    (``"diffusers"`` for ``unet.``/``transformer.`` keys; matters on SD3/Flux). A module a tool raises on
    (``REJECT``) fails the whole file in that tool: diffusers' ``load_lora_weights`` and LyCORIS's
    ``create_lycoris_from_weights`` do not catch per module.
    """
    tallies = {tool: _Tally() for tool in TOOLS}
    whole: dict[str, str] = {}
    partial_attention = _a1111_partial_attention(list(modules), base)
    notes: list[str] = []
    for name, module in modules.items():
        record = records.get(name, {})
        cls = algorithm_class(record.get("algo") or detect_algo(name, module))
        if cls.tool_note and cls.tool_note not in notes:
            notes.append(cls.tool_note)
        dit = base in DIT_BASES
        naming_verdicts = _dit_verdicts(name, module, base, naming) if dit else None
        verdicts = naming_verdicts if naming_verdicts is not None else _naming_verdicts(name, partial_attention, base)
        # a module a tool cannot name never reaches its loading code: the algorithm's rules do not apply
        unnamed = {tool for tool, (kind, _) in verdicts.items() if kind in (SKIP, REJECT)}
        kernel = dit_kernel(name) if dit else sd_kernel(name, base)
        algo_verdicts = cls.tool_verdicts(module, record.get("options"), kernel)
        merge_verdicts(verdicts, {t: v for t, v in algo_verdicts.items() if t not in unnamed})
        if "diff_b" in module and _a1111_openclip_qkv(name, base):
            merge_verdicts(verdicts, {"A1111": (DEVIATE, A1111_DROPS_QKV_BIAS)})
        for tool, tally in tallies.items():
            kind, reason = verdicts.get(tool, ("load", ""))
            if kind == REJECT:
                whole.setdefault(tool, f"{reason}, e.g. module {name}")
            elif kind == SKIP:
                tally.skip(reason, name)
            elif kind == DEVIATE:
                tally.deviate(reason, name)
            else:
                tally.loaded += 1
    total = len(modules)
    out = [_verdict(tool, tallies[tool], total, whole.get(tool)) for tool in TOOLS]
    if non_finite:
        for verdict in out:
            if verdict.status != FAILS:
                verdict.status = PARTLY if verdict.status == PARTLY else DEVIATES
                verdict.notes.append(f"NaN/Inf values, the output becomes NaN: {_examples(list(non_finite))}")
                verdict.deviating = sorted({*verdict.deviating, *non_finite})
    for note in notes:
        for verdict in out:
            if verdict.tool in ("ComfyUI", "A1111") and verdict.status != FAILS:
                verdict.notes.append(note)
    return out


#: the bases of SD3/SD3.5 and Flux.1 files (``"sd3 or flux"``: split names of double-stream blocks only)
DIT_BASES = ("flux", "sd3", "sd3 or flux")
#: split (diffusers) module paths that ComfyUI applies to a row block of a fused original Linear
_FUSED_MEMBER = re.compile(r".*_attn2?_(to_[qkv]|add_[qkv]_proj)|single_transformer_blocks_\d+_proj_mlp")
#: split block modules diffusers 0.42.1's ``lora_transformer_`` (mixture) converter maps: only attention
_MIXTURE_ATTENTION = re.compile(
    r"lora_transformer_(single_)?transformer_blocks_\d+_attn_(to_[qkv]|add_[qkv]_proj|to_out_0|to_add_out)"
)
_MIXTURE_TOP = ("context_embedder", "norm_out_linear", "proj_out", "x_embedder", "time_text_embed_")
#: Flux.1's widths, which diffusers' kohya converter assumes: fused qkv 3·3072, linear1 3·3072 + 12288
_FLUX1_FUSED_ROWS = {"qkv": 9216, "linear1": 21504}
COMFY_DROPS_ROW_BIAS = (
    "ComfyUI applies this module to a row block of a fused layer and drops its bias difference (diff_b): "
    'load_lora names the bias "{}.bias" of a tuple, which no weight has'
)
A1111_NO_DIT = "A1111 has no SD3/Flux support"
DIFFUSERS_SD3_NAMES = (
    "diffusers' SD3 loader reads only diffusers/PEFT names (transformer.<path>.lora_A); "
    "convert --for diffusers writes them"
)


def dit_kernel(name: str) -> Kernel:
    """Every module of the SD3/Flux transformers and their text encoders is a Linear, except SD3's patch
    embedding (a 2×2 convolution)."""
    return None if "pos_embed_proj" in name or "x_embedder_proj" in name else ()


def _dit_verdicts(name: str, module: Mapping[str, Tensor], base: str, naming: str = "kohya") -> Verdicts:
    """What ComfyUI (``model_lora_keys_unet``/``_clip``, SD3 and Flux maps), A1111 (nothing) and diffusers
    0.42.1 (``FluxLoraLoaderMixin``/``SD3LoraLoaderMixin.lora_state_dict``) decide for one module of an SD3 or
    Flux file from its name (and, for diffusers' kohya Flux converter, its width). ``naming`` is the file's:
    ``"diffusers"`` (``transformer.<path>`` keys, read natively by diffusers when LoRA) or kohya-style."""
    out: Verdicts = {"A1111": (SKIP, A1111_NO_DIT)}
    if naming == "diffusers":
        out["LyCORIS"] = (SKIP, LYCORIS_NAMES)
        if "lora_up.weight" not in module:
            out["diffusers"] = (REJECT, "diffusers' SD3/Flux loaders read LoRA keys only (Invalid LoRA checkpoint)")
        path = name.removeprefix("lora_transformer_")
        if "diff_b" in module and path != name and _FUSED_MEMBER.fullmatch(path):
            out["ComfyUI"] = (DEVIATE, COMFY_DROPS_ROW_BIAS)
        return out
    standalone = name.startswith("lycoris_")
    if not standalone:
        out["LyCORIS"] = (SKIP, LYCORIS_NAMES)
    else:
        out["diffusers"] = (REJECT, "load_lora_weights has no mapping for the lycoris_ prefix")
    if name.startswith("lora_te"):
        if name.startswith(("lora_te1_", "lora_te2_")) and not name.endswith(COMFY_TE_SUFFIXES):
            out["ComfyUI"] = (SKIP, "ComfyUI maps only q/k/v/out_proj and mlp fc1/fc2 of CLIP text encoders")
        if base == "sd3":
            out["diffusers"] = (SKIP, DIFFUSERS_SD3_NAMES)
        elif name.startswith("lora_te3_"):
            out["diffusers"] = (REJECT, "diffusers' Flux kohya converter raises on T5 (lora_te3_) keys")
        return out
    if base == "sd3":
        if not standalone:
            out["diffusers"] = (SKIP, DIFFUSERS_SD3_NAMES)
    elif name.startswith("lora_transformer_"):
        path = name.removeprefix("lora_transformer_")
        block = path.startswith(("transformer_blocks_", "single_transformer_blocks_"))
        known = _MIXTURE_ATTENTION.fullmatch(name) if block else path.startswith(_MIXTURE_TOP)
        if not known:
            out["diffusers"] = (
                REJECT,
                "diffusers' lora_transformer_ converter maps only attention in a block (the block itself "
                "otherwise) and loading raises",
            )
    elif name.startswith("lora_unet_"):
        fused = next((k for k in _FLUX1_FUSED_ROWS if name.endswith(f"_{k}")), None)
        up = module.get("lora_up.weight")
        if fused and up is not None and up.shape[0] != _FLUX1_FUSED_ROWS[fused]:
            out["diffusers"] = (
                REJECT,
                f"diffusers' kohya Flux converter assumes Flux.1's widths ({_FLUX1_FUSED_ROWS[fused]} rows in "
                f"{fused}, not {up.shape[0]}) and fails an assertion",
            )
    split_path = name.partition("_")[2] if standalone else name.removeprefix("lora_transformer_")
    if "diff_b" in module and split_path != name and _FUSED_MEMBER.fullmatch(split_path):
        out["ComfyUI"] = (DEVIATE, COMFY_DROPS_ROW_BIAS)
    return out


def _naming_verdicts(name: str, partial_attention: set[str], base: str = "unknown") -> Verdicts:
    """What the tools' name mapping alone decides for a module (before its algorithm is asked)."""
    standalone = name.startswith("lycoris_")  # LyCORIS standalone / SimpleTuner: diffusers UNet paths
    if not name.startswith(SD_PREFIXES) and not standalone:
        prefix = name.split("_")[0]
        reason = f"prefix {prefix!r} is not an SD model name (kohya lora_unet_/lora_te*_)"
        return {
            "ComfyUI": (SKIP, reason),
            "A1111": (SKIP, reason),
            "diffusers": (REJECT, reason),
            "LyCORIS": (SKIP, LYCORIS_NAMES),
        }
    out: Verdicts = {}
    if not standalone:
        out["LyCORIS"] = (SKIP, LYCORIS_NAMES)
    is_te = name.startswith("lora_te")
    if is_te and not name.endswith(COMFY_TE_SUFFIXES) and not name.endswith("text_projection"):
        out["ComfyUI"] = (SKIP, "ComfyUI maps only q/k/v/out_proj and mlp fc1/fc2 of text encoders")
    if standalone:
        out["A1111"] = (SKIP, "A1111 has no mapping for the lycoris_ prefix")
        out["diffusers"] = (REJECT, "load_lora_weights has no mapping for the lycoris_ prefix")
    elif name.startswith("lora_unet_") and not _A1111_UNET.fullmatch(name):
        out["A1111"] = (SKIP, "A1111 has no compvis name for this UNet module")
    elif name in partial_attention:
        out["A1111"] = (SKIP, "A1111 applies OpenCLIP attention q/k/v/out only all four together")
    elif (why := _a1111_text_encoder_skip(name, base)) is not None:
        out["A1111"] = (SKIP, why)
    return out


_SD_CONV = re.compile(
    r"(?:lora_unet|lycoris)_(conv_in|conv_out|.*_conv[12]|.*_conv_shortcut|.*_(down|up)samplers_0_(conv|op)"
    r"|input_blocks_0_0|out_2|.*_in_layers_2|.*_out_layers_3|.*_skip_connection|input_blocks_\d+_0_op"
    r"|output_blocks_\d+_\d+_conv|(.*)_proj_(in|out))"
)
_ONE_BY_ONE = ("conv_shortcut", "skip_connection", "proj_in", "proj_out")


def sd_kernel(name: str, base: str = "unknown") -> Kernel:
    """A UNet module's kernel from its kohya/LyCORIS name, where the SD layouts fix it: ``(3, 3)`` for
    the resnet, sampler, ``conv_in``/``conv_out`` convolutions, ``(1, 1)`` for shortcuts and SD1's
    ``proj_in``/``proj_out``, ``()`` for the other kohya UNet modules and text-encoder modules (Linears);
    None when unknown (``proj_in``/``proj_out`` on an unknown base, other ``lycoris_`` names)."""
    if name.startswith("lora_te"):
        return ()
    if not name.startswith(("lora_unet_", "lycoris_")):
        return None
    match = _SD_CONV.fullmatch(name)
    if match is None:  # a Linear of an SD UNet; lycoris_ names may be of any model
        return () if name.startswith("lora_unet_") else None
    if name.endswith(("proj_in", "proj_out")):
        return {"sd1": (1, 1), "sd2": (), "sdxl": ()}.get(base)
    return (1, 1) if name.endswith(_ONE_BY_ONE) else (3, 3)


_A1111_TE_LAYER = re.compile(r"lora_te2?_text_model_encoder_layers_\d+_(.+)")


def _a1111_text_encoder_skip(name: str, base: str) -> str | None:
    """A1111's text-encoder names (``extensions-builtin/Lora/networks.py``, v1.10): it converts only
    ``lora_te_``/``lora_te2_text_model_encoder_layers_N_*``; any other ``lora_te_``/``lora_te2_`` name
    (``final_layer_norm``, embeddings) is left as it is and matches no module. On the OpenCLIP encoders
    (SD2's, SDXL's second) it renames ``mlp_fc1/2`` and ``self_attn`` but not ``layer_norm1/2``, which
    match nothing there (OpenCLIP's are ``ln_1``/``ln_2``). ``lora_te1_`` names all fall back to SDXL's
    first (transformers) encoder. An unknown base is read as SD1/SDXL (the transformers layout)."""
    if not name.startswith(("lora_te_", "lora_te2_")):
        return None
    layer = _A1111_TE_LAYER.fullmatch(name)
    if layer is None:
        return "A1111 maps only the encoder layers of this text encoder (not final_layer_norm or embeddings)"
    openclip = name.startswith("lora_te2_") or base == "sd2"
    if openclip and layer[1].startswith("layer_norm"):
        return "A1111 does not map layer_norm1/2 of an OpenCLIP text encoder (its ln_1/ln_2)"
    return None


_A1111_UNET = re.compile(
    r"lora_unet_(conv_in|conv_out|time_embedding_linear_\d+|(down|up)_blocks_\d+_(attentions|resnets)_\d+_.+"
    r"|mid_block_(attentions|resnets)_\d+_.+|down_blocks_\d+_downsamplers_0_conv|up_blocks_\d+_upsamplers_0_conv"
    r"|(input_blocks|output_blocks|middle_block|time_embed|label_emb|out)_.*)"
)
_ATTENTION = re.compile(r"(lora_te2?_text_model_encoder_layers_\d+_self_attn)_(q|k|v|out)_proj")


A1111_DROPS_QKV_BIAS = (
    "A1111 patches OpenCLIP attention through in_proj_weight and drops the q/k/v bias differences (diff_b)"
)


def _a1111_openclip_qkv(name: str, base: str) -> bool:
    """A q/k/v module of an OpenCLIP text encoder (SD2's ``lora_te_``, SDXL's ``lora_te2_``): A1111
    (``networks.py`` v1.10.1, ``network_apply_weights``) writes their weight differences into the
    ``MultiheadAttention``'s ``in_proj_weight`` and never touches ``in_proj_bias``."""
    prefix = {"sd2": "lora_te_", "sdxl": "lora_te2_"}.get(base)
    match = _ATTENTION.fullmatch(name)
    return prefix is not None and match is not None and name.startswith(prefix) and match[2] in ("q", "k", "v")


def _a1111_partial_attention(names: list[str], base: str) -> set[str]:
    """Text-encoder attention modules A1111 skips: on OpenCLIP encoders (SD2's, SDXL's second) it
    applies q/k/v/out only when all four of a layer are present."""
    prefix = {"sd2": "lora_te_", "sdxl": "lora_te2_"}.get(base)
    if prefix is None:
        return set()
    layers: dict[str, set[str]] = {}
    for name in names:
        match = _ATTENTION.fullmatch(name)
        if match and name.startswith(prefix):
            layers.setdefault(match[1], set()).add(name)
    return {n for layer, found in layers.items() if len(found) < 4 for n in found}

"""Tiny, randomly initialised models of the real Stable Diffusion architectures (no downloads).

They have the same module classes and naming as SD1.x/SD2.x/SDXL (diffusers ``UNet2DConditionModel``,
transformers CLIP text encoders, ``AutoencoderKL``), so adapters, file names and tools are exercised
exactly as on the real models, in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .sd import SD_KINDS, SDParts

TINY_SD_UNET: dict[str, Any] = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)

#: SDXL's shape in miniature: 3 blocks, 2 resnets each, attention only in the deeper two, linear
#: projections, per-block transformer depth and the text_time added embedding (SGM naming tests).
TINY_SDXL_UNET: dict[str, Any] = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 2),
    cross_attention_dim=32,
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32,
    norm_num_groups=32,
)


def tiny_sd_unet(seed: int = 0, **overrides: Any):
    """A tiny SD1.x-shaped ``UNet2DConditionModel`` with deterministic random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_SD_UNET, **overrides})


def tiny_unet_inputs(batch: int = 2, seed: int = 0, unet=None) -> dict[str, torch.Tensor]:
    """Noisy latents, timesteps and text context for :func:`tiny_sd_unet`."""
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config if unet is not None else TINY_SD_UNET
    size = cfg["sample_size"] if isinstance(cfg, dict) else cfg.sample_size
    channels = cfg["in_channels"] if isinstance(cfg, dict) else cfg.in_channels
    ctx = cfg["cross_attention_dim"] if isinstance(cfg, dict) else cfg.cross_attention_dim
    return {
        "sample": torch.randn(batch, channels, size, size, generator=gen),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen),
        "encoder_hidden_states": torch.randn(batch, 8, ctx, generator=gen),
    }


#: SD1's UNet layout in miniature for :func:`tiny_sd_parts`: two resnets per level, attention in all
#: but the deepest down level and the first up level — the layout A1111/ComfyUI's name tables assume
#: (``input_blocks_{1 + 3n + j}``, upsampler sub-index 1 on up block 0). TINY_SD_UNET (one resnet per
#: level) stays as it is for the older tests.
TINY_SD1_UNET: dict[str, Any] = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)

#: SD2's UNet in miniature: SD1's layout with per-block head counts and linear projections (as the
#: real SD2) and a 64-wide text context, so an SD1 network cannot silently load onto it.
TINY_SD2_UNET: dict[str, Any] = {
    **TINY_SD1_UNET,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "cross_attention_dim": 64,
}

_TINY_CLIP: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,  # even × power of two, so OFT/BOFT blocks fit the MLPs
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=1000,
    max_position_embeddings=77,
    # the ids of the tiny tokenizer's specials (see tiny_clip_tokenizer); eos != 2 keeps CLIP's
    # pooled output on the first end-of-text token, as with the real models
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)

#: SD1's text encoder (CLIP ViT-L in miniature: quick_gelu).
TINY_SD1_TE: dict[str, Any] = {**_TINY_CLIP, "hidden_act": "quick_gelu"}
#: SD2's text encoder (OpenCLIP ViT-H in miniature: gelu, width = TINY_SD2_UNET's context).
TINY_SD2_TE: dict[str, Any] = {**_TINY_CLIP, "hidden_size": 64, "hidden_act": "gelu"}
#: SDXL's two text encoders: their widths add up to TINY_SDXL_UNET's cross_attention_dim (16 + 16 =
#: 32) and te2's projection_dim fills projection_class_embeddings_input_dim (8 * 6 + 32).
TINY_SDXL_TE1: dict[str, Any] = {**_TINY_CLIP, "hidden_size": 16, "num_attention_heads": 2, "hidden_act": "quick_gelu"}
TINY_SDXL_TE2: dict[str, Any] = {
    **_TINY_CLIP,
    "hidden_size": 16,
    "num_attention_heads": 2,
    "hidden_act": "gelu",
    "projection_dim": 32,
}

#: A 2-block AutoencoderKL (latent downscale 2, 4 latent channels) for encode/decode round trips.
TINY_VAE: dict[str, Any] = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
)

_TINY_UNETS = {"sd1": TINY_SD1_UNET, "sd2": TINY_SD2_UNET, "sdxl": TINY_SDXL_UNET}
_TINY_TES = {"sd1": [TINY_SD1_TE], "sd2": [TINY_SD2_TE], "sdxl": [TINY_SDXL_TE1, TINY_SDXL_TE2]}
#: The real VAEs' latent scaling factors (SDXL's VAE differs from SD1/SD2's).
_VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


def tiny_clip_tokenizer():
    """A real ``CLIPTokenizer`` built offline: the 256 byte symbols (bare and ``</w>``) and no merges.

    Its 514 ids fit the tiny text encoders' 1000-token vocabulary; specials are bos 0, eos/pad 1.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in alphabet:
            vocab[ch + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_TINY_CLIP["max_position_embeddings"])


def tiny_sd_parts(kind: str = "sd1", seed: int = 0, with_vae: bool = False):
    """Tiny SD1/SD2/SDXL :class:`~higanbana.models.sd.SDParts`: UNet, text encoder(s), tokenizers and
    (``with_vae``) a VAE, with deterministic random weights; the global RNG is left untouched."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if kind not in SD_KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; expected one of {SD_KINDS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**_TINY_UNETS[kind])
        text_encoders = []
        for i, te_cfg in enumerate(_TINY_TES[kind]):
            cls = CLIPTextModelWithProjection if kind == "sdxl" and i == 1 else CLIPTextModel
            text_encoders.append(cls(CLIPTextConfig(**te_cfg)))
        vae = AutoencoderKL(**TINY_VAE, scaling_factor=_VAE_SCALING[kind]) if with_vae else None
    for module in (unet, vae, *text_encoders):
        if module is not None:
            module.eval()
    tokenizers = [tiny_clip_tokenizer() for _ in text_encoders]
    return SDParts(kind, unet, text_encoders, vae, tokenizers)


def tiny_sd_inputs(parts, batch: int = 2, seed: int = 0, seq_len: int = 8) -> dict[str, Any]:
    """UNet call kwargs for ``parts``: noisy latents, timesteps and the text context computed by
    actually running the text encoders on random token ids (bos … eos), so adapters on the text
    encoders change the UNet's output and receive gradients.

    SD1/SD2 use the last hidden state; SDXL concatenates both encoders' penultimate hidden states and
    adds ``added_cond_kwargs`` (te2's pooled projection, and size/crop ``time_ids``), as the diffusers
    pipelines do.
    """
    gen = torch.Generator().manual_seed(seed)
    cfg = parts.unet.config
    dtype = parts.unet.dtype
    vocab = min(te.config.vocab_size for te in parts.text_encoders)
    bos, eos = _TINY_CLIP["bos_token_id"], _TINY_CLIP["eos_token_id"]
    ids = torch.randint(2, vocab, (batch, seq_len), generator=gen)
    ids[:, 0], ids[:, -1] = bos, eos
    sample = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    timestep = torch.randint(0, 1000, (batch,), generator=gen)
    device = parts.unet.device
    ids = ids.to(device)
    inputs: dict[str, Any] = {"sample": sample.to(device, dtype), "timestep": timestep.to(device)}
    if parts.kind != "sdxl":
        inputs["encoder_hidden_states"] = parts.text_encoders[0](input_ids=ids).last_hidden_state.to(dtype)
        return inputs
    te1, te2 = parts.text_encoders
    hidden1 = te1(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    out2 = te2(input_ids=ids, output_hidden_states=True)
    inputs["encoder_hidden_states"] = torch.cat([hidden1, out2.hidden_states[-2]], dim=-1).to(dtype)
    size = cfg.sample_size * 8  # pixel size, as SDXL's pipeline passes it (latents × VAE factor 8)
    time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=dtype, device=device).repeat(batch, 1)
    inputs["added_cond_kwargs"] = {"text_embeds": out2.text_embeds.to(dtype), "time_ids": time_ids}
    return inputs


def save_tiny_sd(parts, folder) -> Path:
    """Write ``parts`` as a diffusers model folder (``model_index.json``, unet/, text_encoder/,
    text_encoder_2/, tokenizer(s), vae/, a scheduler config) that :func:`~higanbana.models.sd.load_sd`
    and diffusers' pipelines load offline. Returns the folder."""
    import diffusers
    from diffusers import DDPMScheduler

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    sdxl = parts.kind == "sdxl"
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", type(parts.unet).__name__],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    parts.unet.save_pretrained(root / "unet")
    for i, te in enumerate(parts.text_encoders):
        suffix = f"_{i + 1}" if i else ""
        te.save_pretrained(root / f"text_encoder{suffix}")
        index[f"text_encoder{suffix}"] = ["transformers", type(te).__name__]
        tokenizer = parts.tokenizers[i] if parts.tokenizers is not None else None
        if tokenizer is not None:
            tokenizer.save_pretrained(root / f"tokenizer{suffix}")
        index[f"tokenizer{suffix}"] = (
            ["transformers", type(tokenizer).__name__] if tokenizer is not None else [None, None]
        )
    if parts.vae is not None:
        parts.vae.save_pretrained(root / "vae")
    index["vae"] = ["diffusers", type(parts.vae).__name__] if parts.vae is not None else [None, None]
    if sdxl:
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    prediction = "v_prediction" if parts.v_parameterization else "epsilon"
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction,
    )  # SD's training schedule
    scheduler.save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return root


# ----------------------------------------------------------------------------- diffusion transformers

#: SD3/SD3.5's MMDiT in miniature (diffusers ``SD3Transformer2DModel``): 16 latent channels, 2×2
#: patches, joint blocks with an image and a context stream, adaLN-Zero modulation.
TINY_SD3_TRANSFORMER: dict[str, Any] = dict(
    sample_size=16,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=64,  # hidden 128 = 64·num_layers: ComfyUI counts an MMDiT's blocks as hidden/64
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=128,
    pooled_projection_dim=32,
    pos_embed_max_size=16,
    dual_attention_layers=(0,),  # SD3.5's MMDiT-X: a second attention in the first block
    qk_norm="rms_norm",
)

#: Flux.1 in miniature (diffusers ``FluxTransformer2DModel``): packed 2×2 latent patches (64 channels
#: from 16), double-stream and single-stream blocks, rotary positions, the guidance embedding (dev).
TINY_FLUX_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(2, 2, 4),
)


def tiny_sd3_transformer(seed: int = 0, **overrides: Any):
    """A tiny SD3-shaped ``SD3Transformer2DModel`` with deterministic random weights."""
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SD3Transformer2DModel(**{**TINY_SD3_TRANSFORMER, **overrides})


def tiny_flux_transformer(seed: int = 0, **overrides: Any):
    """A tiny Flux-shaped ``FluxTransformer2DModel`` with deterministic random weights."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel(**{**TINY_FLUX_TRANSFORMER, **overrides})


def tiny_dit_inputs(family: str, latents: torch.Tensor, sigmas: torch.Tensor, seed: int = 0, seq_len: int = 6):
    """Keyword inputs of the tiny SD3 or Flux transformer for noisy ``latents`` ``(B, 16, H, W)`` at
    noise levels ``sigmas``: random text states and pooled embeddings, SD3's timestep ``1000·σ``, Flux's
    ``σ`` with packed latents, position ids and guidance 3.5. Unpack Flux's output with
    :func:`higanbana.models.flux.unpack_latents`."""
    from .flux import latent_ids, pack_latents

    gen = torch.Generator().manual_seed(seed)
    b = latents.shape[0]
    text = torch.randn(b, seq_len, 32, generator=gen)
    pooled = torch.randn(b, 32, generator=gen)
    if family == "sd3":
        return {
            "hidden_states": latents,
            "encoder_hidden_states": text,
            "pooled_projections": pooled,
            "timestep": 1000 * sigmas.float(),
        }
    if family == "flux":
        h, w = latents.shape[-2:]
        return {
            "hidden_states": pack_latents(latents),
            "encoder_hidden_states": text,
            "pooled_projections": pooled,
            "timestep": sigmas.float(),
            "img_ids": latent_ids(h, w),
            "txt_ids": torch.zeros(seq_len, 3),
            "guidance": torch.full((b,), 3.5),
        }
    raise ConfigError(f"unknown transformer family {family!r}; expected 'sd3' or 'flux'")


# ----------------------------------------------------------------------------- SD3 / Flux pipelines in miniature

#: a T5 encoder (v1.1: gated GELU) in miniature, as SD3 and Flux use T5-XXL; d_model = the transformers'
#: joint_attention_dim
TINY_T5: dict[str, Any] = dict(
    vocab_size=300,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
#: the 16-channel VAE of SD3/Flux in miniature (latent downscale 2), with each family's real latent
#: scale and shift
TINY_DIT_VAE: dict[str, Any] = {**TINY_VAE, "latent_channels": 16}
#: the real SD3/Flux VAEs' (scaling_factor, shift_factor)
DIT_VAE_SCALING = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
#: the families' training schedules (FlowMatchEulerDiscreteScheduler): SD3's constant shift 3, Flux's
#: resolution-dependent shift
DIT_SCHEDULERS: dict[str, dict[str, Any]] = {
    "sd3": {"shift": 3.0},
    "flux": {
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
}


def tiny_t5_tokenizer(max_length: int = 512):
    """A T5-style fast tokenizer built offline: byte-level symbols, ``<pad>`` 0, ``</s>`` 1 appended to
    every text, ``<unk>`` 2 (its 259 ids fit :data:`TINY_T5`'s vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{ch: i + 3 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def tiny_dit_parts(kind: str = "flux", seed: int = 0):
    """Tiny SD3 or Flux :class:`~higanbana.models.dit.DitParts`: transformer, CLIP-L ([CLIP-G]) and T5
    encoders with their tokenizers, the 16-channel VAE, the family's scheduler config; deterministic
    random weights, the global RNG left untouched. SD3's two CLIPs (with projections) fill the
    transformer's 32-wide pooled input; Flux's CLIP-L pooled output is 32 wide itself."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from .dit import DIT_KINDS, DitParts

    if kind not in DIT_KINDS:
        raise ConfigError(f"unknown transformer family {kind!r}; expected one of {DIT_KINDS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = (tiny_sd3_transformer if kind == "sd3" else tiny_flux_transformer)(seed)
        if kind == "sd3":
            clip = {**_TINY_CLIP, "hidden_size": 16, "num_attention_heads": 2, "projection_dim": 16}
            encoders = [
                CLIPTextModelWithProjection(CLIPTextConfig(**clip, hidden_act="quick_gelu")),
                CLIPTextModelWithProjection(CLIPTextConfig(**clip, hidden_act="gelu")),
            ]
        else:
            encoders = [CLIPTextModel(CLIPTextConfig(**_TINY_CLIP, hidden_act="quick_gelu"))]
        encoders.append(T5EncoderModel(T5Config(**TINY_T5)))
        scaling, shift = DIT_VAE_SCALING[kind]
        vae = AutoencoderKL(**TINY_DIT_VAE, scaling_factor=scaling, shift_factor=shift)
    tokenizers: list[Any] = [tiny_clip_tokenizer() for _ in encoders[:-1]]
    tokenizers.append(tiny_t5_tokenizer())
    for module in (transformer, vae, *encoders):
        module.eval()
    return DitParts(kind, transformer, encoders, vae, tokenizers, dict(DIT_SCHEDULERS[kind]))


def save_tiny_dit(parts, folder) -> Path:
    """Write DiT ``parts`` as a diffusers folder (``model_index.json``, transformer/, text encoders,
    tokenizers, vae/, scheduler/) that :func:`~higanbana.models.dit.load_dit` and the diffusers
    pipelines load offline. Returns the folder."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .dit import PIPELINES, TEXT_ENTRIES

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {
        "_class_name": PIPELINES[parts.kind],
        "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", type(parts.transformer).__name__],
        "vae": ["diffusers", type(parts.vae).__name__],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    parts.transformer.save_pretrained(root / "transformer")
    parts.vae.save_pretrained(root / "vae")
    for (te_entry, tok_entry), te, tok in zip(
        TEXT_ENTRIES[parts.kind], parts.text_encoders, parts.tokenizers, strict=True
    ):
        te.save_pretrained(root / te_entry)
        tok.save_pretrained(root / tok_entry)
        index[te_entry] = ["transformers", type(te).__name__]
        index[tok_entry] = ["transformers", type(tok).__name__]
    FlowMatchEulerDiscreteScheduler(**parts.scheduler_config).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return root

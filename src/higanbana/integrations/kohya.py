"""kohya sd-scripts network module: train any higanbana algorithm with ``train_network.py``.

One file on purpose: it is the one module sd-scripts imports, and its parts (``network_args``
parsing, model-kind detection, the network class, the two module functions) serve only that protocol.

sd-scripts loads a network *module* by name (``--network_module``) and drives it through a small
protocol: ``create_network`` / ``create_network_from_weights`` at module level, then ``apply_to``,
``prepare_optimizer_params``, ``save_weights`` … on the network it returns. This module implements
that protocol on top of :class:`higanbana.network.AdapterNetwork`, so every algorithm, preset and
option of higanbana is available from the trainer, and the files it writes carry kohya's metadata
*and* our ``higanbana.*`` records (exact reloads, no guessing).

This is the module's home; users name it ``higanbana.kohya`` (a small alias module that re-exports
this protocol), and that is the name written to ``ss_network_module``.

Usage (SD1.x/2.x with ``train_network.py``, SDXL with ``sdxl_train_network.py``)::

    accelerate launch train_network.py --network_module higanbana.kohya --network_dim 8 \\
        --network_alpha 4 --network_args "algo=lokr" "factor=8" "preset=attn-mlp" ...

``--network_args`` (all ``key=value`` strings, parsed strictly — an unknown key or a bad value is an
error naming it):

* ``algo`` (default ``lora``; ``locon``, ``loha``, ``lokr``, ``dora``, ``ia3``, ``glora``, ``oft``/``diag-oft``,
  ``boft``, ``full``/``native``), ``preset`` (a built-in name — see ``higanbana.presets.list_presets()`` —
  or a TOML path; default ``full``), ``enable_conv``, ``train_norm``;
* ``conv_dim``, ``conv_alpha`` (convolutions with a kernel > 1; default: the linear dim/alpha);
* ``dropout``, ``rank_dropout``, ``module_dropout``, and every algorithm option (``factor``,
  ``decompose_both``, ``use_tucker``, ``use_scalar``, ``weight_decompose``, ``wd_on_output``, ``rs_lora``,
  ``constraint``, ``rescaled``, ``boft_stages``, ``on_input``, ``train_bias``, ``full_matrix``,
  ``unbalanced_factorization``, ``rank_dropout_scale``, ``forward_mode``); LyCORIS spellings
  ``dora_wd``, ``wd_on_out``, ``use_cp``, ``train_on_input`` and ``bypass_mode`` are accepted too;
* ``loraplus_lr_ratio``, ``loraplus_unet_lr_ratio``, ``loraplus_text_encoder_lr_ratio``: LoRA+ on the
  zero-initialised "up" factor of *every* factored algorithm (LoRA, LoHa, LoKr, GLoRA);
* ``model_kind`` (``sd1``/``sd2``/``sdxl``) overrides the detection (two text encoders → SDXL, a UNet
  cross-attention width of 1024 or an OpenCLIP (gelu) text encoder → SD2, else SD1).

Booleans accept ``1/0``, ``true/false``, ``yes/no``, ``on/off`` (any case) — ``"0"`` and ``"no"`` are
false (LyCORIS treats every non-empty string as true). ``--network_dropout`` (passed as
``neuron_dropout``) becomes ``dropout`` unless ``dropout`` is in ``--network_args``.

Differences from ``lycoris.kohya``, on purpose: LoRA+ boosts LoHa/LoKr/GLoRA "up" factors too (not
only ``lora_up``); ``merge_to`` merges at the network's multiplier (not always 1); no argument is
silently dropped; files are safetensors only (``--save_model_as safetensors``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..algorithms import accepted_options, algorithm_class, list_algorithms, option_types
from ..errors import ConfigError, HiganbanaError, nearest
from ..formats import save_tensors
from ..formats.detect import normalize_foreign
from ..formats.metadata import SS_METADATA_MINIMUM_KEYS, model_hashes
from ..formats.network_files import network_from_records, network_metadata, network_tensors
from ..formats.reader import read_network_file, records_from_tensors
from ..formats.sd_network import SD_KINDS, sd_file_metadata, sd_network_parts
from ..network import AdapterNetwork, LoadReport, NetworkConfig, Part

logger = logging.getLogger("higanbana.kohya")  # the name users know (and had before the move)

NETWORK_MODULE = "higanbana.kohya"
#: kohya's CLI defaults when --network_dim / --network_alpha are not given
DEFAULT_DIM = 4
DEFAULT_ALPHA = 1.0

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

#: network_args this module consumes itself, with their types
_OWN_ARGS: dict[str, str] = {
    "algo": "str",
    "preset": "str",
    "model_kind": "str",
    "conv_dim": "int",
    "conv_alpha": "float",
    "enable_conv": "bool",
    "train_norm": "bool",
    "loraplus_lr_ratio": "float",
    "loraplus_unet_lr_ratio": "float",
    "loraplus_text_encoder_lr_ratio": "float",
    "bypass_mode": "bool",
    "verbose": "bool",
}
#: LyCORIS / older spellings → our option names
_ARG_ALIASES = {
    "dora_wd": "weight_decompose",
    "wd_on_out": "wd_on_output",
    "use_cp": "use_tucker",
    "train_on_input": "on_input",
    "conv_rank": "conv_dim",
}
#: algorithm options that are not network_args (the trainer's dims, internal settings)
_NOT_ARGS = {"rank", "alpha", "dtype", "multiplier"}
#: options that only change training, not the module's structure (kept from network_args on reload)
_RUNTIME_OPTIONS = ("dropout", "rank_dropout", "module_dropout", "rank_dropout_scale", "forward_mode")
_KOHYA_BLOCK_ARGS = (
    "block_dims",
    "block_alphas",
    "conv_block_dims",
    "conv_block_alphas",
    "down_lr_weight",
    "mid_lr_weight",
    "up_lr_weight",
    "block_lr_zero_threshold",
)
#: diffusers paths in presets → the paths of kohya's own SDXL UNet (sdxl_original_unet, SGM layout)
_SGM_NATIVE_NAMES = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


# --------------------------------------------------------------------------- network_args
@functools.cache
def _option_types() -> dict[str, str]:
    """Every network_arg name → ``"bool" | "int" | "float" | "str"`` (``"?"`` suffix: ``none`` allowed),
    from the algorithms' declared ``Options`` (their field types)."""
    types = dict(_OWN_ARGS)
    for algo in list_algorithms():
        for name, hint in option_types(algorithm_class(algo)).items():
            if name in _NOT_ARGS or name in types:
                continue
            allowed = typing.get_args(hint) or (hint,)
            base = next((t.__name__ for t in (bool, int, float, str) if t in allowed), "str")
            types[name] = base + ("?" if type(None) in allowed else "")
    return types


def parse_bool(name: str, value: Any) -> bool:
    """A strict boolean: ``1/0, true/false, yes/no, on/off`` (any case) or a bool; anything else is an error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"network arg {name}={value!r}: expected a boolean (true/false, 1/0, yes/no, on/off)")


def _parse_value(name: str, kind: str, value: Any) -> Any:
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))):
        return None
    if kind == "bool":
        return parse_bool(name, value)
    try:
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
    except (TypeError, ValueError):
        what = "an integer" if kind == "int" else "a number"
        raise ConfigError(f"network arg {name}={value!r}: expected {what}") from None
    return str(value).strip()


def parse_network_args(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Typed, validated network_args from kohya's ``key=value`` strings (or Python values).

    ``None`` values are treated as absent (the trainer passes ``dropout=None`` when there is no
    ``--network_dropout``). Unknown keys are errors with the nearest valid name.
    """
    types = dict(_option_types())
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if value is None:
            continue
        name = _ARG_ALIASES.get(key, key)
        if key in _KOHYA_BLOCK_ARGS:
            raise ConfigError(
                f"network arg {key!r} (kohya's block-wise dims/lrs) is not supported by {NETWORK_MODULE}: "
                "use a preset TOML with [[rules]] (per-block algo/rank/alpha) via preset=<file>.toml"
            )
        if name in ("rank", "alpha", "dim", "network_dim", "network_alpha"):
            raise ConfigError(f"network arg {key!r}: give the rank and alpha with --network_dim / --network_alpha")
        if name not in types:
            raise ConfigError(f"unknown network arg {key!r}{nearest(key, [*types, *_ARG_ALIASES])}")
        if name in out:
            raise ConfigError(f"network arg {key!r} repeats {name!r}")
        out[name] = _parse_value(key, types[name], value)
    if "model_kind" in out and out["model_kind"] not in SD_KINDS:
        kind = out["model_kind"]
        raise ConfigError(
            f"network arg model_kind={kind!r}: expected one of {', '.join(SD_KINDS)}{nearest(kind, SD_KINDS)}"
        )
    for name in ("dropout", "rank_dropout", "module_dropout"):
        if name in out and not 0.0 <= out[name] < 1.0:
            raise ConfigError(f"network arg {name}={out[name]}: expected a fraction in [0, 1)")
    if "bypass_mode" in out:
        bypass = out.pop("bypass_mode")
        if "forward_mode" in out and bypass and out["forward_mode"] != "bypass":
            raise ConfigError(f"network args bypass_mode=true and forward_mode={out['forward_mode']!r} disagree")
        out.setdefault("forward_mode", "bypass" if bypass else "auto")
    return out


# --------------------------------------------------------------------------- models
def _as_list(text_encoder: Any) -> list[nn.Module]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return [t for t in text_encoder if t is not None]
    return [text_encoder]


def _cross_attention_dim(unet: nn.Module) -> int | None:
    config = getattr(unet, "config", None)
    value = (
        config.get("cross_attention_dim")
        if isinstance(config, Mapping)
        else getattr(config, "cross_attention_dim", None)
    )
    if isinstance(value, int):
        return value
    for path, module in unet.named_modules():  # kohya's own UNets: read it off the first cross-attention key
        if path.endswith("attn2.to_k") and isinstance(module, nn.Linear):
            return module.in_features
    return value[0] if isinstance(value, (list, tuple)) and value else None


def detect_model_kind(text_encoders: Sequence[nn.Module], unet: nn.Module | None, override: str | None = None) -> str:
    """``sdxl`` for two text encoders; ``sd2`` for a 1024-wide cross-attention or a gelu (OpenCLIP) text
    encoder; else ``sd1``. ``override`` (network arg ``model_kind``) wins when it fits the encoder count."""
    count = len(text_encoders)
    if override is not None:
        if override not in SD_KINDS:
            raise ConfigError(f"model_kind={override!r}: expected one of {', '.join(SD_KINDS)}")
        if count and (count == 2) != (override == "sdxl"):
            raise ConfigError(f"model_kind={override!r} does not fit a model with {count} text encoder(s)")
        return override
    if count > 2:
        raise ConfigError(f"{count} text encoders: {NETWORK_MODULE} handles SD1.x/2.x (one) and SDXL (two)")
    if count == 2:
        return "sdxl"
    if unet is not None and _cross_attention_dim(unet) == 1024:
        return "sd2"
    # SD2's OpenCLIP text encoder uses gelu, SD1's CLIP ViT-L quick_gelu (also true of tiny test models)
    act = getattr(getattr(text_encoders[0], "config", None), "hidden_act", None) if count else None
    return "sd2" if act == "gelu" else "sd1"


def _is_native_sgm(unet: nn.Module | None) -> bool:
    """kohya's own SDXL UNet (``sdxl_original_unet``) already has SGM module paths."""
    return unet is not None and hasattr(unet, "input_blocks") and not hasattr(unet, "down_blocks")


def kohya_parts(kind: str, unet: nn.Module | None, text_encoders: Sequence[nn.Module]) -> list[Part]:
    """The parts of an SD model with kohya's prefixes; a native SGM UNet is named by its own paths."""
    if _is_native_sgm(unet):
        parts = sd_network_parts(kind, None, text_encoders)
        return [Part("lora_unet", unet, "unet", None), *parts]
    return sd_network_parts(kind, unet, text_encoders)


def _native_sgm_config(config: NetworkConfig) -> NetworkConfig:
    """Add the SGM paths of the diffusers names a preset targets (``conv_in`` → ``input_blocks.0.0`` …)."""
    target = config.targets.get("unet")
    if target is None:
        return config
    extra = tuple(_SGM_NATIVE_NAMES[n] for n in target.names if n in _SGM_NATIVE_NAMES)
    excl = tuple(_SGM_NATIVE_NAMES[n] for n in target.exclude if n in _SGM_NATIVE_NAMES)
    if not extra and not excl:
        return config
    new = replace(target, names=target.names + extra, exclude=target.exclude + excl)
    return replace(config, targets={**config.targets, "unet": new})


def _te_index(prefix: str) -> int:
    """``lora_te`` → 0, ``lora_te1`` → 0, ``lora_te2`` → 1."""
    tail = prefix[len("lora_te") :]
    return int(tail) - 1 if tail else 0


def _description(prefix: str) -> str:
    """kohya's lr descriptions: ``unet``, ``textencoder``, ``textencoder 1`` …"""
    if prefix == "lora_unet":
        return "unet"
    tail = prefix[len("lora_te") :] if prefix.startswith("lora_te") else prefix
    return f"textencoder {tail}" if tail else "textencoder"


class LoadInfo(NamedTuple):
    """What :meth:`KohyaNetwork.load_weights` did, shaped like torch's ``_IncompatibleKeys`` (kohya prints it)."""

    missing_keys: list[str]
    unexpected_keys: list[str]
    report: LoadReport

    def __repr__(self) -> str:
        return self.report.summary()

    __str__ = __repr__


# --------------------------------------------------------------------------- the network
class KohyaNetwork(AdapterNetwork):
    """An :class:`AdapterNetwork` with the methods sd-scripts' trainer calls.

    A subclass rather than a wrapper: the trainer hands the network to ``accelerator.prepare``,
    calls ``.to()``, ``.train()``, ``.parameters()`` and ``state_dict()`` on it, and keeps calling the
    protocol methods through ``accelerator.unwrap_model`` — one ``nn.Module`` that *is* the network
    keeps all of that (and every AdapterNetwork method) working without delegation.

    Trainer call order (``train_network.py``): ``create_network`` → ``prepare_network(args)`` →
    ``apply_to(te, unet, train_te, train_unet)`` → ``load_weights`` (with ``--network_weights``) →
    ``enable_gradient_checkpointing`` → ``prepare_optimizer_params[_with_multiple_te_lrs]`` →
    ``accelerator.prepare`` → ``prepare_grad_etc`` → per epoch ``on_epoch_start``, per step
    ``on_step_start``, ``get_trainable_params`` (grad clipping), ``apply_max_norm_regularization``
    (``--scale_weight_norms``) → ``save_weights``.
    """

    def _setup_kohya(
        self,
        kind: str,
        *,
        multiplier: float = 1.0,
        loraplus: Mapping[str, float | None] | None = None,
    ) -> KohyaNetwork:
        self.model_kind = kind
        loraplus = loraplus or {}
        self.loraplus_lr_ratio = loraplus.get("loraplus_lr_ratio")
        self.loraplus_unet_lr_ratio = loraplus.get("loraplus_unet_lr_ratio")
        self.loraplus_text_encoder_lr_ratio = loraplus.get("loraplus_text_encoder_lr_ratio")
        self.multiplier = float(multiplier)
        self.set_multiplier(self.multiplier)
        return self

    # ------------------------------------------------------------------ set-up
    def prepare_network(self, args: Any) -> None:
        """Check the trainer's arguments early: files are safetensors only (metadata, no pickled code)."""
        save_as = getattr(args, "save_model_as", None)
        if save_as is not None and str(save_as).lower() != "safetensors":
            raise ConfigError(
                f"--save_model_as {save_as}: {NETWORK_MODULE} saves .safetensors only "
                "(it keeps the metadata that reloads the network and cannot run code); use --save_model_as safetensors"
            )

    def apply_to(
        self,
        text_encoder: Any,
        unet: nn.Module | None,
        apply_text_encoder: bool = True,
        apply_unet: bool = True,
    ) -> None:
        """Attach the adapters of the chosen parts; the others are dropped (not trained, not saved), as kohya does."""
        keep = set()
        for prefix, part in self.parts.items():
            if (part.kind == "unet" and apply_unet) or (part.kind == "text_encoder" and apply_text_encoder):
                keep.add(prefix)
        if not keep:
            raise ConfigError("apply_to: neither the UNet nor the text encoders have adapters to train")
        self._check_models(text_encoder, unet, keep)
        self.drop_parts(set(self.parts) - keep)
        logger.info("%s: %d modules on %s", NETWORK_MODULE, len(self.adapters), ", ".join(sorted(self.parts)))
        self.attach()

    def _check_models(self, text_encoder: Any, unet: nn.Module | None, prefixes: set[str]) -> None:
        """The trainer must pass the models the network was created on (adapters wrap their layers)."""
        tes = _as_list(text_encoder)
        for prefix in prefixes:
            part = self.parts[prefix]
            if part.kind == "unet":
                given = unet
            else:
                index = _te_index(prefix)
                given = tes[index] if index < len(tes) else None
            if given is not None and given is not part.module:
                raise HiganbanaError(f"apply_to: the model for {prefix} is not the one the network was created on")

    def load_weights(self, file: str | os.PathLike) -> LoadInfo:
        """Load a file's tensors into the network (``--network_weights``: resume / continue training).

        Like kohya (``load_state_dict(sd, strict=False)``) missing modules and extra keys are reported,
        not fatal; tensors that do not fit their module (another algorithm, rank or shape) are an error,
        and so is a file none of whose modules is in the network.
        """
        tensors, _records, _meta = read_network_file(file)
        report = self.load_state_tensors(tensors, source=str(file), strict=False)
        if report.mismatched or not report.loaded:
            raise HiganbanaError(
                report.summary() + ("\n  (no module of the file is in the network)" * (not report.loaded))
            )
        if not report.ok:
            logger.warning("%s", report.summary())
        return LoadInfo(list(report.missing), list(report.unexpected), report)

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the adapters are inside the models' layers, whose checkpointing covers them."""

    def prepare_grad_etc(self, text_encoder: Any = None, unet: Any = None) -> None:
        """Make every adapter parameter trainable (the trainer froze the models just before)."""
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        """Training mode: dropouts (``dropout``, ``rank_dropout``, ``module_dropout``) are active."""
        self.train()

    def on_step_start(self, *args: Any, **kwargs: Any) -> None:
        """Nothing per step (kept for the trainer's optional hook)."""

    def get_trainable_params(self) -> list[nn.Parameter]:
        """The parameters gradient clipping (``--max_grad_norm``) applies to."""
        return [p for p in self.parameters() if p.requires_grad]

    def set_multiplier(self, multiplier: float | Mapping[str, float]) -> None:
        """The strength of every module (or ``{pattern: strength}``); kohya uses it for sampling and merging."""
        super().set_multiplier(multiplier)
        if not isinstance(multiplier, Mapping):
            self.multiplier = float(multiplier)

    def is_mergeable(self) -> bool:
        return True

    # ------------------------------------------------------------------ optimizer
    def set_loraplus_lr_ratio(
        self,
        loraplus_lr_ratio: float | None = None,
        loraplus_unet_lr_ratio: float | None = None,
        loraplus_text_encoder_lr_ratio: float | None = None,
    ) -> None:
        """LoRA+ ratios (kohya's ``--loraplus_*lr_ratio``): the "up" factors learn ``ratio`` times faster."""
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio

    def _loraplus_ratios(self) -> dict[str, float | None]:
        ratios = {}
        for prefix, part in self.parts.items():
            own = self.loraplus_unet_lr_ratio if part.kind == "unet" else self.loraplus_text_encoder_lr_ratio
            ratios[prefix] = own if own is not None else self.loraplus_lr_ratio
        return ratios

    def prepare_optimizer_params(
        self,
        text_encoder_lr: float | Sequence[float] | None,
        unet_lr: float | None,
        default_lr: float | None = None,
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """``(param_groups, descriptions)`` per part, with a LoRA+ group per part when a ratio is set.

        ``text_encoder_lr`` is one rate or a list with one per text encoder (newer sd-scripts; a single
        entry is used for both SDXL encoders); ``None`` means ``default_lr`` (``--learning_rate``). A
        rate of 0 leaves that part out of the optimizer, as kohya does.
        """
        te_count = sum(1 for p in self.parts.values() if p.kind == "text_encoder")
        if self.model_kind == "sdxl":
            te_count = 2
        if text_encoder_lr is None or (isinstance(text_encoder_lr, (list, tuple)) and not text_encoder_lr):
            te_lrs: list[float | None] = [default_lr] * max(te_count, 1)
        elif isinstance(text_encoder_lr, (list, tuple)):
            te_lrs = [float(x) for x in text_encoder_lr]
            if len(te_lrs) == 1:
                te_lrs = te_lrs * max(te_count, 1)
            elif len(te_lrs) < te_count:
                raise ConfigError(f"text_encoder_lr has {len(te_lrs)} rates for {te_count} text encoders")
        else:
            te_lrs = [float(text_encoder_lr)] * max(te_count, 1)
        lrs: dict[str, float | None] = {}
        for prefix, part in self.parts.items():
            if part.kind == "unet":
                lrs[prefix] = unet_lr if unet_lr is not None else default_lr
            else:
                lrs[prefix] = te_lrs[min(_te_index(prefix), len(te_lrs) - 1)]
        ratios = self._loraplus_ratios()
        no_lr = [p for p, lr in lrs.items() if lr is None]
        for prefix in no_lr:
            if ratios.get(prefix) not in (None, 1):
                raise ConfigError(f"LoRA+ needs a learning rate for {prefix}: pass --learning_rate or the part's lr")
        placeholder = {p: (1.0 if lr is None else float(lr)) for p, lr in lrs.items()}
        groups = self.param_groups(1.0, lrs=placeholder, loraplus_ratio=ratios)
        descriptions = []
        for group in groups:
            prefix, plus = group["prefix"], group["loraplus"]
            if prefix in no_lr:
                del group["lr"]  # the optimizer's default rate
            descriptions.append(_description(prefix) + (" plus" if plus else ""))
        return groups, descriptions

    def prepare_optimizer_params_with_multiple_te_lrs(
        self,
        text_encoder_lr: float | Sequence[float] | None,
        unet_lr: float | None,
        default_lr: float | None = None,
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Newer sd-scripts' entry point (one rate per text encoder): same as :meth:`prepare_optimizer_params`."""
        return self.prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)

    def apply_max_norm_regularization(self, max_norm_value: float, device: Any = None) -> tuple[int, float, float]:
        """kohya's ``--scale_weight_norms``: ``(keys_scaled, mean_norm, maximum_norm)``, norms after scaling.

        Factored algorithms are scaled through their "up" factors; OFT/IA3/full are left alone, as in LyCORIS.
        """
        return self.apply_max_norm(max_norm_value)

    # ------------------------------------------------------------------ files and merging
    def save_weights(
        self, file: str | os.PathLike, dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None
    ) -> Path:
        """Write a safetensors file: the trainer's metadata, ``sshs_*`` hashes and our ``higanbana.*`` records.

        With no metadata from the trainer, kohya's ``ss_*`` minimum and ``modelspec.*`` are written from
        the network; with the trainer's (even ``--no_metadata``'s minimum set) that wins, with any missing
        minimum key filled in and ``algo`` added to ``ss_network_args``.
        """
        path = Path(file)
        if path.suffix.lower() != ".safetensors":
            raise HiganbanaError(
                f"{path}: {NETWORK_MODULE} saves .safetensors only (use --save_model_as safetensors); "
                "pickled .ckpt/.pt files lose the metadata that reloads the network and can run code when loaded"
            )
        tensors = network_tensors(self, dtype or torch.float32)
        ours = sd_file_metadata(self, self.model_kind, output_name=path.stem, network_module=NETWORK_MODULE)
        if metadata:
            meta = {str(k): str(v) for k, v in metadata.items()}
            for key in SS_METADATA_MINIMUM_KEYS:
                meta.setdefault(key, ours[key])
            meta["ss_network_args"] = _with_algo(meta["ss_network_args"], ours["ss_network_args"])
        else:
            meta = ours
        for key in [k for k in meta if k.startswith("higanbana.") or k.startswith("sshs_")]:
            del meta[key]  # never trust stale records or hashes
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hashes(tensors, meta)
        meta.update(network_metadata(self))
        return save_tensors(tensors, path, meta)

    @torch.no_grad()
    def merge_to(
        self,
        text_encoder: Any,
        unet: nn.Module | None,
        weights_sd: Mapping[str, Tensor] | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> None:
        """Merge the adapters into the models' weights at the network's multiplier (kohya's inference merge).

        ``weights_sd`` (what :func:`create_network_from_weights` returned) is loaded first; the merged
        weights keep the layers' dtype (``dtype`` is the models' dtype in kohya and needs no cast here).
        The network must have been created on these models.
        """
        self._check_models(text_encoder, unet, set(self.parts))
        if device is not None:
            self.to(device=device)
        if weights_sd is not None:
            tensors, _ = normalize_foreign(dict(weights_sd))
            report = self.load_state_tensors(tensors, source="weights_sd", strict=False)
            if report.mismatched or report.missing:
                raise HiganbanaError(report.summary())
        self.merge()


def _with_algo(trainer_args: str, our_args: str) -> str:
    """``ss_network_args`` from the trainer, with ``algo`` added when absent (tools read it from there)."""
    try:
        args = json.loads(trainer_args)
        algo = json.loads(our_args)["algo"]
    except (ValueError, KeyError, TypeError):
        return trainer_args
    if not isinstance(args, dict) or "algo" in args:
        return trainer_args
    return json.dumps({"algo": algo, **args})


# --------------------------------------------------------------------------- module functions
def _resolve_dropout(args: dict[str, Any], neuron_dropout: Any) -> None:
    if neuron_dropout is None:
        return
    value = _parse_value("neuron_dropout", "float", neuron_dropout)
    if "dropout" in args:
        if args["dropout"] != value:
            logger.warning("network arg dropout=%s wins over --network_dropout %s", args["dropout"], value)
        return
    args["dropout"] = value


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoder: Any,
    unet: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> KohyaNetwork:
    """A new network on the UNet and text encoder(s) from kohya's arguments (see the module docstring).

    Adapters are created for every part; ``apply_to`` then attaches the parts the trainer trains.
    ``network_dim``/``network_alpha`` are the rank/alpha (defaults 4 and 1, kohya's), given to the
    algorithm only when it takes them (IA3/full have no rank, OFT/BOFT no alpha: use ``constraint``).
    """
    args = parse_network_args(kwargs)
    _resolve_dropout(args, neuron_dropout)
    tes = _as_list(text_encoder)
    kind = detect_model_kind(tes, unet, args.pop("model_kind", None))
    loraplus = {k: args.pop(k) for k in list(args) if k.startswith("loraplus_")}
    verbose = args.pop("verbose", False)
    preset = args.pop("preset", "full")
    data: dict[str, Any] = {"preset": preset}
    for key in ("enable_conv", "train_norm"):
        if key in args:
            data[key] = args.pop(key)
    config = NetworkConfig.from_dict(data, where=f"preset {preset}")
    if _is_native_sgm(unet):
        config = _native_sgm_config(config)
    algo = args.pop("algo", None) or config.algo
    takes = accepted_options(algorithm_class(algo))
    options: dict[str, Any] = {}
    dim = int(network_dim) if network_dim is not None else DEFAULT_DIM
    alpha = float(network_alpha) if network_alpha is not None else DEFAULT_ALPHA
    if "rank" in takes:
        options["rank"] = dim
        if "conv_dim" in args:
            options["conv_rank"] = args.pop("conv_dim")
    if "alpha" in takes:
        options["alpha"] = alpha
        if "conv_alpha" in args:
            options["conv_alpha"] = args.pop("conv_alpha")
    for key in ("conv_dim", "conv_alpha"):
        if key in args:
            raise ConfigError(
                f"network arg {key}: algorithm {algo!r} has no {'rank' if key == 'conv_dim' else 'alpha'}"
            )
    options.update(args)  # algorithm options: the config checks that the algorithm takes them
    parts = kohya_parts(kind, unet, tes)
    net = KohyaNetwork(parts, algo, config=config, **options)
    net._setup_kohya(kind, multiplier=multiplier, loraplus=loraplus)
    if verbose:
        logger.info("%s", net.describe_table())
    return net


def _records_of(file: Any, tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]], dict]:
    """Records for ``weights_sd``: from the file's ``higanbana.modules`` when it has them, else detected."""
    metadata: dict[str, str] = {}
    if file is not None and str(file).lower().endswith(".safetensors") and Path(file).is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                metadata = dict(f.metadata() or {})
        except Exception:  # an unreadable header just means: detect from the tensors
            metadata = {}
    tensors, records = records_from_tensors(dict(tensors), metadata)
    return tensors, records, metadata


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: Any,
    text_encoder: Any,
    unet: nn.Module,
    weights_sd: Mapping[str, Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[KohyaNetwork, dict[str, Tensor]]:
    """``(network, tensors)`` rebuilt from a file (ours: exact records; kohya/LyCORIS/PEFT: detected).

    With ``weights_sd`` the tensors come from it (the file is only read for its metadata). The
    network holds exactly the file's modules; ``network_args`` that change training only (dropouts,
    ``forward_mode``, LoRA+ ratios) apply, structural ones (algo, preset, factor …) come from the file.
    """
    args = parse_network_args(kwargs)
    tes = _as_list(text_encoder)
    kind = detect_model_kind(tes, unet, args.pop("model_kind", None))
    if weights_sd is None:
        if file is None:
            raise ConfigError("create_network_from_weights: give a file or weights_sd")

        tensors, records, _metadata = read_network_file(file)
    else:
        tensors, records, _metadata = _records_of(file, weights_sd)
    parts = kohya_parts(kind, unet, tes)
    source = str(file) if file is not None else "weights_sd"
    net = network_from_records(parts, records, tensors, source=source, strict=True, network_class=KohyaNetwork)
    loraplus = {k: args.pop(k) for k in list(args) if k.startswith("loraplus_")}
    args.pop("verbose", None)
    runtime = {k: args.pop(k) for k in _RUNTIME_OPTIONS if k in args}
    if args:
        logger.info("network args %s are taken from %s, not from --network_args", ", ".join(sorted(args)), source)
    for adapter in net.adapters.values():
        for key, value in runtime.items():
            if hasattr(adapter, key):
                setattr(adapter, key, value)
    net._setup_kohya(kind, multiplier=multiplier, loraplus=loraplus)
    if for_inference:
        net.eval()
    return net, tensors


__all__ = [
    "KohyaNetwork",
    "LoadInfo",
    "create_network",
    "create_network_from_weights",
    "detect_model_kind",
    "kohya_parts",
    "parse_bool",
    "parse_network_args",
]

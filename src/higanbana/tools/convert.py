"""Convert adapter files between kohya/LyCORIS naming, Hugging Face PEFT folders and diffusers files.

Sources: our files, kohya/LyCORIS files (``lora_unet_``/``lora_te*_``, standalone ``lycoris_``, kohya
OFT ``oft_unet_``), a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``; alphas from
the config), a diffusers ``pytorch_lora_weights.safetensors`` (a file, or a folder holding one; alphas
from its ``lora_adapter_metadata`` header, else α = r) and PEFT/diffusers-keyed single files.

Targets (``to``):

* ``"kohya"``: one ``.safetensors`` file, kohya names (SGM paths for the SDXL UNet), our
  ``higanbana.*`` records, kohya's ``ss_*`` set (kept from the source, or built for an SD model),
  recomputed ``sshs_*`` hashes;
* ``"peft"``: a folder with ``adapter_config.json`` + ``adapter_model.safetensors`` for one part
  (``part=``, default the UNet) — PEFT describes one model;
* ``"diffusers"``: a folder with diffusers' ``pytorch_lora_weights.safetensors`` (``unet.`` keys) and
  ``adapter_config.json`` — the UNet only.

**The model.** kohya module names are lossy (``_`` stands for ``.``), so the module paths PEFT and
diffusers need come from the model: pass ``model=`` (an ``SDParts``, any ``nn.Module`` with
``model_prefix``, or a list of ``Part``) or ``base=`` (a diffusers folder or single checkpoint, loaded
with :func:`higanbana.models.sd.load_sd`). With a model every module is rebuilt on its layer (shape
checked, options derived), which also maps diffusers paths of an SDXL UNet to kohya's SGM names and
``lycoris_`` UNet names to ``lora_unet_``. Without a model only renames are possible: ``to="kohya"``
from kohya/LyCORIS files (``prefix_map={"lycoris": "lora_unet"}`` renames module-name prefixes) or
from SD1.x/2.x PEFT/diffusers files (SDXL needs the model for the SGM names, and says so).

**Exact, lossy, refused.** ``dtype`` (fp32/fp16/bf16; ``alpha`` stays float32) is the user's explicit
choice and never counts as lossy. A conversion is *lossy* when the target cannot hold part of the
file but what it does hold is exact: dropping whole modules the target has no room for (modules of
the other parts when ``part=`` was not given — an explicit ``part`` is the user's choice, like
``dtype`` — or modules of an algorithm the target lacks while other modules remain), and DoRA into
diffusers (``dora_scale`` dropped, as diffusers' own loader does with kohya DoRA files). Lossy
conversions need ``allow_lossy=True`` and are listed in the report.
Anything that would be written but compute differently is *refused*, always: a target with no module
left (e.g. an OFT/BOFT/GLoRA/IA3/Full/Norm-only file into PEFT: PEFT's algorithms of those names
differ), LoCon Tucker (``lora_mid``) or input-axis DoRA into PEFT, mixed LoRA/LoHa/LoKr in one PEFT
config, LoKr splits PEFT cannot reproduce.

**For a tool** (``for_tool``: ``comfyui``, ``a1111``, ``lycoris``, ``diffusers``; a ``.safetensors``
output): modules that tool fails on are rewritten into an exactly equivalent layout it reads, where one
exists (each algorithm's ``layout_for``: a Tucker LoKr ``w2`` as its dense product for ComfyUI and
LyCORIS, a LoCon Tucker core folded into ``lora_down`` for diffusers, missing BOFT stages as identity
stages for LyCORIS); for LyCORIS the UNet's modules are renamed ``lycoris_<diffusers path>`` (its
standalone names; SD1.x/2.x kohya names are those paths, SDXL's SGM names need ``base=``) and the text
encoders' dropped (lossy: ``create_lycoris_from_weights`` wraps one model). The report then says what
``info`` says of the output for that tool, so what has no equivalent layout is named.

Every file is written atomically; an existing output is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, HiganbanaError
from ..formats.detect import detect_algo, group_modules, load_peft_folder, normalize_with_paths, peft_alphas
from ..formats.metadata import model_hashes, read_base_model
from ..formats.network_files import network_from_records, network_metadata, network_tensors
from ..formats.peft import TARGET_FILES, write_peft
from ..formats.reader import read_tensors, records_from_tensors
from ..formats.safetensors_io import FORMAT_VERSION, save_tensors
from ..formats.sd_network import sd_file_metadata, sd_network_parts
from ..formats.validate import check_file
from ..models.sd import load_sd
from ..network import Part
from ..safeio import check_writable
from .resize import DTYPES, parse_dtype

TARGETS = ("kohya", "peft", "diffusers")
#: ``for_tool`` values and the tool names of ``info``'s verdicts
FOR_TOOLS = {"comfyui": "ComfyUI", "a1111": "A1111", "lycoris": "LyCORIS", "diffusers": "diffusers"}


@dataclass
class ConvertReport:
    """What :func:`convert` wrote: formats, modules, and what was dropped (lossy) with the reason."""

    src: str
    dst: str
    source_format: str
    target: str
    modules: int
    outputs: list[str]
    dtype: str | None = None
    tool: str | None = None  # the tool the file was written for (for_tool)
    dropped: dict[str, str] = field(default_factory=dict)  # module -> why (lossy, allowed)
    lossy: list[str] = field(default_factory=list)  # lossy steps taken
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- reading
def _diffusers_config(metadata: Mapping[str, str]) -> dict | None:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except ValueError:
        return None
    return {k.partition(".")[2] if k.startswith(("unet.", "text_encoder")) else k: v for k, v in cfg.items()}


def read_source(
    src: str | os.PathLike, *, unsafe_pickle: bool = False
) -> tuple[dict[str, Tensor], dict[str, dict], dict[str, str], str, list[str]]:
    """``(tensors, records, metadata, source format, notes)`` of any supported source, kohya-named and
    checked like every file a reader takes (:func:`higanbana.formats.validate.check_file`)."""
    tensors, records, metadata, source, notes = _read_source(Path(src), unsafe_pickle)
    check_file(tensors, records).raise_if_invalid(str(src))
    return tensors, records, metadata, source, notes


def _read_source(
    src: Path, unsafe_pickle: bool
) -> tuple[dict[str, Tensor], dict[str, dict], dict[str, str], str, list[str]]:
    notes: list[str] = []
    if src.is_dir():
        if (src / "adapter_model.safetensors").is_file():
            tensors, config = load_peft_folder(src)
            groups = group_modules(tensors)
            records = {n: {"algo": detect_algo(n, m), "options": None} for n, m in groups.items()}
            return tensors, records, {}, f"peft ({config.get('peft_type')})", notes
        if (src / "pytorch_lora_weights.safetensors").is_file():
            src = src / "pytorch_lora_weights.safetensors"
        else:
            raise HiganbanaError(
                f"{src}: a folder needs adapter_model.safetensors (PEFT) or pytorch_lora_weights.safetensors"
            )
    tensors, metadata = read_tensors(src, unsafe_pickle=unsafe_pickle)
    if not tensors:
        raise HiganbanaError(f"{src}: the file holds no tensors")
    try:
        if "higanbana.modules" in metadata:
            tensors, records = records_from_tensors(tensors, metadata)
            return tensors, records, metadata, "higanbana", notes
        renamed, source, paths = normalize_with_paths(tensors, None, None, None)
        if paths:  # PEFT / diffusers keys: alpha from the config in the header, else α = r
            config = _diffusers_config(metadata)
            if config is not None:
                alphas = peft_alphas(config, paths.values())
                for name, path in paths.items():
                    renamed[f"{name}.alpha"] = torch.tensor(alphas[path], dtype=torch.float32)
            else:
                notes.append("no PEFT config in the file: alpha = rank (scale 1) for every module")
        groups = group_modules(renamed)
        records = {n: {"algo": detect_algo(n, m), "options": None} for n, m in groups.items()}
    except HiganbanaError as exc:
        raise HiganbanaError(f"{src}: {exc}") from exc
    return renamed, records, metadata, source, notes


def _rename_prefixes(
    tensors: dict[str, Tensor], records: dict[str, dict], prefix_map: Mapping[str, str] | None
) -> tuple[dict[str, Tensor], dict[str, dict]]:
    if not prefix_map:
        return tensors, records

    def new(name: str) -> str:
        for old in sorted(prefix_map, key=len, reverse=True):
            if name.startswith(old + "_"):
                return prefix_map[old] + name[len(old) :]
        return name

    renamed = {new(n): r for n, r in records.items()}
    if len(renamed) != len(records):
        raise HiganbanaError(f"prefix_map {dict(prefix_map)} makes two modules share a name")
    out = {}
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        out[f"{new(module)}.{suffix}"] = value
    return out, renamed


# --------------------------------------------------------------------------- the model
def _parts(model: Any, model_prefix: str) -> list:
    if hasattr(model, "kind") and hasattr(model, "unet") and hasattr(model, "text_encoders"):
        return sd_network_parts(model.kind, model.unet, list(model.text_encoders))
    if isinstance(model, nn.Module):
        return [Part(model_prefix, model)]
    if isinstance(model, Sequence) and model and all(isinstance(p, Part) for p in model):
        return list(model)
    raise ConfigError("model= must be an SDParts, an nn.Module (with model_prefix) or a list of Part")


def _source_dtype(tensors: Mapping[str, Tensor]) -> torch.dtype:
    counts = Counter(t.dtype for k, t in tensors.items() if t.is_floating_point() and not k.endswith(".alpha"))
    dtype = counts.most_common(1)[0][0] if counts else torch.float32
    return dtype if dtype in DTYPES.values() else torch.float32


def _cast(tensors: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    if dtype is None:
        return dict(tensors)
    return {k: v.to(dtype) if v.is_floating_point() and not k.endswith(".alpha") else v for k, v in tensors.items()}


def _check_output(dst: Path, to: str, overwrite: bool, src: Path) -> None:
    if dst.resolve() == src.resolve():
        raise HiganbanaError(f"{dst}: the output is the input; write elsewhere")
    if to == "kohya":
        if dst.is_dir():
            raise HiganbanaError(f"{dst}: is a folder; to='kohya' writes one .safetensors file")
        if dst.suffix.lower() != ".safetensors":
            raise HiganbanaError(f"{dst}: to='kohya' writes a .safetensors file")
        if dst.exists() and not overwrite:
            raise HiganbanaError(f"{dst}: exists; pass overwrite=True (--overwrite) to replace it")
        check_writable(dst)
        return
    if dst.exists() and not dst.is_dir():
        raise HiganbanaError(f"{dst}: is a file; to={to!r} writes a folder")
    files = TARGET_FILES["peft" if to == "peft" else "diffusers-unet"]
    present = [f for f in files if (dst / f).exists()]
    if present and not overwrite:
        raise HiganbanaError(f"{dst}: {', '.join(present)} exist(s); pass overwrite=True (--overwrite) to replace")
    check_writable(dst)


# --------------------------------------------------------------------------- convert
def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str = "kohya",
    dtype: torch.dtype | str | None = None,
    allow_lossy: bool = False,
    prefix_map: Mapping[str, str] | None = None,
    overwrite: bool = False,
    unsafe_pickle: bool = False,
    model: Any = None,
    base: str | os.PathLike | None = None,
    model_prefix: str = "lycoris",
    part: str | None = None,
    for_tool: str | None = None,
    progress: bool = True,
) -> ConvertReport:
    """Convert ``src`` into ``dst`` in format ``to`` (see the module docstring for every rule).

    ``progress`` shows a bar over the stages (load the base model, read, map onto the model, write):
    each stage is one whole-file step, so the bar says where a long conversion is.
    """
    from tqdm.auto import tqdm

    stages = ["read", "write"]
    if base is not None:
        stages.insert(0, "load base")
    if model is not None or base is not None:
        stages.insert(-1, "map onto model")
    with tqdm(total=len(stages), desc="convert", unit="stage", disable=not progress) as bar:

        def stage(name: str) -> None:
            if bar.n or name != stages[0]:
                bar.update(1)
            bar.set_postfix_str(name)

        report = _convert(
            src,
            dst,
            to,
            dtype,
            allow_lossy,
            prefix_map,
            overwrite,
            unsafe_pickle,
            model,
            base,
            model_prefix,
            part,
            for_tool,
            stage,
        )
        bar.update(bar.total - bar.n)
    if for_tool is not None:
        _say_what_the_tool_does(report)
    return report


def _convert(
    src,
    dst,
    to,
    dtype,
    allow_lossy,
    prefix_map,
    overwrite,
    unsafe_pickle,
    model,
    base,
    model_prefix,
    part,
    for_tool,
    stage,
) -> ConvertReport:
    if to not in TARGETS:
        raise ConfigError(f"unknown target {to!r} (choose from {', '.join(TARGETS)})")
    tool = None
    if for_tool is not None:
        if for_tool not in FOR_TOOLS:
            raise ConfigError(f"unknown tool {for_tool!r} for --for (choose from {', '.join(FOR_TOOLS)})")
        if to != "kohya":
            raise ConfigError(f"--for {for_tool} writes one .safetensors file; leave out --to {to}")
        tool = FOR_TOOLS[for_tool]
    src, dst = Path(src), Path(dst)
    out_dtype = parse_dtype(dtype)
    _check_output(dst, to, overwrite, src)
    if model is not None and base is not None:
        raise ConfigError("pass model= or base=, not both")
    if base is not None:
        stage("load base")
        model = load_sd(base)
    stage("read")
    tensors, records, metadata, source, notes = read_source(src, unsafe_pickle=unsafe_pickle)
    tensors, records = _rename_prefixes(tensors, records, prefix_map)
    report = ConvertReport(
        str(src), str(dst), source, to, 0, [], str(out_dtype).replace("torch.", "") if out_dtype else None, tool
    )
    report.notes.extend(notes)
    file_dtype = out_dtype or _source_dtype(tensors)
    if tool is not None:
        tensors, records = _layouts_for(tool, tensors, records, report)
    if tool == "LyCORIS" and model is not None:
        stage("map onto model")
        net = _net_on_model(src, model, model_prefix, records, tensors)
        stage("write")
        return _lycoris_with_model(dst, net, metadata, file_dtype, allow_lossy, report)
    if tool == "LyCORIS" and not all(n.startswith("lycoris_") for n in records):
        _no_sgm_names(src, records, metadata)
        tensors, records = _unet_only(tensors, records, "lora_unet", allow_lossy, report)
        prefix_map = {**(prefix_map or {}), "lora_unet": "lycoris"}
        tensors, records = _rename_prefixes(tensors, records, {"lora_unet": "lycoris"})

    if model is None:
        if to != "kohya":
            raise HiganbanaError(
                f"{src}: writing {to} needs each module's path in the model, and kohya names are lossy "
                "('_' stands for '.'); pass base=BASE (--base, a diffusers model folder) or model="
            )
        stage("write")
        return _kohya_without_model(
            src,
            dst,
            tensors,
            records,
            metadata,
            source,
            file_dtype,
            report,
            prefix_map,
            lycoris_names=tool in ("LyCORIS", "ComfyUI"),  # both read lycoris_ UNet names
        )

    stage("map onto model")
    net = _net_on_model(src, model, model_prefix, records, tensors)
    stage("write")
    if to == "kohya":
        return _kohya_with_model(dst, net, model, metadata, file_dtype, report)
    return _to_peft(src, dst, net, to, part, allow_lossy, file_dtype, report)


def _net_on_model(src, model, model_prefix, records, tensors):
    try:
        return network_from_records(_parts(model, model_prefix), records, tensors, source=str(src), strict=True)
    except HiganbanaError as exc:
        raise HiganbanaError(f"{exc} (converting against the given model)") from exc


def _layouts_for(
    tool: str, tensors: dict[str, Tensor], records: dict[str, dict], report: ConvertReport
) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """Each module rewritten into the equivalent layout ``tool`` reads, where its algorithm has one; a
    rewritten module's record keeps its algorithm, its options are detected again from the new keys."""
    from ..algorithms import algorithm_class

    out: dict[str, Tensor] = {}
    records = dict(records)
    rewritten: Counter[str] = Counter()
    for name, module in group_modules(tensors).items():
        algo = records[name]["algo"]
        new = algorithm_class(algo).layout_for(tool, module)
        if new is not None:
            module = new
            records[name] = {"algo": algo, "options": None}
            rewritten[algo] += 1
        out.update({f"{name}.{suffix}": t for suffix, t in module.items()})
    for algo, count in sorted(rewritten.items()):
        report.notes.append(f"{count} {algo} module(s) rewritten into an equivalent layout {tool} reads")
    return out, records


def _no_sgm_names(src, records, metadata) -> None:
    sdxl = read_base_model(metadata) == "sdxl" or any(n.startswith(("lora_te1_", "lora_te2_")) for n in records)
    if sdxl:
        raise HiganbanaError(
            f"{src}: an SDXL file names its UNet by SGM paths; LyCORIS needs the diffusers paths, which come "
            "from the UNet config: pass base=BASE (--base)"
        )


def _unet_only(tensors, records, unet_prefix, allow_lossy, report):
    """Keep the UNet's modules: LyCORIS's standalone loader wraps one model."""
    others = [n for n in records if not n.startswith(unet_prefix + "_")]
    if not others:
        return tensors, records
    if len(others) == len(records):
        raise HiganbanaError(f"no UNet ({unet_prefix}_) module to write for LyCORIS")
    why = "LyCORIS's create_lycoris_from_weights wraps one model (the UNet)"
    if not allow_lossy:
        raise HiganbanaError(
            f"{len(others)} text-encoder module(s) (e.g. {others[0]!r}) would be dropped: {why}; pass "
            "allow_lossy=True (--allow-lossy) to write the UNet's alone"
        )
    report.lossy.append(f"{len(others)} text-encoder module(s) dropped: {why}")
    report.dropped.update(dict.fromkeys(others, why))
    left_out = set(others)
    keep = {n: r for n, r in records.items() if n not in left_out}
    return {k: v for k, v in tensors.items() if k.partition(".")[0] in keep}, keep


def _lycoris_with_model(dst, net, metadata, dtype, allow_lossy, report) -> ConvertReport:
    """LyCORIS's standalone names ``lycoris_<diffusers path>`` for the UNet's modules, from the model."""
    unet = next(iter(net.parts))
    records = net.module_records()
    names = {n: "lycoris_" + r.path.replace(".", "_") for n, r in net.records.items() if r.prefix == unet}
    tensors, records = _unet_only(network_tensors(net, dtype), records, unet, allow_lossy, report)
    out = {f"{names[k.partition('.')[0]]}.{k.partition('.')[2]}": v for k, v in tensors.items()}
    meta = {k: v for k, v in metadata.items() if not k.startswith(("sshs_", "higanbana.", "lora_adapter"))}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hashes(out, meta)
    meta["higanbana.format_version"] = network_metadata(net)["higanbana.format_version"]
    meta["higanbana.modules"] = json.dumps({names[n]: r for n, r in records.items()}, sort_keys=True)
    meta["higanbana.prefix"] = "lycoris"
    save_tensors(out, dst, meta)
    report.modules, report.outputs = len(records), [str(dst)]
    return report


def _say_what_the_tool_does(report: ConvertReport) -> None:
    """What ``info`` says of the written file for the tool it was written for."""
    from ..formats.inspect import file_info

    tool = report.tool
    verdict = next(v for v in file_info(report.dst)["compatibility"] if v["tool"] == tool)
    report.notes.append(f"{tool}: {verdict['status']}")
    report.notes.extend(f"{tool}: {note}" for note in verdict["notes"])


def _kohya_without_model(
    src, dst, tensors, records, metadata, source, dtype, report, prefix_map, lycoris_names=False
) -> ConvertReport:
    names = list(records)
    left = [n for n in names if n.startswith("lycoris_")]
    if left and not lycoris_names:
        raise HiganbanaError(
            f"{src}: module {left[0]!r} (and {len(left) - 1} more) has the standalone lycoris_ prefix; which part "
            "it belongs to needs the model: pass base=BASE (--base), or prefix_map={'lycoris': 'lora_unet'} "
            "(--prefix-map lycoris=lora_unet) when the file is UNet-only"
        )
    sdxl = read_base_model(metadata) == "sdxl" or any(n.startswith(("lora_te1_", "lora_te2_")) for n in names)
    if source in ("peft", "diffusers"):
        if sdxl:
            raise HiganbanaError(
                f"{src}: an SDXL file from {source}: kohya names the SDXL UNet by its SGM paths, which need the "
                "UNet config; pass base=BASE (--base)"
            )
        report.notes.append("names use diffusers module paths (SD1.x/2.x form); pass base= to check them")
    out = _cast(tensors, dtype)
    meta = {k: v for k, v in metadata.items() if not k.startswith(("sshs_", "higanbana."))}
    if source == "higanbana":
        meta["higanbana.format_version"] = metadata["higanbana.format_version"]
        meta["higanbana.modules"] = json.dumps(records, sort_keys=True)
        if "higanbana.prefix" in metadata:
            saved = metadata["higanbana.prefix"].split(",")
            renamed = [(prefix_map or {}).get(p, p) for p in saved]
            meta["higanbana.prefix"] = ",".join(p for p in renamed if any(n.startswith(p + "_") for n in names))
    else:
        report.notes.append("no higanbana.modules written: without a model the options are detected on loading")
    meta.pop("lora_adapter_metadata", None)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hashes(out, meta)
    save_tensors(out, dst, meta)
    report.modules, report.outputs = len(records), [str(dst)]
    return report


def _kohya_with_model(dst, net, model, metadata, dtype, report) -> ConvertReport:
    out = network_tensors(net, dtype)
    meta: dict[str, str] = {}
    if hasattr(model, "kind") and not any(k.startswith("ss_") for k in metadata):
        meta.update(sd_file_metadata(net, model.kind, output_name=dst.stem))
    meta.update({k: v for k, v in metadata.items() if not k.startswith(("sshs_", "higanbana.", "lora_adapter"))})
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hashes(out, meta)
    if "modelspec.hash_sha256" in meta:
        meta["modelspec.hash_sha256"] = "0x" + meta["sshs_model_hash"]
    meta.update(network_metadata(net))
    save_tensors(out, dst, meta)
    report.modules, report.outputs = len(net.adapters), [str(dst)]
    return report


def _to_peft(src, dst, net, to, part, allow_lossy, dtype, report) -> ConvertReport:
    target = "peft" if to == "peft" else "diffusers-unet"
    written = write_peft(net, dst, target=target, part=part, dtype=dtype, allow_lossy=allow_lossy, source=str(src))
    report.modules, report.outputs, report.dropped = written.modules, written.outputs, written.dropped
    report.lossy.extend(written.lossy)
    return report


def format_report(report: ConvertReport) -> str:
    lines = [
        f"{report.src} ({report.source_format}) -> {report.dst} ({report.target}"
        + (f" for {report.tool}" if report.tool else "")
        + (f", {report.dtype})" if report.dtype else ")"),
        f"  {report.modules} module(s) written: {', '.join(report.outputs)}",
    ]
    for step in report.lossy:
        lines.append(f"  lossy: {step}")
    for name, why in list(report.dropped.items())[:20]:
        lines.append(f"    dropped {name}: {why}")
    if len(report.dropped) > 20:
        lines.append(f"    … and {len(report.dropped) - 20} more")
    lines.extend(f"  note: {n}" for n in report.notes)
    return "\n".join(lines)


# --------------------------------------------------------------------------- SD3/Flux layouts
LAYOUTS = ("split", "original")


def convert_layout(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    base: str | os.PathLike,
    layout: str,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    unsafe_pickle: bool = False,
) -> dict[str, Any]:
    """An SD3/Flux adapter file in the other module layout: ``original`` (kohya's fused ``qkv``/``linear1``
    names; LoRA, full and IA3 stack exactly, other algorithms are refused naming the module) or ``split``
    (diffusers paths; every fused module is split exactly). ``base`` is the SD3/Flux model (a diffusers
    folder or an original single file) whose widths define the row blocks. Returns ``{"modules", "layout"}``."""
    from ..formats.checkpoint import open_checkpoint
    from ..formats.dit_layout import ORIGINAL_PREFIX, to_original, to_split
    from ..formats.dit_network import DIFFUSERS_ROOTS
    from ..formats.reader import read_network_file
    from ..formats.validate import parse_records

    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r}: expected one of {LAYOUTS}")
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise HiganbanaError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    if dst.suffix.lower() != ".safetensors":
        raise HiganbanaError(f"{dst}: the output must be a .safetensors file")
    check_writable(dst)
    with open_checkpoint(base) as ckpt:
        dit = ckpt.dit_layout
        family = ckpt.kind
    if dit is None:
        raise HiganbanaError(f"--layout is for SD3/Flux files: {base} is a {family} model (give an SD3 or Flux model)")
    tensors, records, metadata = read_network_file(src, unsafe_pickle=unsafe_pickle, prefixes=DIFFUSERS_ROOTS[family])
    split_records = (
        parse_records(metadata["higanbana.split_modules"]) if "higanbana.split_modules" in metadata else None
    )
    try:
        if any(n.startswith(f"{ORIGINAL_PREFIX}_") for n in records):
            tensors, records = to_split(tensors, records, dit, split_records=split_records)
            split_records = records
        meta = {k: v for k, v in metadata.items() if not k.startswith("higanbana.")}
        meta["higanbana.format_version"] = FORMAT_VERSION
        if layout == "original":
            recorded = {n: dict(r) for n, r in (split_records or records).items()}
            tensors, _ = to_original(tensors, records, dit)
            meta["higanbana.layout"] = "original"
            meta["higanbana.split_modules"] = json.dumps(recorded, sort_keys=True)
        else:
            meta["higanbana.modules"] = json.dumps(records, sort_keys=True)
    except HiganbanaError as exc:
        raise HiganbanaError(f"{src}: {exc}") from exc
    tensors = _cast(tensors, parse_dtype(dtype))
    save_tensors(tensors, dst, meta)
    return {"modules": len(group_modules(tensors)), "layout": layout, "output": str(dst)}

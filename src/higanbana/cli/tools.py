"""``higanbana merge | extract | resize | convert``: the tools' parsers and thin handlers.

The choices below repeat the tools' own constants (``tools.merge.DTYPES``, ``tools.resize.MODES`` …)
so that defining the parser imports no torch; ``tests/test_cli.py`` checks that they agree.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError

#: output dtypes (``tools.merge.DTYPES``, ``tools.resize.DTYPES``), as ``--dtype`` lists them
DTYPE_CHOICES = ("bf16", "fp16", "fp32")
#: ``formats.checkpoint.KINDS``, for ``--kind``
KIND_CHOICES = ("sd1", "sd2", "sdxl")
#: ``tools.resize.MODES`` and ``tools.extract.MODES``
RANK_MODES = ("fixed", "threshold", "ratio", "quantile")
#: ``tools.convert.TARGETS``
CONVERT_TARGETS = ("kohya", "peft", "diffusers")
FOR_TOOLS = ("comfyui", "a1111", "lycoris", "diffusers")  # tools.convert.FOR_TOOLS, without importing torch


# --------------------------------------------------------------------------- merge
MERGE_EPILOG = """examples:
  higanbana merge sd15.safetensors sd15-style.safetensors --lora style.safetensors:0.8
  higanbana merge ./sdxl-base ./sdxl-merged --lora a.safetensors:0.7 --lora b.safetensors:0.5 --dtype fp16

Files apply in the order given, each on the result of the previous ones. BASE is a diffusers
folder or an original single-file .safetensors checkpoint; OUT has the same format.
"""


def parse_lora(spec: str) -> tuple[str, float]:
    """``FILE[:STRENGTH]``; a colon that is not followed by a number belongs to the path."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)  # nan/inf are numbers here: merge() refuses them by name
        except ValueError:
            pass
    return spec, 1.0


def _merge(args: argparse.Namespace) -> int:
    from ..tools.merge import merge

    report = merge(
        args.base,
        [parse_lora(s) for s in args.lora],
        args.out,
        dtype=args.dtype,
        overwrite=args.overwrite,
        unsafe_pickle=args.unsafe_pickle,
        kind=args.kind,
    )
    print(report.summary())
    return 0


def add_merge_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Define ``higanbana merge`` on an argparse sub-parsers object; ``func`` runs it."""
    p = subparsers.add_parser(
        "merge",
        help="merge adapter files into a whole SD checkpoint",
        description="Merge LoRA/LyCORIS files into an SD1.x/SD2.x/SDXL checkpoint (diffusers folder or single file).",
        epilog=MERGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("base", help="the base checkpoint: a diffusers folder or an original .safetensors file")
    p.add_argument("out", help="the merged checkpoint (same format as BASE)")
    p.add_argument(
        "--lora",
        action="append",
        required=True,
        metavar="FILE[:STRENGTH]",
        help="an adapter file and its strength (default 1); repeat to merge several, in order",
    )
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="output dtype (default: as the checkpoint)")
    p.add_argument("--kind", choices=KIND_CHOICES, default=None, help="the model kind, if not detected")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--unsafe-pickle", action="store_true", help="allow .pt/.ckpt/.bin adapter files (weights only)")
    p.set_defaults(func=_merge)
    return p


# --------------------------------------------------------------------------- extract
EXTRACT_EPILOG = """examples:
  higanbana extract base.safetensors tuned.safetensors out.safetensors --mode fixed --linear-param 32 --conv-param 16
  higanbana extract ./base-diffusers ./tuned-diffusers out.safetensors --mode quantile --linear-param 0.9 --tucker
  higanbana extract base tuned out.safetensors --mode fixed --linear-param 32 --randomized
"""


def _extract(args: argparse.Namespace) -> int:
    import torch

    from ..tools.extract import extract_models, format_report

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    reports = extract_models(
        args.base,
        args.tuned,
        args.output,
        kind=args.kind,
        text_encoders=not args.unet_only,
        overwrite=args.overwrite,
        mode=args.mode,
        linear_param=args.linear_param,
        conv_param=args.conv_param if args.conv_param is not None else args.linear_param,
        use_tucker=args.tucker,
        randomized=args.randomized,
        oversample=args.oversample,
        niter=args.niter,
        min_diff=args.min_diff,
        full_fallback=not args.no_full_fallback,
        dtype=dtype,
    )
    print(format_report(reports, max_rows=None if args.verbose else 20))
    print(f"\nwritten to {args.output}")
    return 0


def add_extract_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``higanbana extract BASE TUNED OUT``: the options map one-to-one onto :func:`higanbana.tools.extract.extract`."""
    p = subparsers.add_parser(
        "extract",
        help="extract a LoCon file from a fine-tuned model and its base (SVD of each weight difference)",
        description="Extract a LoCon file (SVD of each Linear/Conv weight difference) from a fine-tuned "
        "model and its base: local diffusers folders or single-file checkpoints.",
        epilog=EXTRACT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("base", help="the base model (diffusers folder or single file)")
    p.add_argument("tuned", help="the fine-tuned model, same architecture")
    p.add_argument("output", help="output .safetensors file")
    p.add_argument(
        "--mode", choices=RANK_MODES, default="fixed", help="how each layer's rank is chosen (default: fixed)"
    )
    p.add_argument("--linear-param", type=float, default=16, help="rank or mode value for Linear/1x1 conv (16)")
    p.add_argument("--conv-param", type=float, default=None, help="the same for convs with k>1 (default: linear)")
    p.add_argument("--tucker", action="store_true", help="store k>1 convs in the LoCon Tucker form")
    p.add_argument("--randomized", action="store_true", help="randomized SVD (torch.svd_lowrank; fixed mode)")
    p.add_argument("--oversample", type=int, default=8, help="randomized SVD: extra columns (8)")
    p.add_argument("--niter", type=int, default=2, help="randomized SVD: power iterations (2)")
    p.add_argument("--min-diff", type=float, default=0.0, help="skip layers with max|ΔW| at most this (0)")
    p.add_argument("--no-full-fallback", action="store_true", help="never store a layer as a full diff")
    p.add_argument("--unet-only", action="store_true", help="leave the text encoders out")
    p.add_argument("--kind", choices=KIND_CHOICES, help="the model kind, when it cannot be detected")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="output dtype (fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--verbose", action="store_true", help="list every layer in the report")
    p.set_defaults(func=_extract)
    return p


# --------------------------------------------------------------------------- resize
RESIZE_EPILOG = """\
examples:
  higanbana resize big.safetensors r8.safetensors --rank 8
  higanbana resize big.safetensors q.safetensors --mode quantile --param 0.9 --conv-param 0.8
  higanbana resize big.safetensors t.safetensors --mode ratio --param 0.05 --skip-other --dtype fp16

modes (on the singular values σ of each module's scaled ΔW = (α/r)·up·down):
  fixed      keep --param (= --rank) singular values
  threshold  keep those with σ > param
  ratio      keep those with σ > param·σ_max
  quantile   keep the leading ones whose running sum stays below param·Σσ (param ≥ 1 keeps all)
The new rank never exceeds the old one (asking for more is exact). New alpha = new rank
(scale 1) unless --keep-alpha-ratio keeps the old α/r.
"""


def _resize(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..tools.resize import format_reports, resize

    reports = resize(
        args.input,
        args.output,
        mode=args.mode,
        param=args.param,
        conv_param=args.conv_param,
        keep_alpha_ratio=args.keep_alpha_ratio,
        skip_other=args.skip_other,
        overwrite=args.overwrite,
        dtype=args.dtype,
        unsafe_pickle=args.unsafe_pickle,
    )
    print(json.dumps([asdict(r) for r in reports], indent=2) if args.json else format_reports(reports))
    return 0


def add_resize_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Define ``higanbana resize`` on an argparse sub-parsers object; ``func`` runs it."""
    p = subparsers.add_parser(
        "resize",
        help="change the rank of a LoRA/LoCon file by SVD",
        description="Change the rank of every LoRA/LoCon module of a file by truncated SVD of its update.",
        epilog=RESIZE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="LoRA/LoCon file (.safetensors; a pickle with --unsafe-pickle)")
    p.add_argument("output", help="output .safetensors file")
    p.add_argument("--mode", choices=RANK_MODES, default="fixed", help="how the new rank is chosen (default: fixed)")
    p.add_argument(
        "--param", "--rank", dest="param", type=float, required=True, help="rank (fixed) or the mode's value"
    )
    p.add_argument("--conv-param", type=float, default=None, help="the value for convs with k>1 (default: --param)")
    p.add_argument("--keep-alpha-ratio", action="store_true", help="keep the old α/r instead of alpha = new rank")
    p.add_argument("--skip-other", action="store_true", help="copy non-LoRA modules unchanged instead of refusing")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="output dtype (default: as the input)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--unsafe-pickle", action="store_true", help="allow reading a pickle input (weights only)")
    p.add_argument("--json", action="store_true", help="print the per-module report as JSON")
    p.set_defaults(func=_resize)
    return p


# --------------------------------------------------------------------------- convert
CONVERT_EPILOG = """\
examples:
  higanbana convert my_lora.safetensors peft_out/ --to peft --base ./sd15-diffusers
  higanbana convert my_lora.safetensors diffusers_out/ --to diffusers --base ./sdxl-diffusers
  higanbana convert peft_out/ back.safetensors --to kohya --base ./sd15-diffusers
  higanbana convert simpletuner.safetensors kohya.safetensors --prefix-map lycoris=lora_unet --dtype fp16
  higanbana convert my_lokr.safetensors for_comfy.safetensors --for comfyui
  higanbana convert my_lora.safetensors for_lycoris.safetensors --for lycoris --allow-lossy
  higanbana convert flux_lora.safetensors kohya_names.safetensors --layout original --base ./FLUX.1-dev

kohya names are lossy ('_' stands for '.'), so PEFT/diffusers output needs the model (--base).
Lossy steps (dropping modules the target cannot hold, DoRA into diffusers) need --allow-lossy;
anything the target would compute differently (OFT/BOFT/GLoRA/IA3 into PEFT, LoCon Tucker,
input-axis DoRA) is refused. --for TOOL rewrites the modules that TOOL fails on into an exactly
equivalent layout it reads, where one exists, and prints what `info` then says for TOOL.
"""


def parse_prefix_map(items: Sequence[str] | None) -> dict[str, str] | None:
    """``--prefix-map OLD=NEW …`` → ``{OLD: NEW}`` (None when not given)."""
    if not items:
        return None
    out = {}
    for item in items:
        old, eq, new = item.partition("=")
        if not eq or not old or not new:
            raise ConfigError(f"--prefix-map {item!r}: expected OLD=NEW, e.g. lycoris=lora_unet")
        out[old] = new
    return out


def _convert(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..tools.convert import convert, convert_layout, format_report

    if args.layout is not None:
        if args.base is None:
            raise ConfigError("--layout needs --base: the SD3/Flux model whose widths define the fused layers")
        done = convert_layout(
            args.src,
            args.dst,
            base=args.base,
            layout=args.layout,
            dtype=args.dtype,
            overwrite=args.overwrite,
            unsafe_pickle=args.unsafe_pickle,
        )
        print(
            json.dumps(done, indent=2)
            if args.json
            else f"{done['output']}: {done['modules']} modules, {args.layout} layout"
        )
        return 0
    report = convert(
        args.src,
        args.dst,
        to=args.to,
        dtype=args.dtype,
        allow_lossy=args.allow_lossy,
        prefix_map=parse_prefix_map(args.prefix_map),
        overwrite=args.overwrite,
        unsafe_pickle=args.unsafe_pickle,
        base=args.base,
        part=args.part,
        for_tool=args.for_tool,
    )
    print(json.dumps(asdict(report), indent=2) if args.json else format_report(report))
    return 0


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Define ``higanbana convert`` on an argparse sub-parsers object; ``func`` runs it."""
    p = subparsers.add_parser(
        "convert",
        help="convert between kohya/LyCORIS, PEFT and diffusers files",
        description="Convert an adapter file or folder between kohya/LyCORIS naming, PEFT and diffusers.",
        epilog=CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="adapter file, PEFT folder or diffusers file/folder")
    p.add_argument("dst", help="output .safetensors (kohya) or folder (peft, diffusers)")
    p.add_argument("--to", choices=CONVERT_TARGETS, default="kohya", help="target format (default: kohya)")
    p.add_argument("--base", default=None, help="the base model (diffusers folder or checkpoint) for module paths")
    p.add_argument(
        "--for",
        dest="for_tool",
        choices=FOR_TOOLS,
        default=None,
        help="rewrite into an equivalent layout this tool loads (where one exists; `info` says which)",
    )
    p.add_argument(
        "--layout",
        choices=("split", "original"),
        default=None,
        help="SD3/Flux: rewrite into diffusers' split names or kohya's fused ones (needs --base)",
    )
    p.add_argument("--part", default=None, help="PEFT: which part to write (lora_unet, lora_te, …; default the UNet)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="output dtype (default: as the source)")
    p.add_argument("--allow-lossy", action="store_true", help="allow dropping what the target cannot hold")
    p.add_argument("--prefix-map", nargs="+", metavar="OLD=NEW", help="rename module prefixes, e.g. lycoris=lora_unet")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--unsafe-pickle", action="store_true", help="allow reading a pickle source (weights only)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_convert)
    return p


def add_parsers(subparsers: Any) -> None:
    """The four tools, in the order ``higanbana --help`` lists them."""
    add_merge_parser(subparsers)
    add_extract_parser(subparsers)
    add_resize_parser(subparsers)
    add_convert_parser(subparsers)

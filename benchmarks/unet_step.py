#!/usr/bin/env python
"""Whole-UNet training step at the real SD1.5 / SDXL architecture: every algorithm, ours vs LyCORIS vs PEFT.

The UNet is diffusers' ``UNet2DConditionModel`` built from the SD1.5 or SDXL config written below
(random weights, seeded; nothing is downloaded). One step is the forward and backward pass of the
whole UNet on noisy latents that require grad (so the backward traverses the whole UNet in every
variant, the frozen one included) with an MSE loss against fixed noise. Rank 8, alpha 4 on the
attention and feed-forward Linears of every transformer block (``to_q``, ``to_k``, ``to_v``,
``to_out.0``, ``ff.net.0.proj``, ``ff.net.2``: the same layers for every library), or with
``--targets full`` on every layer our ``full`` preset adapts (convs included). Variants per
algorithm:

- ``frozen``: no adapter;
- ``ours auto`` / ``ours merged`` / ``ours bypass``: :class:`higanbana.network.AdapterNetwork`
  with ``forward_mode`` set to each mode the algorithms support;
- ``lycoris`` / ``lycoris bypass``: ``lycoris.create_lycoris`` with the matching algo, default and
  ``bypass_mode=True`` (not for ``full``, which has no bypass mode); ``--variants lycoris-bypass``
  runs only the latter (LyCORIS' default merges every weight per step: 4–5× on the convs);
- ``peft``: ``LoraConfig`` (``use_dora`` for DoRA), ``LoHaConfig``, ``LoKrConfig``, ``IA3Config``,
  ``OFTConfig``, ``BOFTConfig`` where PEFT has the algorithm.

Every variant runs in its own subprocess: it loads the UNet from one file the parent wrote
(memory-mapped, so the frozen weights' pages are shared between the subprocesses alive at once),
wraps it, and then runs steps on command. The parent keeps one algorithm's variants alive
together and interleaves them round by round (variant A round 1, B round 1, …, the order rotated
each round), so a change of machine load hits all of them alike. On CPU: one torch thread and
``OMP_NUM_THREADS=1``, CPU time of the step (``time.process_time``); on CUDA: wall time between
synchronisations. The report gives the median and the minimum step time, both as ratios to the
frozen UNet of the same group, and the peak RSS of each subprocess (and the CUDA peak allocated).

Run: ``.venv-bench/bin/python benchmarks/unet_step.py`` (SD1.5, 32×32 latents, batch 1 on CPU),
``--quick --algos lora,ia3`` for a smoke run in seconds, ``--profile boft:ours:auto`` for the
top ops of one step of one variant, ``--device cuda`` on a GPU machine (bf16, SD1.5 batch 4 at
64×64, SDXL batch 2 at 128×128 by default). ``--write docs/benchmarks.md`` puts the table under
"## Whole UNet step (issue 17)".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _machine.py beside this script, however it is loaded
from _machine import cpu_name, device_label
from higanbana.models.architectures import SD15_UNET, SDXL_UNET

RANK = 8
ALPHA = 4
SEED = 7
TOKENS = 77  # text tokens of the cross-attention context
SECTION = "## Whole UNet step (issue 17)"
PREFIX = "lora_unet"
#: the attention / feed-forward Linears of every transformer block (path suffixes)
ATTN_FF = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")

# --------------------------------------------------------------------------- the models
SD15, SDXL = SD15_UNET, SDXL_UNET  # the real architectures (higanbana.models.architectures)
#: --quick: the same layouts at a small width (every width a multiple of 40, so BOFT's block size
#: 10 and OFT's 8 fit as they do at full width), for a smoke run in seconds
QUICK: dict[str, dict[str, Any]] = {
    "sd15": {**SD15, "block_out_channels": [40, 80, 80, 80], "norm_num_groups": 8, "cross_attention_dim": 32},
    "sdxl": {
        **SDXL,
        "block_out_channels": [40, 80, 160],
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        "transformer_layers_per_block": [1, 1, 2],
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 32,
    },
}
ARCHS = {"sd15": SD15, "sdxl": SDXL}
ARCH_TITLES = {"sd15": "SD1.5", "sdxl": "SDXL"}


def unet_config(arch: str, quick: bool) -> dict[str, Any]:
    return dict(QUICK[arch] if quick else ARCHS[arch])


# --------------------------------------------------------------------------- the algorithms
@dataclass(frozen=True)
class Algo:
    """One table row: our algorithm and options, and the peers' equivalents."""

    name: str
    ours: str
    options: dict[str, Any]
    lycoris: str | None  # create_lycoris' algo (None: LyCORIS lacks it)
    lycoris_kwargs: dict[str, Any] = field(default_factory=dict)
    lycoris_bypass: bool = True  # LyCORIS has a bypass mode for it
    peft: Callable[[list[str]], Any] | None = None  # target names -> a PEFT config
    peft_mismatch: str = ""  # why PEFT's variant does not compute the same algorithm (‡)
    lycoris_bypass_mismatch: str = ""  # why LyCORIS' bypass mode does not (‡)
    target: float | None = None  # the CPU target: median step ≤ target × frozen


#: LyCORIS 4.1.3's OFT/BOFT bypass rotates the layer's whole output, bias included (``modules/diag_oft.py``,
#: ``functional/diag_oft.py`` ``_bypass_diff``): ``R·(W0·x + b0)``, where its merged mode (and ComfyUI, and ours in
#: both modes) compute ``R·W0·x + b0``
LYCORIS_BYPASS_BIAS = (
    "LyCORIS' bypass mode rotates the bias too, R·(W0·x + b0), where its merged mode, ComfyUI and ours compute "
    "R·W0·x + b0: a different output on every layer with a bias (to_out.0, the feed-forward, the convs)"
)


def _peft(kind: str, **kwargs: Any) -> Callable[[list[str]], Any]:
    def make(targets: list[str]) -> Any:
        import peft

        return getattr(peft, kind)(target_modules=targets, **kwargs)

    return make


OFT_BLOCK = RANK  # OFT: block size 8 (every SD width is a multiple of 8)
BOFT_BLOCK = 10  # BOFT needs out/b a power of two: 320·2^k channels take b = 10 (the nearest to 8)
PEFT_BOFT_BLOCK = 8  # PEFT's BOFT splits the input channels, and needs them divisible by b (768 is not by 10)
ALGOS: dict[str, Algo] = {
    a.name: a
    for a in (
        Algo(
            "lora",
            "lora",
            {"rank": RANK, "alpha": ALPHA},
            "lora",
            peft=_peft("LoraConfig", r=RANK, lora_alpha=ALPHA),
            target=1.05,
        ),
        Algo(
            "dora",
            "lora",
            {"rank": RANK, "alpha": ALPHA, "weight_decompose": True},
            "lora",
            {"dora_wd": True},
            peft=_peft("LoraConfig", r=RANK, lora_alpha=ALPHA, use_dora=True),
            peft_mismatch="PEFT detaches the norm ‖W0 + s·ΔW‖ from the gradient (DoRA paper §4.3), ours does not",
            target=1.15,
        ),
        Algo(
            "loha",
            "loha",
            {"rank": RANK, "alpha": ALPHA},
            "loha",
            peft=_peft("LoHaConfig", r=RANK, alpha=ALPHA),
            target=1.20,
        ),
        Algo(
            "lokr",
            "lokr",
            {"rank": RANK, "alpha": ALPHA, "factor": -1},
            "lokr",
            {"factor": -1},
            peft=_peft("LoKrConfig", r=RANK, alpha=ALPHA, decompose_factor=-1),
            target=1.05,
        ),
        Algo("ia3", "ia3", {}, "ia3", peft=_peft("IA3Config", feedforward_modules=[]), target=1.05),
        Algo("glora", "glora", {"rank": RANK, "alpha": ALPHA}, "glora", target=1.15),
        Algo(
            "oft",
            "oft",
            {"rank": OFT_BLOCK},
            "diag-oft",
            peft=_peft("OFTConfig", r=0, oft_block_size=OFT_BLOCK),
            peft_mismatch="PEFT rotates the input channels (Cayley–Neumann), ours and LyCORIS the output channels "
            "(exact Cayley): a different algorithm on the non-square layers",
            lycoris_bypass_mismatch=LYCORIS_BYPASS_BIAS,
            target=1.15,
        ),
        Algo(
            "boft",
            "boft",
            {"rank": BOFT_BLOCK},
            "boft",
            peft=_peft("BOFTConfig", boft_block_size=PEFT_BOFT_BLOCK, boft_n_butterfly_factor=1),
            peft_mismatch=f"PEFT runs one butterfly stage (it drops to one without its CUDA extension) of block size "
            f"{PEFT_BOFT_BLOCK} on the input channels (it refuses {BOFT_BLOCK}: 768 input channels of the "
            f"cross-attention); ours and LyCORIS log2(n)+1 stages of block size {BOFT_BLOCK} on the output channels",
            lycoris_bypass_mismatch=LYCORIS_BYPASS_BIAS,
            target=1.6,
        ),
        Algo("full", "full", {}, "full", lycoris_bypass=False, target=1.05),
        # the opt-in variant that trains the difference diff = W − W0 (one W0 + diff per layer and step)
        Algo("full-diff", "full", {"train_weight": False}, "full", lycoris_bypass=False, target=1.05),
    )
}
#: the lora_dim LyCORIS gets (its block size for OFT/BOFT)
LYCORIS_DIM = {"oft": OFT_BLOCK, "boft": BOFT_BLOCK}
OUR_MODES = ("auto", "merged", "bypass")
VARIANT_ORDER = ("frozen", *(f"ours:{m}" for m in OUR_MODES), "lycoris", "lycoris:bypass", "peft")
TITLES = {
    "frozen": "frozen",
    **{f"ours:{m}": f"ours {m}" for m in OUR_MODES},
    "lycoris": "lycoris",
    "lycoris:bypass": "lycoris bypass",
    "peft": "peft",
}


def variants_for(algo: Algo, peers: dict[str, str | None], families: set[str], modes: list[str]) -> list[str]:
    out = ["frozen"]
    if "ours" in families:
        out += [f"ours:{m}" for m in OUR_MODES if m in modes]
    if "lycoris" in families and peers.get("lycoris") and algo.lycoris:
        out.append("lycoris")
        if algo.lycoris_bypass:
            out.append("lycoris:bypass")
    elif "lycoris-bypass" in families and peers.get("lycoris") and algo.lycoris:
        # only LyCORIS' exact and faster mode (its default merges every weight per step), or its default
        # where it has no bypass (full)
        out.append("lycoris:bypass" if algo.lycoris_bypass else "lycoris")
    if "peft" in families and peers.get("peft") and algo.peft:
        out.append("peft")
    return out


def peer_versions() -> dict[str, str | None]:
    import importlib.util

    out: dict[str, str | None] = {}
    for key, module, dist in (("lycoris", "lycoris", "lycoris-lora"), ("peft", "peft", "peft")):
        if importlib.util.find_spec(module) is None:
            out[key] = None
            continue
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = "?"
    return out


# --------------------------------------------------------------------------- the child (one variant)
def rss_mib(field_name: str = "VmHWM") -> float:
    """``VmHWM`` (peak RSS) or ``VmRSS`` of this process in MiB (the frozen weights' shared pages included)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_unet(spec: dict[str, Any]):
    """The UNet on the meta device, its weights assigned from the parent's file (memory-mapped)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec["config"])
    state = torch.load(spec["weights"], mmap=True, weights_only=True, map_location="cpu")
    unet.load_state_dict(state, assign=True, strict=True)
    for name, buf in unet.named_buffers():
        if buf.is_meta:
            raise RuntimeError(f"buffer {name} has no value after loading")
    unet.requires_grad_(False)
    dtype = DTYPES[spec["dtype"]]
    device = torch.device(spec["device"])
    if dtype != torch.float32 or device.type != "cpu":
        unet.to(device=device, dtype=dtype)
    return unet


def target_paths(unet, targets: str) -> list[str]:
    """The module paths every library adapts (ours decides them for ``full``; the peers get the list)."""
    from torch import nn

    if targets == "attn-ff":
        suffixes = tuple("." + s for s in ATTN_FF)
        return [p for p, m in unet.named_modules() if isinstance(m, nn.Linear) and p.endswith(suffixes)]
    from higanbana.network import NetworkConfig, Part, plan_modules

    records = plan_modules([Part(PREFIX, unet, kind="unet")], NetworkConfig.load("full").with_options("lora", rank=1))
    return [r.path for r in records]


def wrap_ours(unet, algo: Algo, mode: str, paths: list[str]) -> tuple[list, dict[str, Any]]:
    from higanbana.network import AdapterNetwork, Part

    wanted = set(paths)
    net = AdapterNetwork(
        [Part(PREFIX, unet, kind="unet")],
        algo.ours,
        select=lambda path, _m: path in wanted,
        forward_mode=mode,
        **algo.options,
    )
    net.to(next(unet.parameters()).device)
    net.attach()
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    return params, {"modules": len(net), "network": net}


def wrap_lycoris(unet, algo: Algo, bypass: bool, paths: list[str]) -> tuple[list, dict[str, Any]]:
    import logging

    import lycoris
    import lycoris.wrapper as lw

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        lycoris.logging.logger.setLevel(logging.ERROR)
    lw.PRESET["unet-step-bench"] = {  # exactly these layers
        "enable_conv": True,
        "target_module": [],
        "target_name": paths,
        "module_algo_map": {},
        "name_algo_map": {},
        "use_fnmatch": True,
        "exclude_name": [],
        "lora_prefix": "lycoris",
    }
    dim = LYCORIS_DIM.get(algo.name, RANK)
    kwargs: dict[str, Any] = {"algo": algo.lycoris, "preset": "unet-step-bench", **algo.lycoris_kwargs}
    if bypass:
        kwargs["bypass_mode"] = True
    net = lycoris.create_lycoris(unet, 1.0, linear_dim=dim, linear_alpha=ALPHA, **kwargs)
    net.to(next(unet.parameters()).device)
    net.apply_to()
    net.train()
    base = {id(p) for p in unet.parameters()}
    params = [p for p in net.parameters() if id(p) not in base]
    for p in params:
        p.requires_grad_(True)
    info: dict[str, Any] = {"modules": len(net.loras)}
    if bypass and algo.lycoris_bypass_mismatch:
        info["mismatch"] = algo.lycoris_bypass_mismatch
    return params, info


def wrap_peft(unet, algo: Algo, paths: list[str]) -> tuple[list, dict[str, Any]]:
    import warnings

    import peft

    assert algo.peft is not None
    base = {id(p) for p in unet.parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.inject_adapter_in_model(algo.peft(paths), unet)
    params = [p for p in unet.parameters() if id(p) not in base]
    for p in params:
        p.requires_grad_(True)
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = sum(1 for m in unet.modules() if isinstance(m, BaseTunerLayer))
    return params, {"modules": modules, "mismatch": algo.peft_mismatch}


def make_inputs(spec: dict[str, Any], unet) -> tuple[Any, dict[str, Any], Any]:
    """Noisy latents (requiring grad), the UNet's other inputs, and the MSE target (fixed, seeded)."""
    import torch

    cfg = spec["config"]
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    b, side = spec["batch"], spec["latents"]
    gen = torch.Generator().manual_seed(SEED)

    def randn(*shape: int) -> Any:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    x = randn(b, cfg["in_channels"], side, side).requires_grad_(True)
    kwargs: dict[str, Any] = {
        "timestep": torch.full((b,), 500, device=device, dtype=torch.long),
        "encoder_hidden_states": randn(b, TOKENS, cfg["cross_attention_dim"]),
    }
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        px = 8 * side
        ids = torch.tensor([[px, px, 0, 0, px, px]], device=device, dtype=dtype).repeat(b, 1)
        kwargs["added_cond_kwargs"] = {"text_embeds": randn(b, pooled), "time_ids": ids}
    return x, kwargs, randn(b, cfg["out_channels"], side, side)


def record_auto(network) -> Callable[[], dict[str, dict[str, int]]]:
    """Count what each adapter's ``use_bypass`` answers during the next step (ours ``auto``)."""
    picks: dict[str, Counter] = {}
    patched = []
    for name, adapter in network.adapters.items():
        original = adapter.use_bypass
        path = network.records[name].path
        kind = next((s for s in ATTN_FF if path.endswith("." + s)), type(adapter.layer).__name__)

        def use_bypass(x, _original=original, _kind=kind):
            answer = _original(x)
            picks.setdefault(_kind, Counter())["bypass" if answer else "merged"] += 1
            return answer

        adapter.use_bypass = use_bypass
        patched.append(adapter)

    def done() -> dict[str, dict[str, int]]:
        for adapter in patched:
            del adapter.use_bypass  # back to the class's method
        return {k: dict(v) for k, v in picks.items()}

    return done


def child_main(spec: dict[str, Any]) -> None:
    """One variant: load, wrap, say READY, then run commands from stdin (one JSON reply per line)."""
    import torch
    import torch.nn.functional as F

    device = spec["device"]
    on_cuda = device.startswith("cuda")
    if not on_cuda or spec["threads"]:
        torch.set_num_threads(spec["threads"] or 1)
    # the same imports in every child, so the peak RSS compares what the variants allocate
    import diffusers  # noqa: F401

    import higanbana.network  # noqa: F401

    for module in ("peft", "lycoris"):
        with contextlib.suppress(ImportError):
            __import__(module)
    out = sys.stdout

    def reply(kind: str, payload: dict[str, Any]) -> None:
        out.write(f"@@{kind} {json.dumps(payload)}\n")
        out.flush()

    sys.stdout = sys.stderr  # whatever a library prints must not mix with the replies
    t0 = time.perf_counter()
    unet = load_unet(spec)
    paths = target_paths(unet, spec["targets"])
    algo = ALGOS[spec["algo"]]
    variant = spec["variant"]
    torch.manual_seed(SEED + 1)
    info: dict[str, Any] = {"modules": 0}
    params: list[torch.Tensor] = []
    if variant.startswith("ours:"):
        params, info = wrap_ours(unet, algo, variant.split(":", 1)[1], paths)
    elif variant.startswith("lycoris"):
        params, info = wrap_lycoris(unet, algo, variant == "lycoris:bypass", paths)
    elif variant == "peft":
        params, info = wrap_peft(unet, algo, paths)
    network = info.pop("network", None)
    unet.train()
    x, kwargs, target = make_inputs(spec, unet)

    def step() -> tuple[float, float]:
        x.grad = None
        for p in params:
            p.grad = None
        if on_cuda:
            torch.cuda.synchronize()
        cpu, wall = time.process_time(), time.perf_counter()
        pred = unet(x, **kwargs, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        if on_cuda:
            torch.cuda.synchronize()
        return time.process_time() - cpu, time.perf_counter() - wall

    reply(
        "READY",
        {
            **info,
            "targets": len(paths),
            "trainable": sum(p.numel() for p in params),
            "build_s": time.perf_counter() - t0,
            "threads": torch.get_num_threads(),
        },
    )
    steps = 0
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "step":
            done = record_auto(network) if steps == 0 and variant == "ours:auto" else None
            cpu, wall = step()
            payload: dict[str, Any] = {"cpu_s": cpu, "wall_s": wall}
            if steps == 0:  # the first step: which trainable tensors got no gradient (†)
                payload["no_grad"] = sum(p.numel() for p in params if p.grad is None)
                if x.grad is None:
                    payload["error"] = "the input got no gradient"
            if done is not None:
                payload["auto"] = done()
            steps += 1
            if on_cuda:
                if arg == "reset":
                    torch.cuda.reset_peak_memory_stats()
                if spec["release_cache"]:
                    torch.cuda.empty_cache()
            reply("STEP", payload)
        elif command == "stats":
            stats = {"peak_rss_mib": rss_mib("VmHWM"), "rss_mib": rss_mib("VmRSS")}
            if on_cuda:
                stats["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            reply("STATS", stats)
        elif command == "profile":
            reply("PROFILE", {"text": profile_step(step, int(arg or 25))})
        elif command == "quit":
            break


def profile_step(step: Callable[[], tuple[float, float]], top: int) -> str:
    """torch.profiler's ops and cProfile's Python functions of one step, by self time."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        cpu, _wall = step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    profiler = cProfile.Profile()
    profiler.enable()
    cpu2, _ = step()
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    lines = stream.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return (
        f"step under torch.profiler: {cpu:.2f} s CPU\n{table}\n"
        f"step under cProfile: {cpu2:.2f} s CPU (Python functions by own time)\n" + "\n".join(lines[start:])
    )


# --------------------------------------------------------------------------- the parent
DTYPES: dict[str, Any] = {}


def _init_dtypes() -> None:
    import torch

    DTYPES.update({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16})


class Child:
    """One variant's subprocess, driven line by line."""

    def __init__(self, key: str, spec: dict[str, Any], env: dict[str, str]) -> None:
        self.key = key
        self.log: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(Path(__file__).resolve()), "--child", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )

    def read(self, kind: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(f"@@{kind} "):
                return json.loads(line[len(kind) + 3 :])
        raise RuntimeError(self.exit_text())

    def exit_text(self) -> str:
        code = self.proc.wait()
        if code == -9:
            return "killed by SIGKILL (the kernel's out-of-memory killer, if nobody else)"
        return f"exit {code}: {self.tail()}"

    def ask(self, command: str, kind: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError(self.exit_text()) from None
        return self.read(kind)

    def tail(self) -> str:
        self.log.seek(0)
        lines = [line for line in self.log.read().splitlines() if line.strip()]
        return " | ".join(lines[-3:])[-400:]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@dataclass
class Result:
    algo: str
    variant: str
    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    no_grad: int = 0
    auto: dict[str, dict[str, int]] | None = None
    error: str = ""
    frozen: Result | None = None  # the frozen UNet of the same group

    @property
    def times(self) -> list[float]:
        return self.cpu if self.info.get("clock") == "cpu" else self.wall

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def mismatch(self) -> str:
        return str(self.info.get("mismatch", ""))

    @property
    def comparable(self) -> bool:
        return bool(self.times) and not self.no_grad and not self.mismatch and not self.error

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "frozen"}
        if self.times and self.frozen is not None and self.frozen.times:
            out["ratio_median"] = self.median / self.frozen.median
            out["ratio_min"] = self.best / self.frozen.best
        return out


def child_env(args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.device == "cpu":
        threads = str(args.threads or 1)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    return env


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_group(args: argparse.Namespace, algo: str, variants: list[str], base_spec: dict[str, Any]) -> list[Result]:
    """Start the variants' children, warm them up, then time ``rounds`` interleaved rounds."""
    env = child_env(args)
    clock = "cpu" if args.device == "cpu" else "wall"
    results = [Result(algo, v) for v in variants]
    alive: list[tuple[Result, Child]] = []
    try:
        # started together (their imports and builds overlap; nothing is timed yet), then read in order
        children = [Child(r.variant, {**base_spec, "algo": algo, "variant": r.variant}, env) for r in results]
        for r, child in zip(results, children, strict=True):
            try:
                r.info = {**child.read("READY"), "clock": clock}
            except RuntimeError as exc:
                r.error = f"build failed ({exc})"
                log(f"[{algo}] {TITLES[r.variant]}: {r.error}")
                child.close()
                continue
            alive.append((r, child))
            log(
                f"[{algo}] {TITLES[r.variant]}: built in {r.info['build_s']:.1f} s, "
                f"{r.info.get('modules', 0)} modules, {r.info['trainable']:,} trainable"
            )
        for w in range(args.warmup):
            for r, child in list(alive):
                try:
                    out = child.ask("step reset" if w == args.warmup - 1 else "step", "STEP")
                except RuntimeError as exc:
                    r.error = f"step failed ({exc})"
                    log(f"[{algo}] {TITLES[r.variant]}: {r.error}")
                    alive.remove((r, child))
                    child.close()
                    continue
                if w == 0:
                    r.no_grad = out.get("no_grad", 0)
                    r.auto = out.get("auto")
                    r.error = out.get("error", "")
                log(f"[{algo}] warm-up {w + 1}/{args.warmup} {TITLES[r.variant]}: {out[clock + '_s']:.2f} s")
        for k in range(args.rounds):
            shift = k % max(len(alive), 1)
            for r, child in alive[shift:] + alive[:shift]:
                if r.error.startswith("step failed"):
                    continue
                try:
                    out = child.ask("step", "STEP")
                except RuntimeError as exc:
                    r.error = f"step failed ({exc})"
                    log(f"[{algo}] {TITLES[r.variant]}: {r.error}")
                    continue
                r.cpu.append(out["cpu_s"])
                r.wall.append(out["wall_s"])
                log(f"[{algo}] round {k + 1}/{args.rounds} {TITLES[r.variant]}: {out[clock + '_s']:.2f} s")
        for r, child in alive:
            with contextlib.suppress(RuntimeError):
                r.stats = child.ask("stats", "STATS")
    finally:
        for _r, child in alive:
            child.close()
    frozen = next((r for r in results if r.variant == "frozen"), None)
    for r in results:
        r.frozen = frozen
    return results


def run_profile(args: argparse.Namespace, base_spec: dict[str, Any]) -> None:
    """``--profile ALGO:VARIANT,…``: the top ops and Python functions of one step of each."""
    for item in args.profile.split(","):
        algo, _, variant = item.strip().partition(":")
        variant = variant or "ours:auto"
        if algo not in ALGOS or variant not in TITLES:
            raise SystemExit(
                f"--profile {item!r}: want ALGO:VARIANT with ALGO in {list(ALGOS)}, VARIANT in {VARIANT_ORDER}"
            )
        child = Child(variant, {**base_spec, "algo": algo, "variant": variant}, child_env(args))
        try:
            child.read("READY")
            for _ in range(max(args.warmup, 1)):
                child.ask("step", "STEP")
            text = child.ask(f"profile {args.profile_top}", "PROFILE")["text"]
        finally:
            child.close()
        print(f"\n===== {algo} / {TITLES[variant]} =====\n{text}")


def save_unet(args: argparse.Namespace, config: dict[str, Any], path: Path) -> dict[str, int]:
    """Build the UNet from its config (seeded, random weights) and write its state dict for the children."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(**config)
    numel = sum(p.numel() for p in unet.parameters())
    torch.save(unet.state_dict(), path)
    del unet
    return {"parameters": numel}


# --------------------------------------------------------------------------- reporting
def ratio(v: float, frozen: float) -> str:
    return f"{v / frozen:.2f}×"


def mark(r: Result) -> str:
    return ("†" if r.no_grad else "") + ("‡" if r.mismatch else "")


def auto_summary(r: Result | None, by_kind: bool = False) -> str:
    """What ours ``auto`` ran: layer counts per mode (``by_kind``: per layer kind too)."""
    if r is None or not r.auto:
        return ""
    if by_kind:
        return "; ".join(
            f"{kind} " + ", ".join(f"{m} {n}" for m, n in sorted(counts.items())) for kind, counts in r.auto.items()
        )
    totals: Counter = Counter()
    for counts in r.auto.values():
        totals.update(counts)
    if len(totals) == 1:
        return f"{next(iter(totals))} (all {sum(totals.values())})"
    return ", ".join(f"{m} {n}" for m, n in sorted(totals.items()))


def fastest(group: list[Result]) -> Result | None:
    """The comparable variant with the lowest median ratio to its own frozen UNet."""
    candidates = [r for r in group if r.variant != "frozen" and r.comparable and r.frozen and r.frozen.times]
    return min(candidates, key=lambda r: r.median / r.frozen.median) if candidates else None


def summary_table(groups: dict[str, list[Result]], present: list[str]) -> list[str]:
    head = ["algorithm", "target", "frozen s", *[TITLES[v] for v in present], "auto ran"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for algo, group in groups.items():
        by = {r.variant: r for r in group}
        frozen = by.get("frozen")
        if frozen is None or not frozen.times:
            continue
        best = fastest(group)
        target = ALGOS[algo].target
        cells = [algo, f"≤ {target:.2f}×" if target else "", f"{frozen.median:.2f}"]
        for v in present:
            r = by.get(v)
            if r is None:
                cells.append("")
            elif not r.times:
                cells.append("failed" if r.error else "")
            else:
                ref = r.frozen or frozen
                text = f"{ratio(r.median, ref.median)} ({ratio(r.best, ref.best)})"
                cells.append((f"**{text}**" if r is best else text) + mark(r))
        cells.append(auto_summary(by.get("ours:auto")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def detail_table(groups: dict[str, list[Result]], device: str) -> list[str]:
    mem = "CUDA peak MiB" if device.startswith("cuda") else "peak RSS MiB"
    head = ["algorithm", "variant", "median s", "min s", "median ratio", "min ratio", mem, "Δ vs frozen MiB"]
    head += ["modules", "trainable"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    key = "cuda_peak_mib" if device.startswith("cuda") else "peak_rss_mib"
    for algo, group in groups.items():
        for r in group:
            frozen = r.frozen
            cells = [algo, TITLES[r.variant] + mark(r)]
            if r.times and frozen is not None and frozen.times:
                cells += [
                    f"{r.median:.3f}",
                    f"{r.best:.3f}",
                    ratio(r.median, frozen.median),
                    ratio(r.best, frozen.best),
                ]
            else:
                cells += ["failed" if r.error else "", "", "", ""]
            peak = r.stats.get(key)
            base = frozen.stats.get(key) if frozen is not None else None
            cells.append(f"{peak:,.0f}" if peak is not None else "")
            cells.append(f"{peak - base:+,.0f}" if peak is not None and base is not None else "")
            cells += [str(r.info.get("modules", "")), f"{r.info.get('trainable', 0):,}" if r.info else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def goal_lines(groups: dict[str, list[Result]]) -> list[str]:
    lines = []
    for algo, group in groups.items():
        by = {r.variant: r for r in group}
        frozen, auto = by.get("frozen"), by.get("ours:auto")
        if frozen is None or auto is None or not frozen.times or not auto.times:
            continue
        target = ALGOS[algo].target

        def rel(r: Result, frozen: Result = frozen) -> float:
            return r.median / (r.frozen or frozen).median

        got = rel(auto)
        ours = [by[v] for v in by if v.startswith("ours:") and by[v].times]
        best_ours = min(ours, key=rel)
        best = fastest(group)
        verdict = "meets" if target is None or got <= target else f"misses by {got - target:.2f}"
        ref = auto.frozen or frozen
        text = f"{algo}: ours auto {got:.2f}× (min {auto.best / ref.best:.2f}×), target ≤ {target:.2f}×: {verdict}"
        if best_ours is not auto:
            text += f"; fastest of ours: {TITLES[best_ours.variant]} {rel(best_ours):.2f}×"
        if best is not None and not best.variant.startswith("ours:"):
            text += f"; fastest overall: {TITLES[best.variant]} {rel(best):.2f}×"
        lines.append(text)
    return lines


def report(
    args: argparse.Namespace,
    groups: dict[str, list[Result]],
    notes: list[str],
    peers: dict[str, str | None],
    model: dict[str, Any],
    wall_s: float,
) -> list[str]:
    import diffusers
    import torch

    present = [v for v in VARIANT_ORDER if v != "frozen" and any(r.variant == v for g in groups.values() for r in g)]
    threads = next((r.info.get("threads") for g in groups.values() for r in g if r.info), None)
    peer_text = ", ".join(f"{k} {v}" if v else f"{k} not installed" for k, v in peers.items())
    clock = "CPU time (`time.process_time`)" if args.device == "cpu" else "wall time between CUDA synchronisations"
    arch = ARCH_TITLES[args.arch] + (" (--quick: small width)" if args.quick else "")
    targets = (
        "the attention/feed-forward Linears (" + ", ".join(ATTN_FF) + ")"
        if args.targets == "attn-ff"
        else "every layer of our `full` preset (Linears and convs)"
    )
    lines = [
        f"### {ARCH_TITLES[args.arch]}{' quick' if args.quick else ''}, {args.targets}, {args.device}, "
        f"{args.latents}×{args.latents} latents, batch {args.batch}{f' ({args.tag})' if args.tag else ''}",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical cores, device {device_label(args.device)}, "
        f"{threads} torch thread(s), {args.dtype}, Python {platform.python_version()}",
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, {peer_text}",
        f"- command: `{' '.join(['python', *map(shlex.quote, sys.argv)])}`",
        f"- model: {arch} UNet2DConditionModel, {model['parameters']:,} parameters (random weights, seed {SEED}); "
        f"adapted: {targets}, {model.get('targets', '?')} layers; rank {RANK}, alpha {ALPHA} (OFT block size "
        f"{OFT_BLOCK}, BOFT block size {BOFT_BLOCK}; LoKr factor -1; IA3 and full have no rank)",
        f"- step: forward + backward of the UNet on noisy latents that require grad, MSE loss; {clock}; "
        f"{args.warmup} warm-up step(s), then {args.rounds} interleaved rounds; each variant in its own subprocess"
        + (
            f"; --live {args.live}: at most {args.live} adapter variant(s) alive at a time, each batch with its "
            "own frozen UNet, the reference of its ratios"
            if args.live
            else ""
        ),
        f"- wall time of the run: {wall_s / 60:.1f} min",
        "",
        "Median step time ÷ the frozen UNet's median (in brackets: min ÷ min), both measured in the same "
        "interleaved rounds; **bold** is the fastest variant of the row. † some trainable tensors got no "
        "gradient; ‡ the peer computes a different algorithm (both left out of the comparison). "
        "`auto ran`: how many adapted layers ours `auto` ran in each mode (per layer kind in the notes).",
        "",
        *summary_table(groups, present),
        "",
        "Where ours `auto` stands against the issue's CPU targets:",
        "",
        *[f"- {line}" for line in goal_lines(groups)],
        "",
        "<details><summary>every variant: seconds per step, ratios, memory</summary>",
        "",
        "Peak RSS is the subprocess' high-water mark; it includes the frozen weights' pages, which the "
        "subprocesses alive at once share (memory-mapped from one file). Δ: against the frozen UNet of the row.",
        "",
        *detail_table(groups, args.device),
        "",
        "</details>",
        "",
    ]
    cell_notes = []
    for group in groups.values():
        for r in group:
            where = f"{r.algo} / {TITLES[r.variant]}"
            if r.error:
                cell_notes.append(f"{where}: {r.error}")
            if r.no_grad:
                cell_notes.append(
                    f"{where} †: {r.no_grad:,} of {r.info.get('trainable', 0):,} trainable elements got no gradient"
                )
            if r.mismatch:
                cell_notes.append(f"{where} ‡: {r.mismatch}")
            if r.auto and len({m for counts in r.auto.values() for m in counts}) > 1:
                cell_notes.append(f"{where} ran, per layer kind: {auto_summary(r, by_kind=True)}")
            modules = r.info.get("modules")
            if r.variant != "frozen" and modules is not None and modules != r.info.get("targets"):
                cell_notes.append(f"{where}: adapts {modules} modules of {r.info.get('targets')}")
    notes = [*cell_notes, *notes]
    if notes:
        lines += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    return lines


def block_markers(args: argparse.Namespace) -> tuple[str, str]:
    key = f"{args.arch}{'-quick' if args.quick else ''}-{args.targets}-{args.device.split(':')[0]}"
    if getattr(args, "tag", ""):
        key += f"-{args.tag}"
    return f"<!-- unet-step:{key}:start -->", f"<!-- unet-step:{key}:end -->"


def write_section(path: Path, args: argparse.Namespace, block: list[str]) -> None:
    """Put ``block`` under the "Whole UNet step" section (replacing the same configuration's block)."""
    start, end = block_markers(args)
    body = "\n".join([start, *block, end])
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        if SECTION not in text:
            intro = (
                "`benchmarks/unet_step.py`: one training step (forward + backward) of the whole UNet at the "
                "real SD1.5 / SDXL architecture (random weights), every algorithm, ours in each forward mode "
                "against LyCORIS and PEFT; see the script's docstring for the method."
            )
            text = text.rstrip() + f"\n\n{SECTION}\n\n{intro}\n"
        head, rest = text.split(SECTION, 1)
        nxt = rest.find("\n## ")
        if nxt < 0:
            text = head + SECTION + rest.rstrip() + "\n\n" + body + "\n"
        else:
            text = head + SECTION + rest[:nxt].rstrip() + "\n\n" + body + "\n" + rest[nxt:]
    path.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="sd15")
    p.add_argument("--latents", type=int, default=None, help="latent side (default: CPU 32; CUDA sd15 64, sdxl 128)")
    p.add_argument("--batch", type=int, default=None, help="batch (default: CPU 1; CUDA sd15 4, sdxl 2)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: CPU sd15 5, sdxl 3; CUDA 10)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default: CPU 1, CUDA 3)")
    p.add_argument("--algos", default=",".join(ALGOS), help=f"comma-separated, from {', '.join(ALGOS)}")
    p.add_argument(
        "--variants",
        default="ours,lycoris,peft",
        help="families to run besides frozen: ours,lycoris,peft (lycoris-bypass: only LyCORIS' bypass mode)",
    )
    p.add_argument("--modes", default=",".join(OUR_MODES), help="our forward modes to run (default: all)")
    p.add_argument("--targets", choices=("attn-ff", "full"), default="attn-ff", help="attn-ff, or our full preset")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    p.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="UNet dtype (default: CPU fp32, CUDA bf16)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads per subprocess (default: 1 on CPU)")
    p.add_argument(
        "--live", type=int, default=0, help="at most this many adapter variants alive at once (0: a whole row)"
    )
    p.add_argument("--keep-cache", action="store_true", help="CUDA: keep each child's cached blocks between steps")
    p.add_argument("--quick", action="store_true", help="a small-width model of the same layout (seconds)")
    p.add_argument("--tag", default="", help="a label for this run: its own block under --write (and heading)")
    p.add_argument("--json", type=Path, default=None, help="write every measurement to this JSON file")
    p.add_argument("--write", type=Path, default=None, help=f"put the table under {SECTION!r} of this markdown file")
    p.add_argument("--workdir", type=Path, default=None, help="where to write the UNet's weights (default: a temp dir)")
    p.add_argument("--profile", default="", help="ALGO:VARIANT[,…], e.g. boft:ours:auto: profile one step, no table")
    p.add_argument("--profile-top", type=int, default=25, help="rows of each profile table")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    cuda = args.device.startswith("cuda")
    if args.latents is None:
        args.latents = (64 if args.arch == "sd15" else 128) if cuda else 32
    if args.batch is None:
        args.batch = (4 if args.arch == "sd15" else 2) if cuda else 1
    if args.rounds is None:
        args.rounds = 10 if cuda else (5 if args.arch == "sd15" else 3)
    if args.warmup is None:
        args.warmup = 3 if cuda else 1
    if args.dtype is None:
        args.dtype = "bf16" if cuda else "fp32"
    if args.quick:
        args.latents = min(args.latents, 16)
    if args.rounds < 1 or args.warmup < 1:
        p.error("--rounds and --warmup need at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _init_dtypes()
    if args.child:
        child_main(json.loads(args.child))
        return 0
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    unknown = [a for a in algos if a not in ALGOS]
    if unknown:
        raise SystemExit(f"unknown algorithm(s) {unknown}; choose from {list(ALGOS)}")
    families = {f.strip() for f in args.variants.split(",") if f.strip()}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - set(OUR_MODES) or set(families) - {"ours", "lycoris", "lycoris-bypass", "peft"}:
        raise SystemExit(f"--modes takes {', '.join(OUR_MODES)}; --variants takes ours, lycoris, lycoris-bypass, peft")
    peers = peer_versions()
    notes = [f"{k}: not installed in {sys.executable}, its columns are empty" for k, v in peers.items() if not v]
    for n in notes:
        log(f"note: {n}")
    config = unet_config(args.arch, args.quick)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        root = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="unet-step-")))
        root.mkdir(parents=True, exist_ok=True)
        weights = root / f"unet-{args.arch}{'-quick' if args.quick else ''}-seed{SEED}.pt"
        t0 = time.perf_counter()
        model = save_unet(args, config, weights)
        log(f"UNet ({model['parameters']:,} parameters) written in {time.perf_counter() - t0:.1f} s")
        base_spec = {
            "config": config,
            "weights": str(weights),
            "device": args.device,
            "dtype": args.dtype,
            "threads": args.threads,
            "batch": args.batch,
            "latents": args.latents,
            "targets": args.targets,
            "release_cache": not args.keep_cache,
        }
        if args.profile:
            run_profile(args, base_spec)
            return 0
        groups: dict[str, list[Result]] = {}
        for algo in algos:
            variants = variants_for(ALGOS[algo], peers, families, modes)
            adapters = variants[1:]
            size = args.live if args.live > 0 else max(len(adapters), 1)
            groups[algo] = []
            for i in range(0, max(len(adapters), 1), size):
                chunk = ["frozen", *adapters[i : i + size]]
                results = run_group(args, algo, chunk, base_spec)
                if i > 0:  # later chunks' frozen rows serve only their own chunk
                    results = [r for r in results if r.variant != "frozen"]
                groups[algo] += results
            slow = [f"{TITLES[r.variant]} {r.median:.0f} s" for r in groups[algo] if r.times and r.median > 40]
            if slow:
                notes.append(f"{algo}: steps over 40 s: {', '.join(slow)}")
            targets = next((r.info.get("targets") for r in groups[algo] if r.info), None)
            if targets:
                model["targets"] = targets
    wall = time.perf_counter() - started
    lines = report(args, groups, notes, peers, model, wall)
    print("\n".join(lines))
    if args.json:
        data = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "peers": peers,
            "model": model,
            "wall_s": wall,
            "results": {a: [r.to_json() for r in g] for a, g in groups.items()},
        }
        args.json.write_text(json.dumps(data, indent=1), encoding="utf-8")
        log(f"wrote {args.json}")
    if args.write:
        write_section(args.write, args, lines)
        log(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

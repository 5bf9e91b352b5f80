#!/usr/bin/env python
"""Whole-training-step benchmark: our trainer against the diffusers LoRA training loop's shape.

On a tiny or small SD1-shaped model (random weights, saved as a diffusers folder; no downloads) and
a few synthetic 64×64 images in a kohya folder ``10_bench``, it measures seconds per optimizer step
and peak memory of

- ``frozen``: the bare loop with no adapter and no optimizer — load the batch, VAE-encode, encode the
  captions, noise, UNet forward and backward with respect to the noisy input (so the backward pass
  traverses the whole UNet, as it must when adapters sit inside it);
- ``frozen (cached latents)``: the same with the VAE's latent distributions encoded once up front;
- ``diffusers-peft-lora``: the shape of diffusers' ``examples/text_to_image/train_text_to_image_lora.py``
  (PEFT ``LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=[to_k, to_q,
  to_v, to_out.0])`` via ``unet.add_adapter``, AdamW, grad clipping at 1.0, constant LR); needs peft;
- ``higanbana-lora``: our ``train()`` with LoRA rank 4 / alpha 4 on the ``attn-only`` preset (the
  same 4 projections of every UNet attention, nothing else), ``data.cache_latents = "none"``;
- ``higanbana-lora (cached latents)``, ``higanbana-lokr (cached latents)``,
  ``higanbana-loha (cached latents)``: our default ``cache_latents = "memory"``;
- ``diffusers-peft-lora (cached latents)``: the example's loop on latents encoded once, to compare
  with ours at the same work per step;
- ``kohya-lora (cached latents)``: the shape of kohya sd-scripts' ``train_network.py`` step (its own
  ``networks.lora`` LoRA, rank 4 / alpha 4, on every Linear and 1×1 conv of the UNet's
  ``Transformer2DModel`` blocks; AdamW, clipping at 1.0), run with ``--kohya-python`` (a venv with
  sd-scripts' pinned diffusers) and ``--sd-scripts`` (a checkout); ``kohya-frozen (cached
  latents)`` is the frozen loop in that venv, its baseline; ``higanbana-lora transformer (cached
  latents)`` is ours on the same layers (preset ``unet-transformer-only``).

``--model sd15`` is the real SD1.5 architecture (UNet, CLIP ViT-L text encoder and VAE at their real
widths, random weights: ``scripts/kohya_fixture.py``), 256×256 px (32×32 latents), batch 1.
``--gradient-checkpointing`` turns it on in every loop and in ours.

Every configuration runs in a fresh subprocess (so the peak RSS is its own and imports do not leak
between configurations), ``--repeats`` times, interleaved; the table gives the median. For the
hand-written loops the steps are timed directly after ``--warmup`` steps. Our trainer is timed from
the outside: ``(time of a run of N2 steps − time of a run of N1 steps) / (N2 − N1)`` in the same
process (after one discarded warm-up run), which removes model loading, the latent cache, the final
save and other set-up costs. Timings are reported as ratios against the frozen loop of the same run.

On CPU the times are CPU time (``time.process_time``) of the one-thread child; on CUDA wall time
after a synchronize.

Run: ``.venv-bench/bin/python benchmarks/train_step.py`` (a few minutes on 2 cores), or
``--model tiny --repeats 1`` for a quick check; ``--device cuda`` on a GPU machine. The real scale:
``--model sd15 --threads 1 --kohya-python .venv-kohya/bin/python --sd-scripts /tmp/sd-scripts``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _machine.py beside this script, however it is loaded
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "scripts"))  # kohya_fixture: real-size model, shim
from _machine import cpu_name, device_label

RANK = 4
ALPHA = 4
SEED = 7
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
IMAGES = 4
REPEATS_FOLDER = "10_bench"

#: the "small" SD-shaped UNet: three levels of two resnets, 64/128/128 channels, attention (8 heads)
#: in the deeper two levels only (SDXL's layout: with SD1's attention at the 32×32 level the
#: 1024-token self-attention maps dominate a CPU step); an SD1 model otherwise (64-wide text context).
#: A step takes about 0.3 s on one CPU thread at 64×64 px, batch 2.
SMALL_UNET: dict[str, Any] = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128, 128),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=32,
)

#: (name, runner, options); runner "loop" = the hand-written loops, "ours" = higanbana's train()
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("frozen", "loop", {"adapter": None, "cached": False}),
    ("frozen (cached latents)", "loop", {"adapter": None, "cached": True}),
    ("diffusers-peft-lora", "loop", {"adapter": "peft", "cached": False}),
    ("higanbana-lora", "ours", {"algo": "lora", "cache": "none"}),
    ("higanbana-lora (cached latents)", "ours", {"algo": "lora", "cache": "memory"}),
    ("higanbana-lokr (cached latents)", "ours", {"algo": "lokr", "cache": "memory"}),
    ("higanbana-loha (cached latents)", "ours", {"algo": "loha", "cache": "memory"}),
    ("diffusers-peft-lora (cached latents)", "loop", {"adapter": "peft", "cached": True}),
    ("kohya-frozen (cached latents)", "loop", {"adapter": None, "cached": True, "venv": "kohya"}),
    ("kohya-lora (cached latents)", "loop", {"adapter": "kohya", "cached": True, "venv": "kohya"}),
    (
        "higanbana-lora transformer (cached latents)",
        "ours",
        {"algo": "lora", "cache": "memory", "preset": "unet-transformer-only"},
    ),
]
PEFT_ROW = "diffusers-peft-lora"
#: the configurations --model sd15 runs unless --configs says otherwise (the real-scale comparison)
SD15_CONFIGS = (
    "frozen (cached latents)",
    "diffusers-peft-lora (cached latents)",
    "higanbana-lora (cached latents)",
    "kohya-frozen (cached latents)",
    "kohya-lora (cached latents)",
    "higanbana-lora transformer (cached latents)",
)
KOHYA_TARGETS = ["Transformer2DModel"]  # kohya networks.lora's UNET_TARGET_REPLACE_MODULE for SD1/2


# --------------------------------------------------------------------------- fixtures
def build_model(kind: str, folder: Path) -> Path:
    """A tiny or small SD1-shaped diffusers folder (random weights, tiny CLIP text encoder and VAE)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from higanbana.models.sd import SDParts
    from higanbana.models.tiny import TINY_SD1_TE, TINY_VAE, save_tiny_sd, tiny_clip_tokenizer, tiny_sd_parts

    if kind == "tiny":
        return save_tiny_sd(tiny_sd_parts("sd1", seed=0, with_vae=True), folder)
    if kind == "sd15":
        from kohya_fixture import write_model

        return write_model(folder, size="full", seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SMALL_UNET)
        te = CLIPTextModel(CLIPTextConfig(**{**TINY_SD1_TE, "hidden_size": SMALL_UNET["cross_attention_dim"]}))
        vae = AutoencoderKL(**TINY_VAE, scaling_factor=0.18215)
    for m in (unet, te, vae):
        m.eval()
    return save_tiny_sd(SDParts("sd1", unet, [te], vae, [tiny_clip_tokenizer()]), folder)


def build_images(root: Path, size: int) -> Path:
    """``IMAGES`` synthetic ``size``×``size`` PNGs with captions in a kohya folder ``10_bench``."""
    import numpy as np
    from PIL import Image

    folder = root / REPEATS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        pixels[: size // 2] = (200, 40 + 50 * i, 40)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"sks toy, red, view {i}", encoding="utf-8")
    return root


# --------------------------------------------------------------------------- children
def peak_memory_mib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clock(device: str) -> float:
    """CPU time of this (one-thread) process on CPU, wall time on CUDA (after a synchronize)."""
    if device.startswith("cuda"):
        sync(device)
        return time.perf_counter()
    return time.process_time()


def run_loop(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """The frozen loop or the diffusers LoRA example's loop, timed directly."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from PIL import Image
    from transformers import AutoTokenizer, CLIPTextModel

    device = torch.device(args.device)
    model = args.model_dir
    torch.manual_seed(SEED)
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    # AutoTokenizer: sd-scripts' older transformers reads our tokenizer.json only as a fast tokenizer
    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.to(device)
    params: list[torch.Tensor] = []
    optimizer = lr_scheduler = None
    if options["adapter"] == "peft":
        from peft import LoraConfig

        config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TARGETS)
        unet.add_adapter(config)
        params = [p for p in unet.parameters() if p.requires_grad]
    elif options["adapter"] == "kohya":
        # as train_network.py: networks.lora.create_network, apply_to the UNet only, AdamW over the
        # UNet modules' parameters (the text encoder's modules are created but not applied or trained)
        from networks.lora import create_network

        network = create_network(1.0, RANK, ALPHA, vae, text_encoder, unet)
        network.apply_to(text_encoder, unet, apply_text_encoder=False, apply_unet=True)
        network.to(device)
        network.train()
        params = [p for lora in network.unet_loras for p in lora.parameters()]
        for p in params:
            p.requires_grad_(True)
    if params:
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    files = sorted((Path(args.data_dir) / REPEATS_FOLDER).glob("*.png"))

    def load(path: Path) -> tuple[torch.Tensor, str]:
        # as the example's preprocess_train: decode, to tensor, normalise to [-1, 1]; tokenised per batch
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return pixels, path.with_suffix(".txt").read_text(encoding="utf-8")

    cache = None
    if options["cached"]:
        with torch.no_grad():
            cache = [vae.encode(load(f)[0][None].to(device)).latent_dist.parameters[0] for f in files]
    order = torch.Generator().manual_seed(SEED)

    def step() -> float:
        picks = torch.randint(0, len(files), (args.batch,), generator=order).tolist()
        items = [load(files[i]) for i in picks]
        ids = tokenizer(
            [c for _, c in items],
            max_length=tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        with torch.no_grad():
            if cache is None:
                pixels = torch.stack([p for p, _ in items]).to(device)
                latents = vae.encode(pixels).latent_dist.sample()
            else:
                mean, logvar = torch.stack([cache[i] for i in picks]).chunk(2, dim=1)
                latents = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn_like(mean)
            latents = latents * vae.config.scaling_factor
            hidden = text_encoder(ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if optimizer is None:
            noisy.requires_grad_(True)
        pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        if optimizer is not None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    sync(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    steps = args.steps[1] - args.steps[0]
    start = clock(args.device)
    for _ in range(steps):
        step()
    elapsed = clock(args.device) - start
    return {"s_per_step": elapsed / steps, "trainable": sum(p.numel() for p in params)}


def ours_config(args: argparse.Namespace, options: dict[str, Any], steps: int, out: Path):
    from higanbana.train import TrainConfig

    return TrainConfig.from_dict(
        {
            "model": {"pretrained": str(args.model_dir)},
            "network": {
                "algo": options["algo"],
                "preset": options.get("preset", "attn-only"),
                "options": {"rank": RANK, "alpha": ALPHA},
            },
            "data": {
                "train_data_dir": str(args.data_dir),
                "resolution": args.resolution,
                "enable_bucket": False,
                "batch_size": args.batch,
                "cache_latents": options["cache"],
            },
            "optimizer": {"unet_lr": 1e-4},
            "training": {
                "max_train_steps": steps,
                "device": "cpu" if args.device == "cpu" else "",
                "seed": SEED,
                "gradient_checkpointing": bool(args.gradient_checkpointing),
            },
            "save": {"output_dir": str(out), "every_n_epochs": 0, "save_state": False},
            "logging": {"log_with": "none"},
        }
    )


def run_ours(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """Our train(): a discarded warm-up run, then N1 and N2 steps; the per-step time is the difference."""
    import torch

    from higanbana.train import train

    n1, n2 = args.steps
    times = {}
    with tempfile.TemporaryDirectory(prefix="train-step-") as tmp:
        for label, steps in (("warmup", n1), ("n1", n1), ("n2", n2)):
            config = ours_config(args, options, steps, Path(tmp) / label)
            # the previous run's model sits in reference cycles until a collection: without this the
            # peak RSS would hold two models at once
            gc.collect()
            if label == "n2" and args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            if label == "n2" and args.profile:
                import cProfile
                import pstats

                profiler = cProfile.Profile()
                start = clock(args.device)
                profiler.runcall(train, config, progress=False, log=lambda _m: None)
                times[label] = clock(args.device) - start
                stats = pstats.Stats(profiler, stream=sys.stderr)
                stats.sort_stats("cumulative").print_stats(args.profile)
                stats.sort_stats("tottime").print_stats(args.profile)
                continue
            start = clock(args.device)
            result = train(config, progress=False, log=lambda _m: None)
            times[label] = clock(args.device) - start
            assert result.steps == steps, (result.steps, steps)
    return {"s_per_step": (times["n2"] - times["n1"]) / (n2 - n1), "runs_s": times}


def child(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.child
    runner, options = next((r, o) for n, r, o in CONFIGS if n == name)
    if options.get("venv") == "kohya":
        from kohya_fixture import torchvision_shim

        torchvision_shim()  # sd-scripts' venv has a CUDA-only torchvision
        sys.path.insert(0, args.sd_scripts)
    # the same imports in every child, so "peak − after imports" compares what the loops allocate
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    if options.get("venv") != "kohya":
        import higanbana.train  # noqa: F401

    base = peak_memory_mib("cpu")
    out = run_loop(args, options) if runner == "loop" else run_ours(args, options)
    out["peak_mib"] = peak_memory_mib(args.device)
    out["base_mib"] = 0.0 if args.device.startswith("cuda") else base
    out["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- parent
def run_child(args: argparse.Namespace, name: str, model_dir: Path, data_dir: Path) -> dict[str, Any] | str:
    options = next(o for n, _r, o in CONFIGS if n == name)
    python = args.kohya_python if options.get("venv") == "kohya" else sys.executable
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--child",
        name,
        "--model-dir",
        str(model_dir),
        "--data-dir",
        str(data_dir),
        "--resolution",
        str(args.resolution),
        "--batch",
        str(args.batch),
        "--steps",
        f"{args.steps[0]},{args.steps[1]}",
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--sd-scripts",
        args.sd_scripts,
        *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
    ]
    if args.profile and name.startswith("higanbana"):
        cmd += ["--profile", str(args.profile)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if args.profile and name.startswith("higanbana"):
        print(proc.stderr, file=sys.stderr)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return f"failed (exit {proc.returncode}): {' | '.join(tail)}"


def have_peft() -> str | None:
    try:
        import peft
    except ImportError:
        return None
    return peft.__version__


def machine_line(args: argparse.Namespace, threads: int | None) -> str:
    import torch

    cpu = cpu_name()
    device = device_label(args.device)
    return (
        f"- machine: {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
        f"{threads if threads is not None else torch.get_num_threads()} threads, device {device}, fp32, "
        f"Python {platform.python_version()}"
    )


def fmt_time(values: list[float]) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.3f}"
    return f"{med:.3f} ({min(values):.3f}–{max(values):.3f})"


def report(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], notes: list[str]) -> list[str]:
    import diffusers

    med = {n: statistics.median(r["s_per_step"] for r in rs) for n, rs in results.items() if rs}
    threads = next((r["threads"] for rs in results.values() for r in rs), None)
    n1, n2 = args.steps
    mem = "peak CUDA memory allocated" if args.device.startswith("cuda") else "peak RSS of the subprocess"
    lines = [
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        machine_line(args, threads),
        f"- diffusers {diffusers.__version__}, peft {have_peft() or 'not installed'}",
        f"- command: `{' '.join(['python', *map(shlex.quote, sys.argv)])}`",
        f"- model: {MODEL_TITLES[args.model]}, {args.resolution}×{args.resolution} px, batch {args.batch}, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        f"rank {RANK} alpha {ALPHA}, seed {SEED}; loops: {n2 - n1} timed steps after {args.warmup} warm-up; "
        f"ours: (t({n2} steps) − t({n1} steps)) / {n2 - n1}; median of {args.repeats} fresh subprocesses "
        "(min–max in brackets)",
        "",
        f"| config | s/step | ratio vs frozen | ratio vs {PEFT_ROW} (same latents) | peak MiB ({mem}) "
        "| peak − after imports |",
        "|---|---|---|---|---|---|",
    ]
    for name, _runner, options in CONFIGS:
        rs = results.get(name)
        if not rs:
            continue
        cached = options.get("cached") or options.get("cache", "none") != "none"
        base = "frozen (cached latents)" if cached else "frozen"
        if options.get("venv") == "kohya":
            base = "kohya-frozen (cached latents)"
        t = med[name]
        vs_frozen = f"{t / med[base]:.2f}×" if base in med else ""
        if cached and base in med:
            vs_frozen += " (cached)"
        peft_row = f"{PEFT_ROW} (cached latents)" if cached else PEFT_ROW
        vs_peft = f"{t / med[peft_row]:.2f}×" if peft_row in med else ""
        peak = statistics.median(r["peak_mib"] for r in rs)
        grown = statistics.median(r["peak_mib"] - r["base_mib"] for r in rs)
        times = fmt_time([r["s_per_step"] for r in rs])
        lines.append(f"| {name} | {times} | {vs_frozen} | {vs_peft} | {peak:.0f} | {grown:.0f} |")
    lines += ["", *[f"- {n}" for n in notes]]
    return lines


MODEL_TITLES = {
    "tiny": "tiny SD1-shaped",
    "small": "small SD1-shaped",
    "sd15": "the real SD1.5 architecture (random weights)",
}


def parse_steps(text: str) -> tuple[int, int]:
    n1, n2 = (int(v) for v in text.split(","))
    if not 0 < n1 < n2:
        raise argparse.ArgumentTypeError("--steps N1,N2 needs 0 < N1 < N2")
    return n1, n2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "small", "sd15"), default="small")
    parser.add_argument("--configs", default="", help="comma-separated subset of: " + ", ".join(n for n, *_ in CONFIGS))
    parser.add_argument("--batch", type=int, default=0, help="batch (default: 2; sd15 1)")
    parser.add_argument(
        "--resolution", type=int, default=0, help="image side in px (default: 32 tiny, 64 small, 256 sd15)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="in every loop and in ours")
    parser.add_argument("--kohya-python", default="", help="a python with sd-scripts' requirements (kohya rows)")
    parser.add_argument("--sd-scripts", default="", help="a kohya sd-scripts checkout (kohya rows)")
    parser.add_argument("--steps", type=parse_steps, default=(3, 13), help="N1,N2 (timed steps: N2-N1)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps of the hand-written loops")
    parser.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per config")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--workdir", default="", help="where to write the model and images (default: a temp dir)")
    parser.add_argument(
        "--profile", type=int, default=0, help="print our N2-step runs' top N cProfile entries to stderr"
    )
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.resolution:
        args.resolution = {"tiny": 32, "small": 64, "sd15": 256}[args.model]
    if not args.batch:
        args.batch = 1 if args.model == "sd15" else 2
    if args.child:
        child(args)
        return

    names = [n for n, *_ in CONFIGS]
    if args.configs:
        wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in names]
        if unknown:
            parser.error(f"unknown config(s) {unknown}; choose from {names}")
        names = [n for n in names if n in wanted]
    elif args.model == "sd15":
        names = list(SD15_CONFIGS)
    else:
        names = [n for n, _r, o in CONFIGS if not o.get("venv") and n != f"{PEFT_ROW} (cached latents)"]
    notes = []
    kohya_rows = [n for n, _r, o in CONFIGS if o.get("venv") == "kohya" and n in names]
    if kohya_rows and not (args.kohya_python and args.sd_scripts):
        names = [n for n in names if n not in kohya_rows]
        notes.append("kohya rows: skipped, give --kohya-python and --sd-scripts")
    if any(n.startswith(PEFT_ROW) for n in names) and have_peft() is None:
        names = [n for n in names if not n.startswith(PEFT_ROW)]
        notes.append(f"{PEFT_ROW}: skipped, peft is not installed in {sys.executable}")

    with contextlib.ExitStack() as stack:
        root = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        model_dir = root / f"model-{args.model}"
        if not (model_dir / "model_index.json").exists():
            build_model(args.model, model_dir)
        data_dir = build_images(root / f"data-{args.resolution}", args.resolution)
        results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for r in range(args.repeats):
            for name in names:
                out = run_child(args, name, model_dir, data_dir)
                if isinstance(out, str):
                    notes.append(f"{name}, repeat {r + 1}: {out}")
                    print(f"[{r + 1}/{args.repeats}] {name}: {out}", file=sys.stderr)
                    continue
                results[name].append(out)
                print(
                    f"[{r + 1}/{args.repeats}] {name}: {out['s_per_step']:.3f} s/step, {out['peak_mib']:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    print("\n".join(report(args, results, notes)))


if __name__ == "__main__":
    main()

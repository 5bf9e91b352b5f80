"""Run kohya sd-scripts' ``train_network.py`` with ``--network_module higanbana.kohya``, for real, offline.

    .venv/bin/python scripts/kohya_sd_scripts_check.py --sd-scripts /tmp/sd-scripts \\
        --python .venv-kohya/bin/python --work-dir /tmp/kohya-check

1. builds (with ``--python``, so the trainer's own diffusers/transformers write them) a random-weight
   SD1.5-architecture diffusers folder, an offline CLIP tokenizer in a ``--tokenizer_cache_dir`` and a
   4-image kohya dataset at ``--resolution`` (default 128×128: at 64×64 the UNet's mid-block
   self-attention sees a single token, so its ``to_k`` adapters get exactly zero gradient) —
   ``scripts/kohya_fixture.py``;
2. runs ``train_network.py`` on CPU for a few steps, one subprocess per case (with a timeout), for
   every algorithm, a mixed-algorithm preset, a resume (``--network_weights``) and the built-in
   ``attn-only`` preset, under ``scripts/kohya_probe.py`` which records the network before training
   and at save time;
3. checks each saved file (``scripts/kohya_verify.py``): it loads in higanbana (reader/validator,
   ``higanbana info``), it equals the trained network (read back, and rebuilt onto the trainer's
   models with the plug-in's ``create_network_from_weights``), and its weights moved in training;
4. prints a table and exits 1 if any case failed.

Everything it writes is under ``--work-dir`` (caches, temporary files and the trainer's working
directory included; no ``__pycache__`` in the sd-scripts checkout). One training process at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ from the helpers next to this file
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import kohya_fixture  # noqa: E402
import kohya_verify  # noqa: E402

MIXED_PRESET = """\
description = "mixed algorithms per layer (kohya sd-scripts check)"
algo = "lora"

[unet]
blocks = ["Transformer2DModel", "ResnetBlock2D"]

[text_encoder]
blocks = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]

[[rules]]            # LoKr on self-attention
names = ["attn1"]
algo = "lokr"
options = { factor = 8 }

[[rules]]            # IA3 on the feed-forward output, scaled on its input
names = ["ff.net.2"]
algo = "ia3"
options = { on_input = true }

[[rules]]            # LoHa on the resnets (convolutions and time projections)
parts = ["unet"]
blocks = ["ResnetBlock2D"]
algo = "loha"

[[rules]]            # Diag-OFT on the text encoder's MLPs
parts = ["text_encoder"]
blocks = ["CLIPMLP"]
algo = "oft"
"""

#: attention projections of sd-scripts' own UNet (class CrossAttention) and of the text encoder, for
#: the full-weight case: a full ΔW (+ grads + AdamW states) on every layer would not fit 24 GiB of RAM
ATTENTION_PRESET = """\
description = "attention projections (kohya sd-scripts check)"

[unet]
names = ["to_q", "to_k", "to_v", "to_out.0"]

[text_encoder]
blocks = ["CLIPAttention", "CLIPSdpaAttention"]
"""


@dataclass
class Case:
    name: str
    network_args: list[str]
    dim: int = 4
    alpha: float = 2.0
    resume_from: str | None = None  # the name of the case whose file this one resumes
    note: str = ""


def default_cases() -> list[Case]:
    return [
        Case("lora", ["algo=lora", "conv_dim=4", "conv_alpha=2"], note="LoCon (conv_dim)"),
        Case("loha", ["algo=loha", "conv_dim=4", "conv_alpha=2"]),
        Case("lokr", ["algo=lokr", "factor=8"]),
        Case("ia3", ["algo=ia3", "preset=ia3"]),
        Case("glora", ["algo=glora"]),
        Case("dora", ["algo=lora", "dora_wd=true"], note="dora_wd=true"),
        Case("diag-oft", ["algo=diag-oft"]),
        Case("boft", ["algo=boft"], dim=16, note="dim 16 (block size; 4 fits no 320-wide layer)"),
        Case("full", ["algo=full", "preset={work}/attention.toml"], note="attention projections only (RAM)"),
        Case("mixed", ["preset={work}/mixed.toml"], note="lora+lokr+ia3+loha+oft"),
        Case("resume", ["algo=lora", "conv_dim=4", "conv_alpha=2"], resume_from="lora", note="resumes lora"),
        # the built-in preset names diffusers' "Attention" class; sd-scripts' own UNet calls it "CrossAttention"
        Case("attn-only", ["algo=lora", "preset=attn-only"], note="built-in preset attn-only"),
    ]


@dataclass
class Outcome:
    case: Case
    exit_code: int | None = None
    seconds: float = 0.0
    max_rss_mib: float = 0.0
    verdict: kohya_verify.Verdict | None = None
    notes: list[str] = field(default_factory=list)
    file: Path | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.verdict is not None and self.verdict.ok


def child_env(work: Path, threads: int) -> dict[str, str]:
    """The trainer's environment: offline, every cache and temporary folder inside ``work``."""
    env = dict(os.environ)
    cache = work / "cache"
    tmp = work / "tmp"
    for folder in (cache, tmp):
        folder.mkdir(parents=True, exist_ok=True)
    env.update(
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        DIFFUSERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=str(cache / "huggingface"),
        XDG_CACHE_HOME=str(cache),
        TORCH_HOME=str(cache / "torch"),
        MPLCONFIGDIR=str(cache / "matplotlib"),
        TMPDIR=str(tmp),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("PYTHONPATH", None)
    return env


def run_process(
    cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path, timeout: float
) -> tuple[int, float, float]:
    """``(exit code, seconds, peak RSS MiB)``; on timeout the process group is killed and the code is 124."""
    started = time.monotonic()
    with log.open("w", encoding="utf-8") as out:
        out.write("$ " + shlex.join(cmd) + "\n\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        rss_kib = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                rss_kib = usage.ru_maxrss
                code = os.waitstatus_to_exitcode(status)
                proc.returncode = code
                break
            if time.monotonic() - started > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = 124
                code, rss_kib = 124, usage.ru_maxrss
                out.write(f"\n[kohya check] killed after {timeout:.0f} s\n")
                break
            time.sleep(0.5)
    return code, time.monotonic() - started, rss_kib / 1024


def error_tail(log: Path, lines: int = 12) -> str:
    """The end of the last traceback in a log (or its last lines)."""
    text = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else []
    start = max((i for i, line in enumerate(text) if line.startswith("Traceback")), default=-1)
    chunk = text[start:] if start >= 0 else text
    return "\n".join(chunk[-lines:])


def train_command(
    case: Case,
    *,
    python: str,
    sd_scripts: Path,
    work: Path,
    steps: int,
    probe_dir: Path,
    out_dir: Path,
    extra: list[str],
    resolution: int = 64,
) -> list[str]:
    args = [a.replace("{work}", str(work)) for a in case.network_args]
    cmd = [
        python,
        str(HERE / "kohya_probe.py"),
        "--probe-dir",
        str(probe_dir),
        str(sd_scripts / "train_network.py"),
        "--pretrained_model_name_or_path",
        str(work / "model"),
        "--tokenizer_cache_dir",
        str(work / "tokenizers"),
        "--train_data_dir",
        str(work / "data"),
        "--resolution",
        str(resolution),
        "--output_dir",
        str(out_dir),
        "--output_name",
        case.name,
        "--save_model_as",
        "safetensors",
        "--network_module",
        "higanbana.kohya",
        "--network_dim",
        str(case.dim),
        "--network_alpha",
        str(case.alpha),
        "--network_args",
        *args,
        "--max_train_steps",
        str(steps),
        "--train_batch_size",
        "1",
        "--learning_rate",
        "1e-3",
        "--optimizer_type",
        "AdamW",
        "--lr_scheduler",
        "constant",
        "--mixed_precision",
        "no",
        "--caption_extension",
        ".txt",
        "--seed",
        "0",
        "--max_data_loader_n_workers",
        "0",
        "--cache_latents",
    ]
    if case.resume_from:
        cmd += ["--network_weights", str(work / "runs" / case.resume_from / "out" / f"{case.resume_from}.safetensors")]
    return cmd + extra


def versions(python: str, env: dict[str, str], cwd: Path) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m\n"
        "out = {}\n"
        "for name in ('torch', 'torchvision', 'diffusers', 'transformers', 'accelerate', 'safetensors', "
        "'tokenizers', 'huggingface-hub', 'numpy', 'higanbana'):\n"
        "    try: out[name] = m.version(name)\n"
        "    except m.PackageNotFoundError: out[name] = '-'\n"
        "import sys; out['python'] = sys.version.split()[0]\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": proc.stderr.strip()[-300:]}


def sd_scripts_commit(sd_scripts: Path, given: str | None) -> str:
    if given:
        return given
    for name in (".sd-scripts-commit", "COMMIT"):
        if (sd_scripts / name).is_file():
            return (sd_scripts / name).read_text(encoding="utf-8").strip()
    proc = subprocess.run(["git", "-C", str(sd_scripts), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def build_fixture(
    python: str, work: Path, env: dict[str, str], size: str, seed: int, timeout: float, image_size: int = 64
) -> tuple[bool, str]:
    """Model, tokenizer cache and dataset (reused when ``work/fixture.json`` says they are the same)."""
    stamp = work / "fixture.json"
    want = {
        "size": size,
        "seed": seed,
        "image_size": image_size,
        "builder": (HERE / "kohya_fixture.py").read_text(encoding="utf-8"),
    }
    if stamp.is_file() and (work / "model" / "model_index.json").is_file():
        try:
            if json.loads(stamp.read_text(encoding="utf-8")) == want:
                return True, "reused"
        except ValueError:
            pass
    stamp.unlink(missing_ok=True)
    log = work / "fixture.log"
    cmd = [python, str(HERE / "kohya_fixture.py"), str(work), "--size", size, "--seed", str(seed)]
    cmd += ["--image-size", str(image_size)]
    code, seconds, _ = run_process(cmd, cwd=work, env=env, log=log, timeout=timeout)
    if code != 0:
        return False, f"fixture build failed (exit {code}):\n{error_tail(log)}"
    stamp.write_text(json.dumps(want), encoding="utf-8")
    return True, f"built in {seconds:.0f} s"


def run_case(
    case: Case, args: argparse.Namespace, work: Path, env: dict[str, str], done: dict[str, Outcome]
) -> Outcome:
    outcome = Outcome(case)
    run_dir = work / "runs" / case.name
    probe_dir, out_dir = run_dir / "probe", run_dir / "out"
    if run_dir.exists():
        for sub in (probe_dir, out_dir):
            for f in sorted(sub.glob("*")) if sub.is_dir() else []:
                f.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    resumed_from = None
    if case.resume_from:
        before = done.get(case.resume_from)
        if before is None or before.file is None or not before.file.is_file():
            outcome.notes.append(f"skipped: case {case.resume_from} left no file to resume")
            return outcome
        resumed_from = before.file
    cmd = train_command(
        case,
        python=args.python,
        sd_scripts=args.sd_scripts,
        work=work,
        steps=args.steps,
        probe_dir=probe_dir,
        out_dir=out_dir,
        extra=args.extra,
        resolution=args.resolution,
    )
    log = run_dir / "train.log"
    outcome.exit_code, outcome.seconds, outcome.max_rss_mib = run_process(
        cmd, cwd=run_dir, env=env, log=log, timeout=args.timeout
    )
    file = out_dir / f"{case.name}.safetensors"
    outcome.file = file if file.is_file() else None
    if outcome.exit_code != 0:
        outcome.notes.append("trainer failed:\n" + error_tail(log))
    if outcome.file is not None:
        outcome.verdict = kohya_verify.verify_run(file, probe_dir, resumed_from=resumed_from, python=args.check_python)
        outcome.notes.extend(outcome.verdict.notes)
    elif outcome.exit_code == 0:
        outcome.notes.append("exit 0 but no file saved")
    (run_dir / "verdict.json").write_text(
        json.dumps(
            {
                "case": case.name,
                "network_args": case.network_args,
                "exit_code": outcome.exit_code,
                "seconds": round(outcome.seconds, 1),
                "max_rss_mib": round(outcome.max_rss_mib),
                "ok": outcome.ok,
                "notes": outcome.notes,
                "details": outcome.verdict.details if outcome.verdict else {},
            },
            indent=2,
            default=str,
        ),
        encoding="utf-8",
    )
    return outcome


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "NO")


def table(outcomes: list[Outcome]) -> str:
    rows = [
        "| algorithm | exit code | seconds | file loads | weights trained/equal | notes |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        v = o.verdict
        trained_equal = "-" if v is None else f"{_yes(v.trained)}/{_yes(v.equal)}"
        if v is not None and "moved" in v.details:
            trained_equal += f" ({v.details['moved']} moved)"
        notes = [o.case.note] if o.case.note else []
        if v is not None and v.details.get("resumed_exactly"):
            notes.append("started exactly from the lora file")
        if v is not None and "info" in v.details:
            algos = ", ".join(f"{a}×{n}" for a, n in v.details["info"]["algorithms"].items())
            notes.append(algos)
        if v is not None and v.details.get("compatibility"):
            short = {"loads": "ok", "does not load": "no", "loads with deviation": "deviates", "loads partly": "partly"}
            notes.append("info: " + ", ".join(f"{t} {short.get(s, s)}" for t, s in v.details["compatibility"].items()))
        if not o.ok:
            notes += [n.splitlines()[-1] if n.startswith("trainer failed") else n for n in o.notes]
        exit_code = "-" if o.exit_code is None else str(o.exit_code)
        rows.append(
            f"| {o.case.name} | {exit_code} | {o.seconds:.0f} | {_yes(None if v is None else v.loads)} | "
            f"{trained_equal} | {'; '.join(notes).replace('|', '/')} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sd-scripts", type=Path, required=True, help="an sd-scripts checkout (train_network.py)")
    parser.add_argument("--sd-scripts-commit", help="the checkout's commit, for the report (else git / a COMMIT file)")
    parser.add_argument("--python", default=sys.executable, help="a Python with sd-scripts' dependencies + higanbana")
    parser.add_argument(
        "--check-python", default=sys.executable, help="the Python for `higanbana info` (default: this one)"
    )
    parser.add_argument("--work-dir", type=Path, required=True, help="everything is written here")
    parser.add_argument("--cases", help="comma-separated subset of: " + ",".join(c.name for c in default_cases()))
    parser.add_argument("--steps", type=int, default=3, help="training steps per case (default 3)")
    parser.add_argument(
        "--resolution",
        type=int,
        default=128,
        help="image side = training resolution (default 128: at 64 the UNet's mid-block self-attention sees "
        "one token, so its to_k gets exactly zero gradient and cannot train)",
    )
    parser.add_argument("--timeout", type=float, default=1500, help="seconds per training run (default 1500)")
    parser.add_argument("--threads", type=int, default=2, help="OMP threads of the trainer (default 2)")
    parser.add_argument("--size", choices=sorted(kohya_fixture.SIZES), default="full", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train_network.py arguments (last)")
    args = parser.parse_args(argv)
    args.sd_scripts = args.sd_scripts.resolve()
    args.work_dir = args.work_dir.resolve()
    for name in ("python", "check_python"):  # absolute (children run elsewhere), symlinks kept (venvs)
        value = getattr(args, name)
        if os.sep in value:
            setattr(args, name, os.path.abspath(value))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.sd_scripts / "train_network.py").is_file():
        print(f"{args.sd_scripts}: no train_network.py", file=sys.stderr)
        return 2
    cases = default_cases()
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = sorted(set(wanted) - {c.name for c in cases})
        if unknown:
            print(f"unknown case(s): {', '.join(unknown)}", file=sys.stderr)
            return 2
        cases = [c for c in cases if c.name in wanted]
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(work, args.threads)
    (work / "mixed.toml").write_text(MIXED_PRESET, encoding="utf-8")
    (work / "attention.toml").write_text(ATTENTION_PRESET, encoding="utf-8")
    info = {
        "sd_scripts": str(args.sd_scripts),
        "sd_scripts_commit": sd_scripts_commit(args.sd_scripts, args.sd_scripts_commit),
        "python": args.python,
        "versions": versions(args.python, env, work),
        "model": "random-weight SD1.5 architecture at full width (UNet 320/640/1280/1280, CLIP ViT-L text "
        "encoder, SD VAE); diffusers folder; offline CLIP tokenizer (byte alphabet, no merges)"
        if args.size == "full"
        else f"size {args.size} (not loadable by sd-scripts)",
        "steps": args.steps,
        "resolution": args.resolution,
    }
    print(json.dumps(info, indent=2), flush=True)
    ok, message = build_fixture(
        args.python, work, env, args.size, args.seed, timeout=args.timeout, image_size=args.resolution
    )
    print(f"fixture: {message}", flush=True)
    if not ok:
        return 1
    done: dict[str, Outcome] = {}
    outcomes = []
    for case in cases:
        if case.resume_from and case.resume_from not in done and (work / "runs" / case.resume_from).is_dir():
            # resuming a file from an earlier invocation's run of that case
            prior = work / "runs" / case.resume_from / "out" / f"{case.resume_from}.safetensors"
            done[case.resume_from] = Outcome(case, file=prior if prior.is_file() else None)
        print(f"--- {case.name}: network_args {' '.join(case.network_args)}", flush=True)
        outcome = run_case(case, args, work, env, done)
        done[case.name] = outcome
        outcomes.append(outcome)
        status = "ok" if outcome.ok else "FAILED"
        print(
            f"    {status}: exit {outcome.exit_code}, {outcome.seconds:.0f} s, peak RSS {outcome.max_rss_mib:.0f} MiB"
        )
        for note in outcome.notes:
            print("    " + note.replace("\n", "\n    "))
    text = table(outcomes)
    print("\n" + text)
    summary = {
        **info,
        "cases": [
            {
                "case": o.case.name,
                "network_args": o.case.network_args,
                "exit_code": o.exit_code,
                "seconds": round(o.seconds, 1),
                "max_rss_mib": round(o.max_rss_mib),
                "ok": o.ok,
                "notes": o.notes,
            }
            for o in outcomes
        ],
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (work / "summary.md").write_text(text + "\n", encoding="utf-8")
    failed = [o.case.name for o in outcomes if not o.ok]
    print(
        f"\n{len(outcomes) - len(failed)}/{len(outcomes)} cases passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

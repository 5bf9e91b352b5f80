#!/usr/bin/env bash
# The GPU half of issue 17 in one device call (under 10 minutes): the whole-UNet training step in
# bf16 at the real SD1.5 (batch 4, 64×64 latents) and SDXL (batch 2, 128×128) architectures, every
# algorithm, ours (each mode) vs LyCORIS vs PEFT, one algorithm at a time so that whatever finishes
# before the limit is kept. Tables go to $OUT/gpu.md (blocks ready for docs/benchmarks.md), the
# log to $OUT/gpu.log.
#
# The device image has torch, transformers, peft, accelerate and safetensors but not diffusers or
# lycoris-lora: download their wheels here first (pure Python), then carry `.whl`:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 lycoris-lora==4.1.3 toml==0.10.2
#
# and run it with the device tool: command `bash benchmarks/gpu_unet_step.sh`, carry [".whl"].
# A dry run on a CPU machine: `DEVICE=cpu QUICK=1 OUT=/tmp/g bash benchmarks/gpu_unet_step.sh`.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-unet-step}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:+--quick}
SD15_SECONDS=${SD15_SECONDS:-330}
SDXL_SECONDS=${SDXL_SECONDS:-200}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
log="$OUT/gpu.log"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$log"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())
for name in ("diffusers", "peft", "lycoris", "higanbana"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:  # a missing peer leaves its columns empty; the script says so
        print(name, "missing:", exc)
EOF

run() {  # run ARCH SECONDS_LEFT_FOR_THE_ARCH ALGO...
    local arch=$1 budget=$2; shift 2
    local deadline=$((SECONDS + budget))
    for algo in "$@"; do
        local left=$((deadline - SECONDS))
        if ((left < 20)); then
            echo "skip $arch $algo: time budget spent" | tee -a "$log"
            continue
        fi
        timeout "$left" "$PYTHON" benchmarks/unet_step.py --device "$DEVICE" --arch "$arch" $QUICK --algos "$algo" \
            --live 3 --tag "$algo" --write "$OUT/gpu.md" >>"$log" 2>&1 \
            || echo "$arch $algo: exit $? (timeout 124)" | tee -a "$log"
    done
}
run sd15 "$SD15_SECONDS" lora ia3 lokr oft dora loha glora boft full
run sdxl "$SDXL_SECONDS" lora lokr loha oft
grep -h "^| " "$OUT/gpu.md" 2>/dev/null | head -40

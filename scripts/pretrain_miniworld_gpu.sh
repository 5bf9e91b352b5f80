#!/usr/bin/env bash
# The run that made the shipped miniature-world models: on one accelerator, train CLIP and VAE once
# (scale "gpu", wall-clock budgets per stage), then four UNet variants side by side on the same
# stages, each measured by the world checker at guidance 4, 2 and 7. Variant D (three levels,
# lr 1e-3) is the shipped model (miniworld/weights); see docs/miniworld.md.
#
#   OUT=results/ bash scripts/pretrain_miniworld_gpu.sh            # on a CUDA machine
#   OUT=/tmp/r SCALE=tiny DEVICE=cpu PYTHON=.venv/bin/python bash scripts/pretrain_miniworld_gpu.sh
#
# Each variant's folder (sd/, clip/, training.json) is packed as OUT/<variant>.tar; the logs are
# gathered in OUT/logs.txt (six files in all: what a device call may bring back).
# Wheels under .whl/ (diffusers and friends, where the machine lacks them) are installed first.
set -u
: "${OUT:?set OUT to a results folder}"
SCALE=${SCALE:-gpu}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/miniworld-gpu}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [ -d .whl ] && [ "${INSTALL_WHEELS:-1}" = 1 ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
    if ! "$PYTHON" -c "import diffusers, transformers, higanbana.miniworld.pretrain" 2>"$WORK/import.err"; then
        echo "imports failed with all carried wheels; keeping only diffusers' own"; cat "$WORK/import.err"
        rm -rf /tmp/site
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
            .whl/diffusers-*.whl .whl/importlib_metadata-*.whl .whl/lazy_importer-*.whl
    fi
fi
"$PYTHON" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

NPROC=$(nproc)
run() {  # run NAME ARGS...: one pretraining process, its log in WORK/NAME.log
    local name=$1; shift
    "$PYTHON" scripts/pretrain_miniworld.py --out "$WORK/$name" --scale "$SCALE" --device "$DEVICE" "$@" \
        >"$WORK/$name.log" 2>&1
}
gather_logs() {
    for f in "$WORK"/*.log; do echo "=== $f"; tr '\r' '\n' <"$f" | grep -v '^\s*$' | tail -60; done >"$OUT/logs.txt"
}

SECONDS=0
run base --workers "$NPROC" --stages-only || { echo "CLIP/VAE stages failed"; gather_logs; tail -30 "$WORK/base.log"; exit 1; }
echo "stages done in ${SECONDS}s"

two_level='"block_out_channels": [64, 128], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]'
two_attn='"block_out_channels": [64, 128], "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]'
three='"block_out_channels": [64, 128, 128], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]'
declare -A VARIANTS=(
    [A]="{\"unet\": {\"lr\": 0.0005, \"config\": {$two_level}}}"
    [B]="{\"unet\": {\"lr\": 0.0005, \"config\": {$two_attn}}}"
    [C]="{\"unet\": {\"lr\": 0.0005, \"config\": {$three}}}"
    [D]="{\"unet\": {\"lr\": 0.001, \"config\": {$three}}}"
)
per=$(( NPROC / 4 > 0 ? NPROC / 4 : 1 ))
for v in A B C D; do
    mkdir -p "$WORK/$v" && rm -rf "$WORK/$v/stages" "$WORK/$v/training.json" && cp -r "$WORK/base/stages" "$WORK/$v/"
    run "$v" --workers "$per" --threads "$per" --override "${VARIANTS[$v]}" --cfg 4 --cfg 2 --cfg 7 &
done
wait
echo "variants done in ${SECONDS}s"
for v in A B C D; do
    if [ -f "$WORK/$v/training.json" ]; then
        tar -C "$WORK/$v" -cf "$OUT/$v.tar" sd clip training.json
        "$PYTHON" -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], r['steps_run'], r['times_s'],
json.dumps(r['prompt_following_by_cfg']), r['size_mb'])" "$WORK/$v/training.json" "$v"
    else
        echo "variant $v failed:"; tail -20 "$WORK/$v.log"
    fi
done
cp "$WORK/base/stages.json" "$WORK/stages.log" 2>/dev/null
gather_logs
true

"""Files written by the real lycoris-lora load in higanbana with the same merged weights.

lycoris-lora runs in the peers' venv (``.venv-bench``, built by ``make test``) in a subprocess: it
wraps a tiny SD1 UNet with each algorithm, randomises the adapters, saves its standalone file
(``lycoris_`` names) and the weight change of its own ``merge_to``. We load the file by detection
and compare our merged weights. LyCORIS 4.1.3 applies the scale twice when merging LoHa/LoKr (a
known peer bug): there the expected change is theirs divided by the module's scale (α/r; LoKr with
both blocks full has scale 1 and is unaffected), and the test pins that.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from higanbana.formats import load_tensors
from higanbana.formats.inspect import file_info
from higanbana.formats.sd_network import load_sd_network
from higanbana.models.tiny import tiny_sd_parts

ROOT = Path(__file__).resolve().parents[2]
PEERS_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
DIM, ALPHA = 4, 2.0
ALGOS = ["lora", "loha", "lokr", "ia3", "glora", "diag-oft", "boft"]
SCALED_TWICE = {"loha", "lokr"}  # LyCORIS 4.1.3 merge_to bug

SCRIPT = r"""
import json, sys, torch
from safetensors.torch import save_file
from higanbana.models.tiny import tiny_sd_parts
from lycoris import create_lycoris
out, algos, dim, alpha = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
for algo in algos:
    unet = tiny_sd_parts("sd1", seed=0).unet
    torch.manual_seed(0)
    net = create_lycoris(unet, 1.0, linear_dim=dim, linear_alpha=alpha, algo=algo)
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    net.save_weights(f"{out}/{algo}.safetensors", torch.float32, {})
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    net.merge_to(1.0)
    after = unet.state_dict()
    save_file({k: (after[k] - before[k]).contiguous() for k in before}, f"{out}/{algo}.delta.safetensors")
"""


def _lycoris_available() -> bool:
    if not PEERS_PYTHON.exists():
        return False
    return subprocess.run([str(PEERS_PYTHON), "-c", "import lycoris"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def lycoris_files(tmp_path_factory):
    if not _lycoris_available():
        pytest.skip(f"lycoris-lora is not importable by {PEERS_PYTHON} (make peers builds it)")
    out = tmp_path_factory.mktemp("lycoris")
    proc = subprocess.run(
        [str(PEERS_PYTHON), "-c", SCRIPT, str(out), json.dumps(ALGOS), str(DIM), str(ALPHA)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("algo", ALGOS)
def test_lycoris_standalone_files_load_and_merge_like_lycoris(lycoris_files, algo):
    parts = tiny_sd_parts("sd1", seed=0)
    before = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    net = load_sd_network(lycoris_files / f"{algo}.safetensors", parts)
    assert len(net) > 100 and all(name.startswith("lora_unet_") for name in net.adapters)  # canonical names
    net.merge()
    after = parts.unet.state_dict()
    theirs, _ = load_tensors(lycoris_files / f"{algo}.delta.safetensors")
    scales = {f"{r.path}.weight": net.adapters[n].scale for n, r in net.records.items()}
    changed = 0
    for key, delta in theirs.items():
        ours = after[key] - before[key]
        factor = 1 / scales[key] if algo in SCALED_TWICE and key in scales else 1.0  # they merge s²·ΔW
        if delta.abs().max() == 0 and ours.abs().max() == 0:
            continue
        changed += 1
        torch.testing.assert_close(ours, delta * factor, rtol=1e-4, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")
    assert changed > 100
    verdicts = {v["tool"]: v["status"] for v in file_info(lycoris_files / f"{algo}.safetensors")["compatibility"]}
    # ComfyUI maps lycoris_<diffusers path> (SimpleTuner's naming); A1111 and diffusers do not
    assert verdicts["ComfyUI"] == ("does not load" if algo == "ia3" else "loads")
    assert verdicts["A1111"] == verdicts["diffusers"] == "does not load"

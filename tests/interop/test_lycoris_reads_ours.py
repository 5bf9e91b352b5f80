"""Our files load in the real lycoris-lora (4.1.3) with the same forward: the other direction of
``test_lycoris_files.py``.

In the peers' venv (``.venv-bench``, where higanbana is installed too) a subprocess builds our
network of every ``higanbana selfcheck`` setup — every algorithm and its variants (Tucker, DoRA,
constraint, rescaled, …) — on a tiny SD1 UNet with LyCORIS's standalone ``lycoris_`` prefix, on its
Linear and Conv2d layers (norms for ``norm``), randomises it and saves it; then
``lycoris.create_lycoris_from_weights`` rebuilds it on a fresh copy of the UNet, ``apply_to`` wraps
the layers, and the two UNet outputs are compared.

LyCORIS 4.1.3 cannot load IA3 files at all — its own included: ``IA3Module.weight_list`` extracts
``weight`` and ``on_input`` but ``make_module_from_state_dict`` takes only ``weight`` (a TypeError
that ``create_lycoris_from_weights`` does not catch). The test pins that peer bug, so a LyCORIS
release that fixes it shows up here.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from .test_lycoris_files import PEERS_PYTHON, _lycoris_available

SCRIPT = r"""
import copy, json, logging, sys, tempfile
import torch
logging.disable(logging.WARNING)
from higanbana.formats import save_network
from higanbana.models.tiny import tiny_sd_unet, tiny_unet_inputs
from higanbana.network import AdapterNetwork
from higanbana.workflows.selfcheck import select_layers, selfcheck_setups
from lycoris import create_lycoris_from_weights

base = tiny_sd_unet(seed=0).requires_grad_(False).eval()
batch = tiny_unet_inputs(seed=3)
with torch.no_grad():
    frozen = base(**batch).sample
folder = tempfile.mkdtemp()
results = {}
for label, algo, options, _lr in selfcheck_setups():
    unet = copy.deepcopy(base)
    net = AdapterNetwork(unet, algo, select_layers(algo), prefix="lycoris", **options)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    net.attach()
    with torch.no_grad():
        ours = unet(**batch).sample
    path = save_network(net, f"{folder}/{label}.safetensors")
    other = copy.deepcopy(base)
    row = {"modules": len(net.adapters), "effect": float((ours - frozen).abs().max() / frozen.abs().max())}
    try:
        lyco, _ = create_lycoris_from_weights(1.0, str(path), other)
        lyco.apply_to()
        with torch.no_grad():
            theirs = other(**batch).sample
        row.update(loaded=len(lyco.loras), error=float((theirs - ours).abs().max() / ours.abs().max()))
    except Exception as exc:
        row.update(failed=f"{type(exc).__name__}: {exc}")
    results[label] = row
print(json.dumps(results))
"""

#: LyCORIS 4.1.3's bug: IA3 files (its own too) fail in make_module_from_state_dict
LYCORIS_CANNOT_LOAD = {"ia3": "make_module_from_state_dict() takes 4 positional arguments but 5 were given"}


@pytest.fixture(scope="module")
def results():
    if not _lycoris_available():
        pytest.skip(f"lycoris-lora is not importable by {PEERS_PYTHON} (make peers builds it)")
    proc = subprocess.run([str(PEERS_PYTHON), "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_setup_is_tried(results):
    from higanbana.workflows.selfcheck import selfcheck_setups

    assert set(results) == {label for label, *_ in selfcheck_setups()}
    assert all(row["effect"] > 1e-2 for row in results.values())  # the adapters change the output


@pytest.mark.slow
def test_lycoris_loads_our_files_with_the_same_forward(results):
    for label, row in results.items():
        if label in LYCORIS_CANNOT_LOAD:
            continue
        assert "failed" not in row, f"{label}: {row.get('failed')}"
        assert row["loaded"] == row["modules"], f"{label}: LyCORIS loaded {row['loaded']} of {row['modules']}"
        assert row["error"] <= 1e-5, f"{label}: relative error {row['error']:.2e}"


@pytest.mark.slow
def test_lycoris_ia3_loading_bug_is_still_there(results):
    for label, why in LYCORIS_CANNOT_LOAD.items():
        assert why in results[label].get("failed", ""), f"{label}: {results[label]}"

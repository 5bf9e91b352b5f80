"""LyCORIS 4.1.3's Diag-OFT and BOFT ``bypass_mode`` is not the algorithm of its merged mode on a layer
with a bias: it rotates the whole output, ``R·(W0·x + b0)`` (``functional/diag_oft.py`` ``_bypass_diff``),
where its merged mode, ComfyUI and ours compute ``R·W0·x + b0``. ``benchmarks/unet_step.py`` marks its
OFT/BOFT bypass columns ‡ for this reason; when this test fails, LyCORIS has fixed it and the mark goes.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from .test_lycoris_files import PEERS_PYTHON, _lycoris_available

#: both LyCORIS modes of one random rotation on a Linear 16→16, with a random and with a zero bias
SCRIPT = r"""
import copy, json, torch
from torch import nn
from lycoris.modules.boft import ButterflyOFTModule
from lycoris.modules.diag_oft import DiagOFTModule

rows = {}
for name, cls in (("diag-oft", DiagOFTModule), ("boft", ButterflyOFTModule)):
    for bias in ("random", "zero"):
        torch.manual_seed(0)
        base = nn.Linear(16, 16)
        with torch.no_grad():
            base.bias.normal_(0, 1) if bias == "random" else base.bias.zero_()
        x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
        outs = []
        for bypass in (False, True):
            layer = copy.deepcopy(base)
            module = cls("x", layer, 1.0, lora_dim=4, bypass_mode=bypass)
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                module.oft_blocks.copy_(torch.randn(module.oft_blocks.shape, generator=gen) * 0.3)
            module.apply_to()
            with torch.no_grad():
                outs.append(layer(x))
        diff = outs[1] - outs[0]
        rows[f"{name}-{bias}"] = float(diff.abs().max() / outs[0].abs().max())
        # the same offset for every input: (R - I)·b0, the rotated bias
        rows[f"{name}-{bias}-spread"] = float((diff - diff[:1]).abs().max() / outs[0].abs().max())
print(json.dumps(rows))
"""


@pytest.mark.slow
def test_lycoris_oft_bypass_rotates_the_bias():
    if not _lycoris_available():
        pytest.skip(f"lycoris-lora is not importable by {PEERS_PYTHON} (make peers builds it)")
    proc = subprocess.run([str(PEERS_PYTHON), "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    for algo in ("diag-oft", "boft"):
        assert rows[f"{algo}-zero"] < 1e-5, rows  # without a bias the two modes agree
        assert rows[f"{algo}-random"] > 0.1, rows  # with one they do not,
        assert rows[f"{algo}-random-spread"] < 1e-5, rows  # by one offset for every input: the rotated bias

"""Reference for LoRA/LoCon (+Tucker, +DoRA on both axes) from docs/design.md §3."""

from __future__ import annotations

import torch

from .cases import STANDARD_LAYERS, Case, conv2d, flat


def dora_reference(w0, delta, magnitude, m):
    """DoRA (docs/design.md §3): W_d = (W0 + sΔW)·dora_scale/‖W0 + sΔW‖ on the axis given by the shape."""
    combined = w0 + delta
    if magnitude.shape[0] == w0.shape[0] and magnitude.shape[1] == 1:
        dims = [d for d in range(w0.dim()) if d != 0]
    else:
        dims = [d for d in range(w0.dim()) if d != 1]
    norm = combined.pow(2).sum(dim=dims, keepdim=True).sqrt()
    wd = combined * magnitude / norm
    return w0 + m * (wd - w0)


def reference(state, w0, b0, m):
    down, up = state["lora_down.weight"], state["lora_up.weight"]
    r = down.shape[0]
    scale = float(state["alpha"]) / r
    if "lora_mid.weight" in state:
        mid = state["lora_mid.weight"]
        delta = torch.einsum("oa,ac...,ci->oi...", flat(up), mid, flat(down))
    else:
        delta = (flat(up) @ flat(down)).reshape(w0.shape)
    if "dora_scale" in state:
        return dora_reference(w0, scale * delta, state["dora_scale"], m), b0
    return w0 + m * scale * delta, b0


KEYS = {"lora_down.weight", "lora_up.weight", "alpha"}

CASES = [
    *(Case("lora", name, make, reference, {"rank": 3, "alpha": 2.0}, KEYS) for name, make in STANDARD_LAYERS.items()),
    Case("lora", "conv2d", conv2d, reference, {"rank": 3, "use_tucker": True}, KEYS | {"lora_mid.weight"}),
    Case("lora", "linear", STANDARD_LAYERS["linear"], reference, {"rank": 4, "alpha": 8, "rs_lora": True}, KEYS),
    Case("lora", "linear", STANDARD_LAYERS["linear"], reference, {"rank": 2, "use_scalar": True}, KEYS),
    *(
        Case(
            "lora",
            name,
            make,
            reference,
            {"rank": 3, "weight_decompose": True, "wd_on_output": axis},
            KEYS | {"dora_scale"},
        )
        for name, make in (("linear", STANDARD_LAYERS["linear"]), ("conv2d", conv2d))
        for axis in (True, False)
    ),
    Case(
        "lora",
        "conv2d",
        conv2d,
        reference,
        {"rank": 2, "use_tucker": True, "weight_decompose": True},
        KEYS | {"lora_mid.weight", "dora_scale"},
    ),
]

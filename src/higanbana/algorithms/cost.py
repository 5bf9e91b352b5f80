"""The cost model of the forward modes, in one place: when ``forward_mode = "auto"`` runs bypass.

Each algorithm states what one adapted layer costs as plain numbers (:class:`Costs`, from
``Adapter.costs(tokens)``); the device constants and the one decision rule are here. *Merged* runs
one op with ``W0 + m·s·ΔW`` and pays for building ΔW and passes over the weight; *bypass* runs the
frozen op plus the branch and pays for passes over the activations. Small-rank GEMMs, adds and
copies are memory-bound, so a pass costs more than its multiply-adds: each element of a pass is
weighed by the device's bandwidth-to-compute ratio (:data:`PASS_COST`: activations and weights
apart).
"""

from __future__ import annotations

from dataclasses import dataclass

#: multiply-adds that one element of a pass costs, per device type: ``(activation, weight)``, the
#: weight figure for a training step (without grads merged pays one pass at the activation cost).
#: CPU: fitted to one training step of every algorithm's adapted layer at the 16 Linear shapes and
#: position counts of an SD1.5 UNet at 32×32 latents (2-core AMD EPYC, one thread, 2026-12-07:
#: the time lost to wrong picks is 0.35 s over 8 algorithms × 160 layers, from 1.1 s with the
#: earlier single constant 128), then checked on the whole UNet (benchmarks/unet_step.py): there
#: a weight-sized pass costs more than alone (the step's working set is far beyond the caches), and
#: a weight pass cost of 32 left LoHa's 320-channel layers merged at 1.11× against 1.06× bypass;
#: 256 costs the per-layer fit nothing. CUDA: an estimate from an H100's bandwidth-to-bf16-compute
#: ratio, not yet measured.
PASS_COST = {"cpu": (16, 256), "cuda": (512, 512)}
#: devices not listed above are costed like the CPU
DEFAULT_PASS_COST = PASS_COST["cpu"]


@dataclass(frozen=True)
class Costs:
    """What one adapted layer costs per forward mode, as its algorithm counts it."""

    bypass: int | None  # multiply-adds of the bypass branch for the call's positions; None: never cheaper
    delta: int  # multiply-adds to build the merged weight from the adapter's parameters
    passes: int = 4  # extra activation-size memory passes of a bypass training step (op traces)


def with_dora(costs: Costs) -> Costs:
    """DoRA in bypass also builds ΔW for the column norm, then scales the output by ``g`` and blends
    it: ΔW's multiply-adds and about 5 more passes."""
    if costs.bypass is None:
        return costs
    return Costs(costs.bypass + costs.delta, costs.delta, costs.passes + 5)


def bypass_is_cheaper(
    costs: Costs, *, tokens: int, weight_numel: int, width: int, device_type: str, grad: bool
) -> bool:
    """Whether bypass costs less than merged for a call over ``tokens`` positions of a layer with
    ``weight_numel`` weights and ``width`` channels (the wider side), with or without adapter grads.

    With grads, merged pays the forward, the input grad and a full-size weight grad plus building ΔW
    (forward and backward); bypass the frozen op's forward and input grad plus the branch (forward
    and backward) and its activation passes. Without grads, each pays its forward only.
    """
    if costs.bypass is None:
        return False
    activation_pass, weight_pass = PASS_COST.get(device_type, DEFAULT_PASS_COST)
    base = tokens * weight_numel
    activations = tokens * width * activation_pass
    if grad:
        bypass = 2 * base + 3 * costs.bypass + activations * costs.passes
        return bypass < 3 * base + 3 * costs.delta + 2 * weight_numel * weight_pass
    # without grads merged writes W' once and the op reads it at once: one pass, costed like an
    # activation pass (the training figure includes the backward's full-size gradients)
    return costs.bypass + activations * max(costs.passes // 2, 1) < costs.delta + weight_numel * activation_pass

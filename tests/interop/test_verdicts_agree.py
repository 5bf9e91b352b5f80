"""``info``'s ComfyUI and A1111 verdicts agree with what the tools' reference loaders do, module by
module, for every algorithm and variant we write, on SD1, SD2 and SDXL.

Unlike ``test_parity.py`` (which states per case what each tool should do), this test lets the
reference loaders (``comfyui_ref``, ``a1111_ref``: reproductions of the tools' code, failures
included) decide: a module the tool leaves out (unmatched, a caught error, a partial OpenCLIP
attention) must be in ``info``'s ``skipped``; a module it applies with weights other than our merge
at strength 1 (fp32, rtol 1e-5, atol 1e-6) in ``deviating``; every other module must load exactly.
A whole-file failure must read "does not load".
"""

from __future__ import annotations

import pytest
import torch

from higanbana.formats.inspect import file_info
from higanbana.models.tiny import tiny_sd_parts

from . import a1111_ref, comfyui_ref
from .test_parity import FULL, NORMS, _saved_and_merged, a1111_merge, comfy_merge

VARIANTS = [
    ("lora", "lora", {"rank": 2}, FULL),
    ("lora-alpha", "lora", {"rank": 2, "alpha": 1}, FULL),
    ("locon-tucker", "lora", {"rank": 2, "use_tucker": True}, FULL),
    ("dora", "lora", {"rank": 2, "weight_decompose": True}, FULL),
    ("dora-input", "lora", {"rank": 2, "weight_decompose": True, "wd_on_output": False}, FULL),
    ("loha", "loha", {"rank": 2, "alpha": 1}, FULL),
    ("loha-tucker", "loha", {"rank": 2, "use_tucker": True}, FULL),
    ("loha-dora-input", "loha", {"rank": 2, "weight_decompose": True, "wd_on_output": False}, FULL),
    ("lokr", "lokr", {"rank": 2, "factor": 4}, FULL),
    ("lokr-both", "lokr", {"rank": 1, "factor": 8, "decompose_both": True}, FULL),
    ("lokr-full-rank", "lokr", {"rank": 64, "alpha": 3, "factor": 4}, FULL),
    ("lokr-full-matrix", "lokr", {"factor": 4, "full_matrix": True}, FULL),
    ("lokr-unbalanced", "lokr", {"rank": 2, "factor": 4, "unbalanced_factorization": True}, FULL),
    ("lokr-tucker", "lokr", {"rank": 2, "factor": 2, "use_tucker": True}, FULL),
    ("lokr-dora-input", "lokr", {"rank": 2, "factor": 4, "weight_decompose": True, "wd_on_output": False}, FULL),
    ("ia3", "ia3", {}, FULL),
    ("ia3-input", "ia3", {"on_input": True}, FULL),
    ("glora", "glora", {"rank": 2}, FULL),
    ("glora-rank-1", "glora", {"rank": 1}, FULL),
    ("glora-tucker", "glora", {"rank": 2, "use_tucker": True}, FULL),
    ("oft", "oft", {"rank": 4}, FULL),
    ("oft-constraint", "oft", {"rank": 4, "constraint": 1e-3}, FULL),
    ("oft-rescaled", "oft", {"rank": 4, "rescaled": True}, FULL),
    ("boft", "boft", {"rank": 2}, FULL),
    ("boft-1-stage", "boft", {"rank": 4, "boft_stages": 1}, FULL),
    ("boft-constraint-rescaled", "boft", {"rank": 4, "constraint": 1e-3, "rescaled": True}, FULL),
    ("full", "full", {}, FULL),
    ("norm", "norm", {}, NORMS),
]
KINDS = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    return tiny_sd_parts(request.param, seed=0)


def _close(got, expected) -> bool:
    (w, b), (ew, eb) = got, expected
    if not torch.allclose(w, ew, rtol=1e-5, atol=1e-6):
        return False
    return eb is None or (b is not None and torch.allclose(b, eb, rtol=1e-5, atol=1e-6))


def _expected(where, after, merged, left_out) -> tuple[str, set[str], set[str]]:
    """(status, skipped, deviating) from what a reference loader did."""
    skipped = {n for n in where if n in left_out}
    deviating = {n for n in where if n not in skipped and not _close(merged[where[n]], after[where[n][0]][where[n][1]])}
    if skipped == set(where):
        return "does not load", skipped, deviating
    status = "loads partly" if skipped else "loads with deviation" if deviating else "loads"
    return status, skipped, deviating


def _check(path, tool, status, skipped, deviating, label):
    verdict = {v["tool"]: v for v in file_info(path)["compatibility"]}[tool]
    assert verdict["status"] == status, f"{label}: {tool} {status}, info says {verdict}"
    if status == "does not load":
        return
    assert set(verdict["skipped"]) == skipped, f"{label}: {tool} leaves out {sorted(skipped)[:4]}…; info {verdict}"
    assert set(verdict["deviating"]) == deviating, f"{label}: {tool} deviates on {sorted(deviating)[:4]}…"


@pytest.mark.slow
@pytest.mark.parametrize(("label", "algo", "options", "config"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_info_agrees_with_comfyui_and_a1111(model, label, algo, options, config, tmp_path):
    path, before, after, where = _saved_and_merged(model, algo, options, config, tmp_path)
    label = f"{model.kind}-{label}"
    try:
        merged, unloaded = comfy_merge(model, path, before)
    except comfyui_ref.ComfyCrash:
        _check(path, "ComfyUI", "does not load", set(), set(), label)
    else:
        left_out = {k.partition(".")[0] for k in unloaded}
        _check(path, "ComfyUI", *_expected(where, after, merged, left_out), label)
    try:
        merged, unsupported = a1111_merge(model, path, before, where)
    except a1111_ref.GenerationFailed:
        _check(path, "A1111", "does not load", set(), set(), label)
    else:
        _check(path, "A1111", *_expected(where, after, merged, set(unsupported)), label)

"""Our files load in the real lycoris-lora (4.1.3) with the same forward, and ``info``'s LyCORIS verdict
says what happens: the other direction of ``test_lycoris_files.py``.

In the peers' venv (``.venv-bench``, where higanbana is installed too) ``lycoris_reads_ours_run.py``
builds our network of every algorithm and variant (Tucker, DoRA on either axis, constraint,
rescaled, LoKr factor/decompose/full-matrix/unbalanced splits, OFT/BOFT block sizes and stages) on
tiny SD1, SD2 and SDXL UNets with LyCORIS's standalone ``lycoris_`` prefix, on their Linear and Conv2d
layers (norms for ``norm``), randomises and saves it; then ``lycoris.create_lycoris_from_weights``
rebuilds it on a fresh copy of the UNet, ``apply_to`` wraps the layers, and the two outputs are
compared. What LyCORIS did decides the expected verdict: every module loaded with the same output
(≤ 1e-5 relative) → "loads"; loaded with another output → "loads with deviation"; some modules
left out → "loads partly"; an exception or no module loaded → "does not load". ``info`` must agree on every file.

LyCORIS' own limits met here (docs/compatibility.md): it cannot load IA3 files at all, its own
included (``IA3Module.weight_list`` extracts ``weight`` and ``on_input`` but
``make_module_from_state_dict`` takes only ``weight``: a TypeError); it rebuilds Diag-OFT with the
smaller factor of ``out`` as the block size, BOFT always with log2(n)+1 stages (a one-stage file is
broadcast into every stage: a silently different result), LoKr from a factor it infers from the
shapes (Tucker and unbalanced splits do not survive), and DoRA only on the output axis.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from higanbana.formats.inspect import file_info

from .test_lycoris_files import PEERS_PYTHON, _lycoris_available

RUNNER = Path(__file__).with_name("lycoris_reads_ours_run.py")

VARIANTS = [
    ("lora", "lora", {"rank": 4}),
    ("lora-alpha", "lora", {"rank": 4, "alpha": 2}),
    ("lora-rs", "lora", {"rank": 4, "alpha": 2, "rs_lora": True}),
    ("lora-scalar", "lora", {"rank": 4, "use_scalar": True}),
    ("lora-tucker", "lora", {"rank": 4, "use_tucker": True}),
    ("dora", "lora", {"rank": 4, "weight_decompose": True}),
    ("dora-input", "lora", {"rank": 4, "weight_decompose": True, "wd_on_output": False}),
    ("loha", "loha", {"rank": 4, "alpha": 2}),
    ("loha-tucker", "loha", {"rank": 4, "use_tucker": True}),
    ("loha-dora", "loha", {"rank": 4, "weight_decompose": True}),
    ("loha-dora-input", "loha", {"rank": 4, "weight_decompose": True, "wd_on_output": False}),
    ("lokr", "lokr", {"rank": 4, "factor": 4}),
    ("lokr-default", "lokr", {"rank": 4}),
    ("lokr-tucker", "lokr", {"rank": 2, "factor": 2, "use_tucker": True}),
    ("lokr-both", "lokr", {"rank": 1, "factor": 8, "decompose_both": True}),
    ("lokr-fullrank", "lokr", {"rank": 64, "alpha": 3, "factor": 4}),
    ("lokr-fullmatrix", "lokr", {"factor": 4, "full_matrix": True}),
    ("lokr-unbalanced", "lokr", {"rank": 2, "factor": 4, "unbalanced_factorization": True}),
    ("lokr-dora", "lokr", {"rank": 4, "factor": 4, "weight_decompose": True}),
    ("lokr-dora-input", "lokr", {"rank": 4, "factor": 4, "weight_decompose": True, "wd_on_output": False}),
    ("ia3", "ia3", {}),
    ("ia3-input", "ia3", {"on_input": True}),
    ("glora", "glora", {"rank": 4}),
    ("glora-tucker", "glora", {"rank": 4, "use_tucker": True}),
    ("oft", "oft", {"rank": 4}),
    ("oft-2", "oft", {"rank": 2}),
    ("oft-8", "oft", {"rank": 8}),
    ("oft-constraint", "oft", {"rank": 4, "constraint": 1e-3}),
    ("oft-rescaled", "oft", {"rank": 4, "rescaled": True}),
    ("boft", "boft", {"rank": 4}),
    ("boft-2", "boft", {"rank": 2}),
    ("boft-8", "boft", {"rank": 8}),
    ("boft-1-stage", "boft", {"rank": 4, "boft_stages": 1}),
    ("boft-2-stages", "boft", {"rank": 4, "boft_stages": 2}),
    ("boft-constraint-rescaled", "boft", {"rank": 4, "constraint": 1e-3, "rescaled": True}),
    ("full", "full", {}),
    ("norm", "norm", {}),
]
CASES = [
    [f"{kind}-{label}", kind, algo, options, "lycoris", False]
    for kind in ("sd1", "sd2", "sdxl")
    for label, algo, options in VARIANTS
]
CASES.append(["sd1-lora-kohya-names", "sd1", "lora", {"rank": 4}, "lora_unet", False])  # 0 modules matched
#: files LyCORIS cannot rebuild as written, after ``convert --for lycoris`` (Tucker w2 dense, BOFT stages)
CONVERTED = [
    [f"{kind}-{label}-for-lycoris", kind, algo, options, "lycoris", True]
    for kind in ("sd1", "sd2", "sdxl")
    for label, algo, options in VARIANTS
    if label in ("lokr-tucker", "boft-1-stage", "boft-2-stages")
]
CASES += CONVERTED

#: LyCORIS 4.1.3's bug: IA3 files (its own too) fail in make_module_from_state_dict
IA3_BUG = "make_module_from_state_dict() takes 4 positional arguments but 5 were given"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not _lycoris_available():
        pytest.skip(f"lycoris-lora is not importable by {PEERS_PYTHON} (make peers builds it)")
    folder = tmp_path_factory.mktemp("lycoris-reads-ours")
    proc = subprocess.run(
        [str(PEERS_PYTHON), str(RUNNER), str(folder), json.dumps(CASES)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return rows


def _what_lycoris_did(row: dict) -> str:
    if "failed" in row or row["loaded"] == 0:
        return "does not load"
    if row["loaded"] < row["modules"]:
        return "loads partly"
    return "loads" if row["error"] <= 1e-5 else "loads with deviation"


@pytest.mark.slow
def test_every_case_ran_and_changes_the_output(results):
    assert set(results) == {c[0] for c in CASES}
    assert all(row["effect"] > 1e-2 for row in results.values())  # the adapters change the output


@pytest.mark.slow
@pytest.mark.parametrize("label", [c[0] for c in CASES])
def test_info_lycoris_verdict_is_what_lycoris_does(results, label):
    row = results[label]
    verdict = {v["tool"]: v for v in file_info(row["path"])["compatibility"]}["LyCORIS"]
    assert verdict["status"] == _what_lycoris_did(row), f"{label}: LyCORIS did {row}; info says {verdict}"
    if verdict["status"] != "loads":
        assert verdict["notes"], label  # and says why


@pytest.mark.slow
def test_lycoris_loads_most_of_our_files_exactly(results):
    exact = [label for label, row in results.items() if _what_lycoris_did(row) == "loads"]
    assert len(exact) >= 3 * 25  # the defaults of every algorithm but IA3, and most variants, on each model
    for algo in ("lora", "dora", "loha", "lokr", "glora", "oft", "boft", "full", "norm"):
        assert all(f"{kind}-{algo}" in exact for kind in ("sd1", "sd2", "sdxl")), algo


@pytest.mark.slow
def test_convert_for_lycoris_makes_lycoris_load_what_it_could_not(results):
    for label, *_ in CONVERTED:
        original = label.removesuffix("-for-lycoris")
        assert _what_lycoris_did(results[original]) != "loads", original
        assert _what_lycoris_did(results[label]) == "loads", f"{label}: {results[label]}"


@pytest.mark.slow
def test_lycoris_ia3_loading_bug_is_still_there(results):
    for label in ("sd1-ia3", "sd2-ia3", "sdxl-ia3"):
        assert IA3_BUG in results[label].get("failed", ""), f"{label}: {results[label]}"

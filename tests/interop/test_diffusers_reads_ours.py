"""Our kohya-named files load in the real diffusers (``load_lora_weights`` + ``fuse_lora``) exactly as
``info``'s diffusers verdict says.

In the peers' venv (``.venv-bench``: diffusers 0.42.1 with peft 0.21.2, higanbana installed there too)
``diffusers_reads_ours_run.py`` builds our network of each case on a tiny SD1, SD2 and SDXL model (UNet and
text encoders; SGM names for the SDXL UNet, as kohya writes them), randomises and saves it, and records
our merged weights; then a ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` assembled from a
fresh copy of the same parts loads the file and fuses it at scale 1. What diffusers did decides the
expected verdict: an exception → "does not load"; some of our modules left without a LoRA layer →
"loads partly"; every one wrapped but some fused to other weights (fp32, rtol 1e-5, atol 1e-6) →
"loads with deviation"; every one equal to ours → "loads". ``info`` must agree on every file, name the
deviating/skipped modules, and give notes for anything but "loads".

What diffusers 0.42.1 does with our files (``loaders/lora_pipeline.py`` ``lora_state_dict``,
``loaders/lora_conversion_utils.py`` ``_convert_non_diffusers_lora_to_diffusers``, ``loaders/peft.py``):
it drops every ``dora_scale`` key with a warning (DoRA loads as plain LoRA); it converts only
``lora_down``/``lora_up``/``alpha`` of each module and raises ``ValueError`` ("The following keys have
not been correctly renamed") on anything left over (``lora_mid``, LoHa's ``hada_*``, LoKr's
``lokr_*``), so one such module fails the whole file; every module of our presets and every Linear and
Conv2d of the tiny UNets and text encoders (conv_in/out, time and SDXL label embeddings, resnet and
sampler convs, SDXL's ``text_projection``) maps to a layer and fuses to our weights.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from higanbana.formats.inspect import file_info

from .test_lycoris_files import PEERS_PYTHON

RUNNER = Path(__file__).with_name("diffusers_reads_ours_run.py")

#: every Linear and Conv2d of the UNet and the text encoders (beyond the presets: label_emb, text_projection)
EVERY_LAYER = {"unet": {"layers": ["Linear", "Conv2d"]}, "text_encoder": {"layers": ["Linear"]}}
VARIANTS = [
    ("lora", "attn-mlp", "lora", {"rank": 2}, False),
    ("locon", "full", "lora", {"rank": 2}, False),
    ("lora-alpha", "full", "lora", {"rank": 2, "alpha": 1}, False),
    ("lora-every-layer", EVERY_LAYER, "lora", {"rank": 2}, False),
    ("locon-tucker", "full", "lora", {"rank": 2, "use_tucker": True}, False),
    ("dora", "full", "lora", {"rank": 2, "weight_decompose": True}, False),
    ("loha", "full", "loha", {"rank": 2}, False),
    ("lokr", "full", "lokr", {"rank": 2}, False),
    ("locon-tucker-for-diffusers", "full", "lora", {"rank": 2, "use_tucker": True}, True),
]
CASES = [
    [f"{kind}-{label}", kind, preset, algo, options, for_diffusers]
    for kind in ("sd1", "sd2", "sdxl")
    for label, preset, algo, options, for_diffusers in VARIANTS
]
#: diffusers 0.42.1's _convert_non_diffusers_lora_to_diffusers on keys it has no rule for
NOT_RENAMED = "ValueError: The following keys have not been correctly renamed"
DORA_DROPPED = "we are going to filter out the keys associated to 'dora_scale`"


def _diffusers_available() -> bool:
    if not PEERS_PYTHON.exists():
        return False
    probe = subprocess.run([str(PEERS_PYTHON), "-c", "import diffusers, peft, higanbana"], capture_output=True)
    return probe.returncode == 0


def run_in_peers(runner: Path, folder: Path, cases: list) -> dict:
    """Run a ``*_run.py`` script in the peers' venv (one thread) on ``cases``; its last stdout line is JSON."""
    if not _diffusers_available():
        pytest.skip(f"diffusers with peft is not importable by {PEERS_PYTHON} (make peers builds it)")
    proc = subprocess.run(
        [str(PEERS_PYTHON), str(runner), str(folder), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_in_peers(RUNNER, tmp_path_factory.mktemp("diffusers-reads-ours"), CASES)


def _what_diffusers_did(row: dict) -> str:
    if "failed" in row or not row["applied"]:
        return "does not load"
    if row["not_applied"]:
        return "loads partly"
    return "loads with deviation" if row["differing"] or row["stray"] else "loads"


def _verdict(row: dict) -> dict:
    return {v["tool"]: v for v in file_info(row["path"])["compatibility"]}["diffusers"]


@pytest.mark.slow
def test_every_case_ran(results):
    assert set(results) == {c[0] for c in CASES}
    for label, row in results.items():
        assert row["modules"], label
        if "failed" not in row:
            assert not row["stray"], f"{label}: diffusers changed layers we do not target: {row['stray'][:5]}"


@pytest.mark.slow
@pytest.mark.parametrize("label", [c[0] for c in CASES])
def test_info_diffusers_verdict_is_what_diffusers_does(results, label):
    row = results[label]
    verdict = _verdict(row)
    did = _what_diffusers_did(row)
    shown = {k: (v[:4] if isinstance(v, list) else v) for k, v in row.items()}
    assert verdict["status"] == did, f"{label}: diffusers did {did} ({shown}); info says {verdict}"
    if did != "loads":
        assert verdict["notes"], label  # and says why
    if did == "loads with deviation":
        assert set(verdict["deviating"]) == set(row["differing"]), label
    if did == "loads partly":
        assert set(verdict["skipped"]) == set(row["not_applied"]), label


@pytest.mark.slow
def test_diffusers_loads_our_lora_and_locon_exactly(results):
    for kind in ("sd1", "sd2", "sdxl"):
        for label in ("lora", "locon", "lora-alpha", "lora-every-layer"):
            row = results[f"{kind}-{label}"]
            assert _what_diffusers_did(row) == "loads", f"{kind}-{label}: {row}"
            assert any(name.startswith("lora_te") for name in row["matching"])  # text encoders too
    sdxl = results["sdxl-lora-every-layer"]["matching"]
    assert "lora_te2_text_projection" in sdxl and any("label_emb" in name for name in sdxl)


@pytest.mark.slow
def test_diffusers_rejects_tucker_loha_lokr_and_convert_makes_tucker_load(results):
    for kind in ("sd1", "sd2", "sdxl"):
        for label, key in (("locon-tucker", "lora_mid"), ("loha", "hada_w1_a"), ("lokr", "lokr_w1")):
            failed = results[f"{kind}-{label}"].get("failed", "")
            assert failed.startswith(NOT_RENAMED) and key in failed, f"{kind}-{label}: {failed}"
        assert _what_diffusers_did(results[f"{kind}-locon-tucker-for-diffusers"]) == "loads"


@pytest.mark.slow
def test_diffusers_drops_dora_scale_and_fuses_plain_lora(results):
    for kind in ("sd1", "sd2", "sdxl"):
        row = results[f"{kind}-dora"]
        assert any(DORA_DROPPED in line for line in row["warnings"]), row["warnings"]
        assert row["applied"] == row["modules"] and set(row["differing"]) == set(row["modules"])

"""``higanbana evaluate`` end to end on a tiny random SD1 pipeline and tiny random encoders of the
real architectures (DINOv2, CLIP, VGG-19), with a trained-looking LoRA checkpoint."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from higanbana.errors import ConfigError, HiganbanaError
from higanbana.evaluate.config import EvalConfig
from higanbana.evaluate.run import evaluate
from higanbana.formats.sd_network import save_sd_network, sd_network
from higanbana.models.tiny import save_tiny_sd, tiny_sd_parts
from tests.tiny_encoders import save_tiny_encoders
from tests.train.test_trainer import make_images


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    parts = tiny_sd_parts("sd1", seed=0, with_vae=True)
    save_tiny_sd(parts, root / "sd1")
    encoders = save_tiny_encoders(root / "encoders")
    make_images(root / "toy", count=3, caption="sks stuffed toy, red")
    make_images(root / "paint", count=2, caption="zkz style, a house")
    (root / "concepts.toml").write_text(
        '[[concept]]\nname = "toy"\ntrigger = "sks"\nclass_word = "stuffed toy"\ncategory = "object"\nimages = "toy"\n'
        '[[concept]]\nname = "paint"\ntrigger = "zkz"\nclass_word = "style"\ncategory = "style"\nimages = "paint"\n',
        encoding="utf-8",
    )
    checkpoints = []
    for i, (algo, opts) in enumerate([("lora", {"rank": 2}), ("lokr", {"rank": 2, "factor": 4})]):
        net = sd_network(tiny_sd_parts("sd1", seed=0), "attn-mlp", algo, **opts)
        torch.manual_seed(i)
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.2)
        path = save_sd_network(net, root / f"{algo}.safetensors", "sd1")
        checkpoints.append(
            f'[[checkpoints]]\nname = "{algo}"\npath = "{path.name}"\nparams = {{ algo = "{algo}", lr = {i + 1} }}\n'
        )
    config = root / "eval.toml"
    config.write_text(
        f'[model]\npretrained = "sd1"\n[concepts]\nfile = "concepts.toml"\n'
        f"[prompts]\nn_images = 3\n"
        f"[generation]\nsteps = 2\nwidth = 32\nheight = 32\nbatch_size = 2\n"
        f'[encoders]\ndinov2 = "{encoders["dinov2"]}"\nclip = "{encoders["clip"]}"\nvgg19 = "{encoders["vgg19"]}"\n'
        f"image_size = 56\nbatch_size = 4\n"
        f'[output]\ndir = "out"\n[report]\ndevice = "cpu"\nfeatures = ["algo", "lr"]\n' + "".join(checkpoints),
        encoding="utf-8",
    )
    return root, config


def test_evaluate_produces_every_artefact_and_caches(world):
    root, config_path = world
    config = EvalConfig.load(config_path)
    result = evaluate(config, progress=False, log=lambda _m: None)
    out = root / "out"
    raw = pd.read_csv(out / "raw_metrics.csv")
    assert set(raw["model"]) == {"base", "lora", "lokr"}
    assert set(raw["prompt_type"]) == {"train", "trigger", "alter", "style"}
    # the style concept has no <style> prompts (as in the paper); style loss only for fine-tuned models
    style = raw[raw["metric"] == "style_loss"]
    assert set(style["model"]) == {"lora", "lokr"} and set(style["concept"]) == {"toy"}
    assert (style["value"] > 0).all()
    for metric in ("fidelity_cos", "fidelity_scd", "text_alignment", "vendi"):
        assert raw[raw["metric"] == metric]["value"].notna().all(), metric
    vendi = raw[raw["metric"] == "vendi"]["value"]
    assert ((vendi >= 1 - 1e-6) & (vendi <= 3 + 1e-6)).all()  # between 1 and the number of images
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64" in html and "http://" not in html.replace("http://www.w3.org", "")
    assert result.ranking is not None and set(result.ranking.columns) == {"lora", "lokr"}
    images = sorted((out / "images" / "lora").rglob("*.png"))
    assert len(images) == 3 * (4 + 3)  # toy: 4 prompt types, paint: 3 (no <style>)
    # base and fine-tuned images pair by prompt and seed: the same file layout
    assert {p.relative_to(out / "images" / "lora") for p in images} == {
        p.relative_to(out / "images" / "base") for p in (out / "images" / "base").rglob("*.png")
    }
    # the adapter changes what the model draws
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(out / "images" / "base" / "toy" / "trigger" / "0000.png"), dtype=float)
    b = np.asarray(Image.open(out / "images" / "lora" / "toy" / "trigger" / "0000.png"), dtype=float)
    assert np.abs(a - b).mean() > 0.5
    # a re-run generates nothing and reads the cached features
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    features = {p: p.stat().st_mtime_ns for p in (out / "features").rglob("*.safetensors")}
    # a killed run's temporaries (a dead writer's pid in the name) are removed by the next run
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    stale = [
        out / "images" / "base" / "toy" / "trigger" / f".0000.png.{dead}.tmp.png",
        out / "features" / "dinov2" / "base" / "toy" / f".trigger.safetensors.{dead}.tmp",
        out / f".report.html.{dead}.tmp",
    ]
    for path in stale:
        path.write_bytes(b"half")
    again = evaluate(EvalConfig.load(config_path), progress=False, log=lambda _m: None)
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == stamps
    assert {p: p.stat().st_mtime_ns for p in (out / "features").rglob("*.safetensors")} == features
    pd.testing.assert_frame_equal(again.raw.reset_index(drop=True), result.raw.reset_index(drop=True))
    assert not [p for p in stale if p.exists()]
    # other generation settings in the same folder are refused, not mixed in
    with pytest.raises(HiganbanaError, match="other settings .*steps"):
        evaluate(EvalConfig.load(config_path, ["generation.steps=3"]), progress=False, log=lambda _m: None)


def test_config_errors(world, tmp_path):
    _root, config_path = world
    with pytest.raises(ConfigError, match=r"prompts.types: unknown type 'alt' \(did you mean 'alter'\?\)"):
        EvalConfig.load(config_path, ['prompts.types=["alt"]'])
    with pytest.raises(ConfigError, match=r"generation.step: unknown key \(did you mean 'steps'\?\)"):
        EvalConfig.load(config_path, ["generation.step=3"])
    text = config_path.read_text(encoding="utf-8").replace('name = "lokr"', 'name = "lora"')
    dup = tmp_path / "dup.toml"
    dup.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="used twice"):
        EvalConfig.load(dup)
    with pytest.raises(ConfigError, match=r"alter_templates: unknown category 'objects' \(did you mean 'object'\?\)"):
        EvalConfig.load(config_path, ['prompts.alter_templates={objects = ["{}, red"]}'])
    with pytest.raises(ConfigError, match=r"prompts.style_templates must be a list of strings, each with exactly one"):
        EvalConfig.load(config_path, ['prompts.style_templates=["red"]'])
    ok = EvalConfig.load(config_path, ['prompts.alter_templates={object = ["{}, red"]}'])
    assert ok.prompts.alter_templates == {"object": ["{}, red"]}
    config = EvalConfig.load(config_path, ['encoders.dinov2=""', f'output.dir="{tmp_path / "o"}"'])
    with pytest.raises(HiganbanaError, match="encoders.dinov2 not set"):
        evaluate(config, progress=False, log=lambda _m: None)
    assert not os.path.exists(tmp_path / "o")  # refused before any image is generated: nothing written


class Brightness:
    """A test quality scorer plugged in by name (higher = brighter)."""

    name = "brightness"

    def __init__(self, device=None):
        self.device = device

    def score(self, images):
        import numpy as np

        return torch.tensor([float(np.asarray(im, dtype=float).mean()) for im in images])


def test_quality_scorer_plugs_in_and_trigger_processing_reaches_clip(world, tmp_path):
    root, config_path = world
    config = EvalConfig.load(
        config_path,
        [
            f'output.dir="{root / "out"}"',
            'encoders.quality="tests.evaluate.test_evaluate:Brightness"',
            'prompts.types=["trigger"]',
        ],
    )
    result = evaluate(config, progress=False, log=lambda _m: None)
    quality = result.raw[result.raw["metric"] == "quality"]
    assert len(quality) == 3 * 2 and (quality["value"] > 0).all()
    # CLIP reads the processed prompt: the object's trigger is replaced by its class word
    import json

    items = json.loads((root / "out" / "prompts.json").read_text(encoding="utf-8"))
    toy = next(it for it in items if it["concept"] == "toy")
    assert toy["prompt"] == "sks stuffed toy" and toy["clip_text"] == "stuffed toy"
    from higanbana.evaluate.encoders import load_encoder
    from higanbana.evaluate.prompts import Concept, build_prompt_set

    clip = load_encoder("clip", config.encoders.clip)
    a = build_prompt_set(Concept("a", "sks", "stuffed toy", "object"), "alter", n_images=3)
    b = build_prompt_set(Concept("b", "qwv", "stuffed toy", "object"), "alter", n_images=3)
    assert [x.prompt for x in a] != [x.prompt for x in b]
    ta = clip.encode_texts([x.clip_text for x in a])
    tb = clip.encode_texts([x.clip_text for x in b])
    assert torch.equal(ta, tb)  # text similarity does not depend on the trigger word


def test_a_toy_metric_is_one_declaration_measured_aggregated_ranked_and_reported(world):
    """One registered declaration, nothing else: the toy metric is measured on its prompt types, lands in
    the raw and normalised tables (its direction honoured), ranks its own criterion, enters the
    correlations and the report; the registry is restored afterwards and the other metrics are untouched."""
    from safetensors.torch import load_file

    from higanbana.evaluate import aggregate as agg
    from higanbana.evaluate import metrics as M

    root, config_path = world
    out = root / "out"
    config = EvalConfig.load(config_path, [f'output.dir="{out}"'])
    toy = M.Metric(
        name="toy_norm",
        criterion="Toyness",
        direction="lower",
        label="Toy feature norm",
        inputs=("image_features",),
        compute=lambda image_features: float(image_features.double().norm(dim=1).mean()),
        prompt_types=("trigger", "alter"),
        ranked_on=("trigger", "alter"),
    )
    before = M.registry()
    with M.registered(toy):
        result = evaluate(config, progress=False, log=lambda _m: None)
        fid = agg.fidelity_correlations(agg.correlations(agg.rank_normalize(result.raw)))
    assert M.registry() == before  # nothing left behind

    raw = agg.load_table(out / "raw_metrics.csv")
    rows = raw[raw["metric"] == "toy_norm"]
    assert set(rows["prompt_type"]) == {"trigger", "alter"} and set(rows["concept"]) == {"toy", "paint"}
    assert set(rows["model"]) == {"base", "lora", "lokr"} and len(rows) == 3 * 2 * 2
    one = rows[(rows["model"] == "lora") & (rows["concept"] == "toy") & (rows["prompt_type"] == "alter")]
    z = load_file(out / "features" / "dinov2" / "lora" / "toy" / "alter.safetensors")["features"]
    assert float(one["value"].iloc[0]) == pytest.approx(float(z.double().norm(dim=1).mean()), rel=1e-12)
    scores = agg.load_table(out / "scores.csv")
    toy_scores = scores[scores["metric"] == "toy_norm"]
    assert set(toy_scores["model"]) == {"lora", "lokr"}  # the base model is the reference
    for (_concept, _pt), group in toy_scores.groupby(["concept", "prompt_type"]):
        if group["value"].nunique() == 2:  # lower is better: the smaller norm scores 1
            assert group.loc[group["value"].idxmin(), "score"] == 1.0
    assert "Toyness" in result.ranking.index and set(result.ranking.columns) == {"lora", "lokr"}
    ranking = pd.read_csv(out / "ranking.csv").set_index("criterion")
    assert list(ranking.index) == ["Fidelity", "Controllability", "Diversity", "Base preservation", "Toyness"]
    corr = pd.read_csv(out / "correlations.csv")
    assert {"toy_norm/trigger", "toy_norm/alter"} <= set(corr.columns) and "toy_norm/train" not in set(corr.columns)
    assert ("fidelity_cos/train", "toy_norm/alter") in fid.index
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Toy feature norm &lt;trigger&gt;" in html and "Toy feature norm &lt;alter&gt;" in html
    assert "<th>Toyness</th>" in html

    # without the declaration: no toy anywhere, and every other value as it was
    again = evaluate(config, progress=False, log=lambda _m: None)
    assert "toy_norm" not in set(again.raw["metric"]) and "Toyness" not in again.ranking.index
    assert "Toy feature norm" not in (out / "report.html").read_text(encoding="utf-8")
    kept = result.raw[result.raw["metric"] != "toy_norm"].reset_index(drop=True)
    pd.testing.assert_frame_equal(again.raw.reset_index(drop=True), kept)


def test_every_config_field_is_documented():
    import dataclasses
    from pathlib import Path

    from higanbana.evaluate.config import Checkpoint
    from higanbana.schema import sections_of

    text = (Path(__file__).resolve().parents[2] / "docs" / "evaluation.md").read_text(encoding="utf-8")
    for section, cls in sections_of(EvalConfig).items():
        assert f"`[{section}]`" in text, section
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in text, f"{section}.{f.name}"
    for f in dataclasses.fields(Checkpoint):
        assert f"`{f.name}`" in text, f"checkpoints.{f.name}"


@pytest.mark.slow
def test_two_processes_split_generation(world, tmp_path):
    """torchrun with 2 CPU processes: the images are split between them and equal the one-process ones."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image

    _root, config_path = world
    types = 'prompts.types=["trigger","alter"]'
    one = EvalConfig.load(config_path, [f'output.dir="{tmp_path / "one"}"', types])
    evaluate(one, progress=False, log=lambda _m: None)
    repo = Path(__file__).resolve().parents[2]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29531",
        "-m",
        "higanbana",
        "evaluate",
        str(config_path),
        f'output.dir="{tmp_path / "two"}"',
        types,
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo / "src") + os.pathsep + str(repo)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=repo)
    assert done.returncode == 0, done.stderr[-3000:]
    a = sorted((tmp_path / "one" / "images").rglob("*.png"))
    b = sorted((tmp_path / "two" / "images").rglob("*.png"))
    assert [p.relative_to(tmp_path / "one") for p in a] == [p.relative_to(tmp_path / "two") for p in b]
    for pa, pb in zip(a, b, strict=True):
        diff = np.abs(np.asarray(Image.open(pa), dtype=float) - np.asarray(Image.open(pb), dtype=float))
        assert diff.mean() < 1.0, pa  # batches are composed differently: last-bit differences only
    raw_one = pd.read_csv(tmp_path / "one" / "raw_metrics.csv")
    raw_two = pd.read_csv(tmp_path / "two" / "raw_metrics.csv")
    assert len(raw_one) == len(raw_two)
    assert np.allclose(raw_one["value"], raw_two["value"], rtol=1e-2, atol=1e-3)


def test_sdxl_base_model(world, tmp_path):
    """The same evaluation on an SDXL base (two text encoders, its own pipeline)."""
    root, config_path = world
    save_tiny_sd(tiny_sd_parts("sdxl", seed=0, with_vae=True), tmp_path / "sdxl")
    net = sd_network(tiny_sd_parts("sdxl", seed=0), "attn-mlp", "lora", rank=2)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    lora = save_sd_network(net, tmp_path / "xl-lora.safetensors", "sdxl")
    text = config_path.read_text(encoding="utf-8").split("[[checkpoints]]")[0]
    text = text.replace('pretrained = "sd1"', f'pretrained = "{tmp_path / "sdxl"}"')
    text += f'[[checkpoints]]\nname = "xl"\npath = "{lora}"\nparams = {{ algo = "lora" }}\n'
    path = root / "xl.toml"
    path.write_text(text, encoding="utf-8")
    config = EvalConfig.load(path, [f'output.dir="{tmp_path / "out"}"', 'prompts.types=["trigger","style"]'])
    result = evaluate(config, progress=False, log=lambda _m: None)
    assert set(result.raw["model"]) == {"base", "xl"}
    assert (result.raw[result.raw["metric"] == "style_loss"]["value"] > 0).all()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_sd3_and_flux_base_models(world, tmp_path, family):
    """The same evaluation on SD3 and Flux (their pipelines and flow-matching sampler), with a LoKr in the
    split layout and a LoRA in kohya's fused layout: images differ from the base's, every metric is measured."""
    from higanbana.formats.dit_network import dit_network, save_dit_network
    from higanbana.models.tiny import save_tiny_dit, tiny_dit_parts

    root, config_path = world
    model = save_tiny_dit(tiny_dit_parts(family), tmp_path / family)
    lines = []
    for algo, opts, layout in (("lokr", {"rank": 2, "factor": 4}, "split"), ("lora", {"rank": 2}, "original")):
        net = dit_network(tiny_dit_parts(family).transformer, algo=algo, **opts)
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.2)
        path = save_dit_network(net, tmp_path / f"{algo}.safetensors", layout=layout)
        lines.append(f'[[checkpoints]]\nname = "{algo}"\npath = "{path}"\nparams = {{ algo = "{algo}" }}\n')
    text = config_path.read_text(encoding="utf-8").split("[[checkpoints]]")[0]
    text = text.replace('pretrained = "sd1"', f'pretrained = "{model}"') + "".join(lines)
    path = root / f"{family}.toml"
    path.write_text(text, encoding="utf-8")
    config = EvalConfig.load(path, [f'output.dir="{tmp_path / "out"}"', 'prompts.types=["trigger","style"]'])
    result = evaluate(config, progress=False, log=lambda _m: None)
    assert set(result.raw["model"]) == {"base", "lokr", "lora"}
    assert result.raw["value"].notna().all()
    images = tmp_path / "out" / "images"
    first = sorted((images / "base").rglob("*.png"))[0]
    for name in ("lokr", "lora"):
        other = images / name / first.relative_to(images / "base")
        assert other.read_bytes() != first.read_bytes()  # the adapter changed the generation

"""Bad input to ``higanbana evaluate``: every case is refused with one ``error:`` line naming the file,
section.key, checkpoint or concept, before any image is generated or any file written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from higanbana.schema import toml_value
from tests.bad_input.conftest import assert_refused, cli


@dataclass
class World:
    root: Path
    model: Path
    encoders: dict[str, Path]
    adapter: Path
    images: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from higanbana.formats.sd_network import save_sd_network, sd_network
    from higanbana.models.tiny import save_tiny_sd, tiny_sd_parts
    from tests.tiny_encoders import save_tiny_encoders
    from tests.train.test_trainer import make_images

    root = tmp_path_factory.mktemp("eval_world")
    model = save_tiny_sd(tiny_sd_parts("sd1", seed=0, with_vae=True), root / "sd1")
    encoders = save_tiny_encoders(root / "encoders")
    make_images(root / "toy", count=2, caption="sks stuffed toy, red")
    net = sd_network(tiny_sd_parts("sd1", seed=0), "attn-mlp", "lora", rank=2)
    adapter = save_sd_network(net, root / "lora.safetensors", "sd1")
    return World(root, model, {k: Path(v) for k, v in encoders.items()}, adapter, root / "toy")


def concepts_toml(world: World, name: str = "toy", extra: str = "") -> str:
    return (
        f'[[concept]]\nname = {toml_value(name)}\ntrigger = "sks"\nclass_word = "stuffed toy"\ncategory = "object"\n'
        f"images = {toml_value(str(world.images))}\n{extra}"
    )


def checkpoint(name: str, path: str, extra: str = "") -> str:
    return f"\n[[checkpoints]]\nname = {toml_value(name)}\npath = {toml_value(path)}\n{extra}"


def eval_toml(world: World, tmp: Path, checkpoints: str | None = None, concepts: Path | None = None) -> str:
    if concepts is None:
        concepts = tmp / "concepts.toml"
        concepts.write_text(concepts_toml(world), encoding="utf-8")
    e = world.encoders
    if checkpoints is None:
        checkpoints = checkpoint("lora", str(world.adapter))
    return (
        f"[model]\npretrained = {toml_value(str(world.model))}\n"
        f"[concepts]\nfile = {toml_value(str(concepts))}\n"
        '[prompts]\ntypes = ["trigger", "style"]\nn_images = 2\n'
        "[generation]\nsteps = 2\nwidth = 32\nheight = 32\n"
        f"[encoders]\ndinov2 = {toml_value(str(e['dinov2']))}\nclip = {toml_value(str(e['clip']))}\n"
        f"vgg19 = {toml_value(str(e['vgg19']))}\nimage_size = 56\n"
        f"[output]\ndir = {toml_value(str(tmp / 'out'))}\n"
        '[report]\ndevice = "cpu"\n' + checkpoints
    )


def write_eval(world: World, tmp: Path, **kw) -> Path:
    path = tmp / "eval.toml"
    path.write_text(eval_toml(world, tmp, **kw), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ overrides
#: (id, overrides, fragments); "{tmp}" is the test's folder
OVERRIDES = [
    ("n_images-zero", ["prompts.n_images=0"], ["prompts.n_images", "at least 1"]),
    ("n_images-negative", ["prompts.n_images=-1"], ["prompts.n_images"]),
    ("n_images-nan", ["prompts.n_images=nan"], ["prompts.n_images", "finite"]),
    ("seed_start-negative", ["prompts.seed_start=-1"], ["prompts.seed_start"]),
    ("prompt-type-typo", ['prompts.types=["alt"]'], ["prompts.types", "alter"]),
    ("style-template-no-slot", ['prompts.style_templates=["red"]'], ["prompts.style_templates", "{}"]),
    ("alter-category-typo", ['prompts.alter_templates={objects=["{}, red"]}'], ["alter_templates", "object"]),
    ("steps-zero", ["generation.steps=0"], ["generation.steps", "at least 1"]),
    ("cfg-nan", ["generation.cfg_scale=nan"], ["generation.cfg_scale", "finite"]),
    ("cfg-minus-inf", ["generation.cfg_scale=-inf"], ["generation.cfg_scale", "finite"]),
    ("cfg-negative", ["generation.cfg_scale=-1"], ["generation.cfg_scale", "at least 0"]),
    ("width-not-multiple-of-8", ["generation.width=30"], ["generation.width", "multiple of 8"]),
    ("height-zero", ["generation.height=0"], ["generation.height", "at least 8"]),
    ("batch_size-zero", ["generation.batch_size=0"], ["generation.batch_size", "at least 1"]),
    ("sampler-typo", ["generation.sampler='eular'"], ["generation.sampler"]),
    ("step-key-typo", ["generation.step=3"], ["generation.step", "steps"]),
    ("image_size-zero", ["encoders.image_size=0"], ["encoders.image_size", "at least 1"]),
    ("encoder-batch-zero", ["encoders.batch_size=0"], ["encoders.batch_size", "at least 1"]),
    ("encoder-missing", ["encoders.dinov2='{tmp}/nope'"], ["encoders.dinov2", "does not exist"]),
    ("encoder-unset", ["encoders.clip=''"], ["encoders.clip", "not set"]),
    ("quality-plugin-missing", ["encoders.quality='no_such_pkg.scorer:make'"], ["encoders.quality", "no_such_pkg"]),
    ("quality-not-a-plugin", ["encoders.quality='scorer'"], ["encoders.quality"]),
    ("grid_images-negative", ["output.grid_images=-1"], ["output.grid_images", "at least 0"]),
    ("output-dir-empty", ["output.dir=''"], ["output.dir"]),
    ("device-typo", ["report.device='cudaa'"], ["report.device", "cudaa"]),
    ("model-missing", ["model.pretrained='{tmp}/nope'"], ["model.pretrained", "does not exist"]),
    ("model-dtype", ["model.dtype='fp8'"], ["model.dtype"]),
    ("model-kind", ["model.kind='sd4'"], ["model.kind"]),
    ("concepts-missing", ["concepts.file='{tmp}/nope.toml'"], ["nope.toml", "no such concept file"]),
    ("concepts-is-a-folder", ["concepts.file='{tmp}'"], ["is a folder"]),
    ("clip-rules-category", ["concepts.clip_rules={objects='keep'}"], ["clip_rules", "object"]),
    ("clip-rules-rule", ["concepts.clip_rules={object='kept'}"], ["clip_rules", "kept"]),
    ("unknown-section", ["generaton.steps=2"], ["generaton", "generation"]),
]


def _args(overrides: list[str], tmp: Path) -> list[str]:
    return [o.replace("{tmp}", tmp.as_posix()) for o in overrides]


@pytest.mark.parametrize(("overrides", "fragments"), [pytest.param(o, f, id=i) for i, o, f in OVERRIDES])
def test_bad_values_are_refused(world, tmp_path, unchanged, overrides, fragments):
    config = write_eval(world, tmp_path)
    with unchanged(tmp_path, world.root):
        result = cli("evaluate", config, *_args(overrides, tmp_path), "--no-progress")
    assert_refused(result, *fragments)


# ------------------------------------------------------------------------------ checkpoints
#: (id, [[checkpoints]] tables (a function of the adapter path), fragments)
CHECKPOINTS = [
    ("name-dotdot", lambda a: checkpoint("..", a), ["checkpoints[0].name", "relative folder"]),
    ("name-escapes", lambda a: checkpoint("../x", a), ["checkpoints[0].name", "'/'"]),
    ("name-slash", lambda a: checkpoint("a/b", a), ["checkpoints[0].name"]),
    ("name-backslash", lambda a: checkpoint("a\\b", a), ["checkpoints[0].name"]),
    ("name-empty", lambda a: checkpoint("", a), ["checkpoints[0]"]),
    ("name-space", lambda a: checkpoint("my lora", a), ["checkpoints[0].name", "plain file name"]),
    ("name-trailing-dot", lambda a: checkpoint("lora.", a), ["checkpoints[0].name", "dot"]),
    ("name-base", lambda a: checkpoint("base", a), ["checkpoints[0].name", "base"]),
    ("name-base-other-case", lambda a: checkpoint("Base", a), ["checkpoints[0].name", "base"]),
    ("name-twice", lambda a: checkpoint("lora", a) + checkpoint("lora", a), ["'lora'", "used twice"]),
    ("name-twice-by-case", lambda a: checkpoint("lora", a) + checkpoint("LoRA", a), ["'LoRA'", "used twice", "case"]),
    ("strength-nan", lambda a: checkpoint("lora", a, "strength = nan\n"), ["checkpoints[0].strength", "finite"]),
    ("strength-inf", lambda a: checkpoint("lora", a, "strength = inf\n"), ["checkpoints[0].strength", "finite"]),
    ("strength-text", lambda a: checkpoint("lora", a, "strength = 'x'\n"), ["checkpoints[0].strength"]),
    ("params-nan", lambda a: checkpoint("lora", a, "params = { lr = nan }\n"), ["checkpoints[0].params.lr", "finite"]),
    ("path-missing", lambda a: checkpoint("lora", a + ".gone"), ["checkpoints[0].path", "does not exist"]),
    ("path-folder", lambda a: checkpoint("lora", str(Path(a).parent)), ["checkpoints[0].path", "folder"]),
    ("path-empty", lambda a: checkpoint("lora", ""), ["checkpoints[0]", "needs a name and a path"]),
    (
        "file-not-safetensors",
        lambda a: checkpoint("lora", _garbage(a)),
        ["checkpoints[0].path", "'lora'", "safetensors"],
    ),
    ("file-with-nan", lambda a: checkpoint("lora", _nan_adapter(a)), ["checkpoints[0].path", "'lora'"]),
    ("key-typo", lambda a: checkpoint("lora", a, "strenght = 1.0\n"), ["checkpoints[0].strenght", "strength"]),
]


def _garbage(adapter: str) -> str:
    path = Path(adapter).parent / "garbage.safetensors"
    if not path.exists():
        path.write_bytes(b"not a safetensors file")
    return str(path)


def _nan_adapter(adapter: str) -> str:
    """A copy of the adapter with one NaN (written once beside it, in the module's world)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = Path(adapter).parent / "nan.safetensors"
    if not path.exists():
        with safe_open(adapter, "pt") as f:
            metadata = f.metadata()
        tensors = load_file(adapter)
        key = next(k for k in tensors if k.endswith("lora_up.weight"))
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float("nan")
        save_file(tensors, str(path), metadata=metadata)
    return str(path)


@pytest.mark.parametrize(("tables", "fragments"), [pytest.param(t, f, id=i) for i, t, f in CHECKPOINTS])
def test_bad_checkpoints_are_refused(world, tmp_path, unchanged, tables, fragments):
    config = write_eval(world, tmp_path, checkpoints=tables(str(world.adapter)))
    with unchanged(tmp_path, world.root):
        result = cli("evaluate", config, "--no-progress")
    assert_refused(result, *fragments)


# ------------------------------------------------------------------------------ files
def _concepts(tmp: Path, text: str | bytes) -> Path:
    path = tmp / "concepts.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _file(tmp: Path, data: bytes) -> Path:
    path = tmp / "e.toml"
    path.write_bytes(data)
    return path


def _caption_folder(world: World, tmp: Path, caption: bytes) -> str:
    folder = tmp / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes((world.images / "img0.png").read_bytes())
    (folder / "a.txt").write_bytes(caption)
    return f'[[concept]]\nname = "toy"\ntrigger = "sks"\ncategory = "object"\nimages = {toml_value(str(folder))}\n'


#: (id, setup(world, tmp) -> command line after "evaluate", fragments)
FILES = [
    ("config-is-a-folder", lambda w, t: [t], ["is a folder"]),
    ("config-missing", lambda w, t: [t / "nope.toml"], ["nope.toml", "no such config file"]),
    ("config-not-utf8", lambda w, t: [_file(t, b"[model]\npretrained = '\xff'\n")], ["e.toml", "UTF-8"]),
    ("config-not-toml", lambda w, t: [_file(t, b"[model\n")], ["e.toml", "not valid TOML"]),
    (
        "checkpoints-not-an-array",
        lambda w, t: [_file(t, b"checkpoints = 3\n" + write_eval(w, t, checkpoints="").read_bytes())],
        ["checkpoints", "array of tables"],
    ),
    (
        "concept-name-escapes",
        lambda w, t: [write_eval(w, t, concepts=_concepts(t, concepts_toml(w, "../x")))],
        ["concept name", "'/'"],
    ),
    (
        "concept-name-dotdot",
        lambda w, t: [write_eval(w, t, concepts=_concepts(t, concepts_toml(w, "..")))],
        ["concept name", "relative folder"],
    ),
    (
        "concept-name-colon",
        lambda w, t: [write_eval(w, t, concepts=_concepts(t, concepts_toml(w, "a:b")))],
        ["concept name", "':'"],
    ),
    (
        "concept-names-differ-by-case",
        lambda w, t: [write_eval(w, t, concepts=_concepts(t, concepts_toml(w, "toy") + concepts_toml(w, "Toy")))],
        ["duplicate concept name", "toy/Toy"],
    ),
    (
        "concepts-not-utf8",
        lambda w, t: [write_eval(w, t, concepts=_concepts(t, b'[[concept]]\nname = "\xff"\n'))],
        ["concepts.toml", "UTF-8"],
    ),
    (
        "concepts-not-toml",
        lambda w, t: [write_eval(w, t, concepts=_concepts(t, "[[concept]\n"))],
        ["concepts.toml", "not valid TOML"],
    ),
    (
        "caption-not-utf8",
        lambda w, t: [write_eval(w, t, concepts=_concepts(t, _caption_folder(w, t, b"a \xff toy")))],
        ["a.txt", "UTF-8"],
    ),
    (
        "output-under-a-file",
        lambda w, t: [write_eval(w, t), f"output.dir='{_blocker(t).as_posix()}/out'"],
        ["output.dir", "cannot write", "is a file"],
    ),
    (
        "output-is-a-file",
        lambda w, t: [write_eval(w, t), f"output.dir='{_blocker(t).as_posix()}'"],
        ["output.dir", "cannot write"],
    ),
]


def _blocker(tmp: Path) -> Path:
    path = tmp / "blocker"
    path.write_text("x", encoding="utf-8")
    return path


@pytest.mark.parametrize(("setup", "fragments"), [pytest.param(s, f, id=i) for i, s, f in FILES])
def test_bad_files_are_refused(world, tmp_path, unchanged, setup, fragments):
    args = setup(world, tmp_path)
    with unchanged(tmp_path, world.root):
        result = cli("evaluate", *args, "--no-progress")
    assert_refused(result, *fragments)

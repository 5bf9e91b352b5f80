"""Bad input to ``higanbana experiment`` (grid files), ``higanbana demo`` and ``higanbana selfcheck``:
refused with one ``error:`` line naming the grid key, configuration or argument, before any run trains
and before anything is written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from higanbana.schema import toml_value
from tests.bad_input.conftest import assert_refused, cli


@dataclass
class World:
    root: Path
    train: Path
    evaluate: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from tests.test_experiment import _setup

    root = tmp_path_factory.mktemp("grid_world")
    _setup(root)
    return World(root, root / "train.toml", root / "eval.toml")


def grid_text(world: World, tmp: Path, body: str | None = None, head: str = "") -> str:
    """A grid of one LoRA configuration (``body`` replaces the [[configs]]/[[vary]] part)."""
    if body is None:
        body = '[[configs]]\nname = "lora"\nset = { "network.algo" = "lora", "network.options" = { rank = 2 } }\n'
    return (
        f"{head}out = {toml_value(str(tmp / 'exp'))}\ntrain = {toml_value(str(world.train))}\n"
        f"evaluate = {toml_value(str(world.evaluate))}\nseeds = [1]\nepochs = [1]\n{body}"
    )


LORA = '[[configs]]\nname = "lora"\nset = { "network.algo" = "lora" }\n'


def configs(name: str, set_: str = '{ "network.algo" = "lora" }', extra: str = "") -> str:
    return f"[[configs]]\nname = {name}\nset = {set_}\n{extra}"


def vary(body: str) -> str:
    return LORA + "[[vary]]\n" + body


#: (id, head (top-level keys replacing the defaults' meaning), body, fragments)
GRIDS = [
    # top-level keys
    ("unknown-key", "seed = [1]\n", None, ["unknown key 'seed'", "seeds"]),
    ("seeds-negative", "", None, ["seeds", "-1"]),
    ("seeds-twice", "", None, ["seeds", "twice"]),
    ("seeds-bool", "", None, ["seeds", "integers"]),
    ("seeds-float", "", None, ["seeds", "integers"]),
    ("seeds-empty", "", None, ["seeds", "non-empty"]),
    ("seeds-too-large", "", None, ["seeds", "4294967295"]),
    ("epochs-zero", "", None, ["epochs", "at least 1"]),
    ("epochs-nan", "", None, ["epochs", "finite"]),
    ("group_by-number", "group_by = 3\n", None, ["group_by"]),
    ("out-number", "", None, ["out"]),
    # configurations: names are run folders
    ("name-dotdot", "", configs('".."'), ["configs[0].name", "relative folder"]),
    ("name-escapes", "", configs('"../x"'), ["configs[0].name", "'/'"]),
    ("name-slash", "", configs('"a/b"'), ["configs[0].name"]),
    ("name-space", "", configs('"my lora"'), ["configs[0].name", "plain file name"]),
    ("name-empty", "", configs('""'), ["configs[0].name", "required"]),
    ("name-number", "", configs("3"), ["configs[0].name"]),
    ("name-twice-by-case", "", configs('"LoRA"') + configs('"lora"'), ["'lora'", "twice", "case"]),
    ("set-not-a-table", "", configs('"a"', "3"), ["configs[0].set", "table"]),
    ("set-key-no-section", "", configs('"a"', '{ "algo" = "lora" }'), ["configs[0].set", "'algo'", "section.key"]),
    ("set-key-bad-section", "", configs('"a"', '{ "netwrk.algo" = "lora" }'), ["configs[0].set", "network"]),
    ("set-nan", "", configs('"a"', '{ "optimizer.unet_lr" = nan }'), ["optimizer.unet_lr", "finite"]),
    (
        "set-negative-lr",
        "",
        configs('"a"', '{ "optimizer.unet_lr" = -1e-4 }'),
        ["configuration 'a'", "optimizer.unet_lr", "allow_nonpositive_lr"],
    ),
    (
        "set-key-typo",
        "",
        configs('"a"', '{ "training.max_train_stepz" = 1 }'),
        ["configuration 'a'", "max_train_steps"],
    ),
    ("set-name-escapes", "", configs('"a"', '{ "network.preset" = "../x.toml" }'), ["configuration 'a'", "x.toml"]),
    ("set-grid-owned", "", configs('"a"', '{ "save.output_name" = "x" }'), ["save.output_name", "set by the grid"]),
    ("vary-grid-owned", "", vary('from = "lora"\nkey = "training.seed"\nvalues = [2]\n'), ["training.seed", "seeds"]),
    ("labels-nan", "", configs('"a"', "{}", "labels = { x = nan }\n"), ["labels.x", "finite"]),
    ("labels-reserved", "", configs('"a"', "{}", "labels = { seed = 1 }\n"), ["labels", "'seed'"]),
    ("configs-not-an-array", "configs = 3\n", "", ["configs", "array of tables"]),
    ("no-configs", "", "", ["no [[configs]]"]),
    # vary
    (
        "vary-from-unknown",
        "",
        vary('from = "lorra"\nkey = "optimizer.unet_lr"\nvalues = [1e-3]\n'),
        ["vary[0].from", "lora"],
    ),
    ("vary-key-missing", "", vary('from = "lora"\nvalues = [1e-3]\n'), ["vary[0].key"]),
    ("vary-key-no-section", "", vary('from = "lora"\nkey = "unet_lr"\nvalues = [1e-3]\n'), ["vary[0].key"]),
    ("vary-values-empty", "", vary('from = "lora"\nkey = "optimizer.unet_lr"\nvalues = []\n'), ["vary[0].values"]),
    ("vary-values-nan", "", vary('from = "lora"\nkey = "optimizer.unet_lr"\nvalues = [nan]\n'), ["finite"]),
    (
        "vary-value-negative-lr",
        "",
        vary('from = "lora"\nkey = "optimizer.unet_lr"\nvalues = [-1e-3]\n'),
        ["lora-unet_lr=-0.001", "optimizer.unet_lr", "greater than 0"],
    ),
    (
        "vary-value-dotdot-name",
        "",
        vary('from = "lora"\nkey = "network.preset"\nvalues = [".."]\n'),
        ["vary[0]", "names"],
    ),
    (
        "vary-names-escape",
        "",
        vary('from = "lora"\nkey = "training.noise_offset"\nvalues = [0.1]\nnames = ["../x"]\n'),
        ["names[0]"],
    ),
    (
        "vary-names-count",
        "",
        vary('from = "lora"\nkey = "training.noise_offset"\nvalues = [0.1, 0.2]\nnames = ["x"]\n'),
        ["2 values"],
    ),
    (
        "vary-names-not-list",
        "",
        vary('from = "lora"\nkey = "training.noise_offset"\nvalues = [0.1]\nnames = "x"\n'),
        ["names"],
    ),
    (
        "vary-same-name-twice",
        "",
        vary('from = "lora"\nkey = "optimizer.unet_lr"\nvalues = [1e-2, 1e-2]\n'),
        ["vary[0]", "twice"],
    ),
    ("vary-unknown-key", "", vary('from = "lora"\nkey = "x.y"\nvalues = [1]\nfoo = 1\n'), ["vary[0]", "takes from"]),
]
# the head lines that the ids above need (the defaults follow and must not be repeated)
HEADS = {
    "seeds-negative": "seeds = [-1]\n",
    "seeds-twice": "seeds = [1, 1]\n",
    "seeds-bool": "seeds = [true]\n",
    "seeds-float": "seeds = [1.5]\n",
    "seeds-empty": "seeds = []\n",
    "seeds-too-large": "seeds = [4294967296]\n",
    "epochs-zero": "epochs = [0]\n",
    "epochs-nan": "epochs = [nan]\n",
    "out-number": "out = 3\n",
}


def write_grid(world: World, tmp: Path, case_id: str, head: str, body: str | None) -> Path:
    text = grid_text(world, tmp, body)
    override = HEADS.get(case_id, "")
    if override:  # replace the default line of the same key
        key = override.split(" ", 1)[0]
        text = "\n".join(line for line in text.splitlines() if not line.startswith(f"{key} ")) + "\n"
        text = override + text
    path = tmp / "grid.toml"
    path.write_text(head + text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("case_id", "head", "body", "fragments"), [pytest.param(*g, id=g[0]) for g in GRIDS])
def test_bad_grids_are_refused(world, tmp_path, unchanged, case_id, head, body, fragments):
    grid = write_grid(world, tmp_path, case_id, head, body)
    with unchanged(tmp_path, world.root):
        result = cli("experiment", grid, "--no-progress")
    assert_refused(result, *fragments)


# ------------------------------------------------------------------------------ files
def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _with_base(world: World, tmp: Path, which: str, text: str) -> Path:
    """A grid whose base train or evaluate config is ``text`` appended to the world's."""
    base = (world.train if which == "train" else world.evaluate).read_text(encoding="utf-8")
    extra = _write(tmp / f"{which}.toml", (base + text).encode())
    grid = grid_text(world, tmp).replace(toml_value(str(getattr(world, which))), toml_value(str(extra)))
    return _write(tmp / "grid.toml", grid.encode())


#: (id, setup(world, tmp) -> grid path, fragments)
FILES = [
    ("grid-is-a-folder", lambda w, t: t, ["is a folder"]),
    ("grid-missing", lambda w, t: t / "nope.toml", ["nope.toml", "no such grid file"]),
    ("grid-not-utf8", lambda w, t: _write(t / "g.toml", b'train = "\xff"\n'), ["g.toml", "UTF-8"]),
    ("grid-not-toml", lambda w, t: _write(t / "g.toml", b"[[configs]\n"), ["g.toml", "not valid TOML"]),
    (
        "train-missing",
        lambda w, t: _write(t / "g.toml", grid_text(w, t).replace(str(w.train), str(t / "no.toml")).encode()),
        ["no.toml", "no such config file"],
    ),
    (
        "evaluate-missing",
        lambda w, t: _write(t / "g.toml", grid_text(w, t).replace(str(w.evaluate), str(t / "no.toml")).encode()),
        ["no.toml", "no such config file"],
    ),
    (
        "out-under-a-file",
        lambda w, t: _write(
            t / "g.toml",
            grid_text(w, t).replace(toml_value(str(t / "exp")), toml_value(str(_blocker(t) / "e"))).encode(),
        ),
        ["cannot write", "is a file"],
    ),
    ("train-config-nan", lambda w, t: _with_base(w, t, "train", "[scheduler]\npower = nan\n"), ["scheduler.power"]),
    (
        "eval-config-grid-images",
        lambda w, t: _with_base(w, t, "evaluate", "[output]\ngrid_images = -1\n"),
        ["grid_images"],
    ),
    ("eval-encoder-missing", lambda w, t: _eval_without_encoder(w, t), ["encoders.clip"]),
]


def _blocker(tmp: Path) -> Path:
    path = tmp / "blocker"
    path.write_text("x", encoding="utf-8")
    return path


def _eval_without_encoder(world: World, tmp: Path) -> Path:
    text = "\n".join(
        line for line in world.evaluate.read_text(encoding="utf-8").splitlines() if not line.startswith("clip =")
    )
    for relative in ("sd1", "concepts.toml"):  # the copy lives elsewhere: its relative paths become absolute
        text = text.replace(f'"{relative}"', toml_value(str(world.root / relative)))
    extra = _write(tmp / "evaluate.toml", text.encode())
    grid = grid_text(world, tmp).replace(toml_value(str(world.evaluate)), toml_value(str(extra)))
    return _write(tmp / "grid.toml", grid.encode())


@pytest.mark.parametrize(("setup", "fragments"), [pytest.param(s, f, id=i) for i, s, f in FILES])
def test_bad_grid_files_are_refused(world, tmp_path, unchanged, setup, fragments):
    grid = setup(world, tmp_path)
    with unchanged(tmp_path, world.root):
        result = cli("experiment", grid, "--no-progress")
    assert_refused(result, *fragments)


# ------------------------------------------------------------------------------ demo and selfcheck
def test_demo_output_under_a_file_is_refused_before_any_work(tmp_path, unchanged):
    blocker = _blocker(tmp_path)
    with unchanged(tmp_path):
        result = cli("demo", "--out", blocker / "out", "--plan", "quick", "--no-progress")
    assert_refused(result, "--out", "cannot write", "is a file")


def test_demo_unknown_plan_is_an_argument_error(tmp_path, unchanged):
    with unchanged(tmp_path):
        result = cli("demo", "--out", tmp_path / "out", "--plan", "fast")
    assert_refused(result, "--plan", "fast")


def test_selfcheck_unknown_algorithm_is_refused(tmp_path, unchanged):
    with unchanged(tmp_path):
        result = cli("selfcheck", "--algos", "lorra", "--out", tmp_path / "out")
    assert_refused(result, "lorra", "lora")


@pytest.mark.parametrize("steps", ["0", "-1"])
def test_selfcheck_steps_below_one_are_refused(tmp_path, unchanged, steps):
    with unchanged(tmp_path):
        result = cli("selfcheck", "--algos", "lora", "--steps", steps, "--out", tmp_path / "out")
    assert_refused(result, "--steps")


def test_selfcheck_out_under_a_file_is_refused_before_training(tmp_path, unchanged):
    (tmp_path / "afile").write_text("x")
    with unchanged(tmp_path):
        result = cli("selfcheck", "--algos", "lora", "--out", tmp_path / "afile" / "out")
    assert_refused(result, "selfcheck --out", "cannot write", "afile")

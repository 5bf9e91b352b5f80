"""The bad-input corpus for adapter files: every damaged file, through every reader.

Each case mutates a valid file (ours, or kohya-style without our metadata) and runs it through
``info``, ``merge``, ``resize``, ``convert`` and loading. Every reader must give the same verdict:
one ``error:`` line naming the module and key (exit 2), nothing written — never a traceback,
never a silently wrong result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from higanbana.errors import HiganbanaError
from higanbana.formats import load_tensors, save_network, save_tensors
from higanbana.formats.reader import read_network_file
from higanbana.formats.sd_network import load_sd_network, save_sd_network, sd_network
from higanbana.models.tiny import save_tiny_sd, tiny_sd_parts
from higanbana.network import AdapterNetwork

from ..algorithms.cases import randomize
from .conftest import assert_refused, cli

SETUPS = {
    "lora": ("lora", {"rank": 2}),
    "tucker": ("lora", {"rank": 2, "use_tucker": True}),
    "dora": ("lora", {"rank": 2, "weight_decompose": True}),
    "loha": ("loha", {"rank": 2}),
    "lokr": ("lokr", {"rank": 2, "factor": 4}),
    "ia3": ("ia3", {}),
    "glora": ("glora", {"rank": 2}),
    "oft": ("oft", {"rank": 4}),
    "boft": ("boft", {"rank": 4}),
    "full": ("full", {}),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD1 model (in memory and as a diffusers folder) and one valid file per algorithm."""
    root = tmp_path_factory.mktemp("files")
    parts = tiny_sd_parts("sd1", seed=0)
    base = save_tiny_sd(parts, root / "base")
    files = {}
    for label, (algo, options) in SETUPS.items():
        preset = "full" if label == "tucker" else "attn-only"
        net = sd_network(parts, preset, algo, train_text_encoder=False, **options)
        randomize(net, std=0.05)
        files[label] = save_sd_network(net, root / f"{label}.safetensors", "sd1")
        net.detach()
    norms = AdapterNetwork(
        parts.unet, "norm", lambda p, m: isinstance(m, nn.LayerNorm) and "transformer_blocks" in p, prefix="lora_unet"
    )
    randomize(norms, std=0.05)
    files["norm"] = save_network(norms, root / "norm.safetensors")
    return {"parts": parts, "base": base, "files": files, "root": root}


def _first(tensors: dict, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith("." + suffix))


def _records(meta: dict) -> dict:
    return json.loads(meta["higanbana.modules"])


def _set_records(meta: dict, records: dict) -> None:
    meta["higanbana.modules"] = json.dumps(records)


def _foreign(meta: dict) -> None:
    """Drop our records: the file reads like a kohya/LyCORIS file, its algorithms detected."""
    for key in [k for k in meta if k.startswith("higanbana.")]:
        del meta[key]


# --------------------------------------------------------------------------- mutations
Mutation = Callable[[dict, dict], None]


def set_tensor(suffix: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Mutation:
    def mutate(tensors, meta):
        key = _first(tensors, suffix)
        tensors[key] = make(tensors[key])

    return mutate


def drop(suffix: str) -> Mutation:
    def mutate(tensors, meta):
        key = _first(tensors, suffix)
        del tensors[key]

    return mutate


def add(suffix: str, value: torch.Tensor, like: str) -> Mutation:
    def mutate(tensors, meta):
        module = _first(tensors, like).partition(".")[0]
        tensors[f"{module}.{suffix}"] = value

    return mutate


def record(change: Callable[[dict], object]) -> Mutation:
    def mutate(tensors, meta):
        records = _records(meta)
        change(records)
        meta["higanbana.modules"] = json.dumps(records)

    return mutate


def raw_modules(text: Callable[[dict], str]) -> Mutation:
    def mutate(tensors, meta):
        meta["higanbana.modules"] = text(_records(meta))

    return mutate


def first_record(change: Callable[[dict], None]) -> Mutation:
    return record(lambda r: change(r[sorted(r)[0]]))


def foreign(mutation: Mutation) -> Mutation:
    def mutate(tensors, meta):
        _foreign(meta)
        mutation(tensors, meta)

    return mutate


def nan_at(t: torch.Tensor, value: float = math.nan) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = value
    return t


def noop(tensors, meta):
    pass


#: (id, source file, mutation, fragments every reader's error holds)
CASES: list[tuple[str, str, Mutation, tuple[str, ...]]] = [
    # ---- values
    ("nan-factor", "lora", set_tensor("lora_up.weight", nan_at), ("NaN/Inf",)),
    ("inf-factor", "loha", set_tensor("hada_w1_a", lambda t: nan_at(t, math.inf)), ("NaN/Inf",)),
    ("nan-alpha", "lora", set_tensor("alpha", lambda t: torch.tensor(math.nan)), ("NaN/Inf",)),
    ("inf-alpha", "lokr", set_tensor("alpha", lambda t: torch.tensor(-math.inf)), ("NaN/Inf",)),
    ("nan-oft", "oft", set_tensor("oft_blocks", nan_at), ("NaN/Inf",)),
    ("nan-ia3", "ia3", set_tensor("weight", nan_at), ("NaN/Inf",)),
    ("nan-full", "full", set_tensor("diff", nan_at), ("NaN/Inf",)),
    ("nan-norm", "norm", set_tensor("w_norm", nan_at), ("NaN/Inf",)),
    ("nan-dora", "dora", set_tensor("dora_scale", nan_at), ("NaN/Inf",)),
    ("nan-foreign", "lora", foreign(set_tensor("lora_down.weight", nan_at)), ("NaN/Inf",)),
    # ---- dtypes
    ("int-factor", "lora", set_tensor("lora_down.weight", lambda t: t.to(torch.int32)), ("lora_down.weight", "int32")),
    ("int-factor-foreign", "lora", foreign(set_tensor("lora_up.weight", lambda t: t.to(torch.int64))), ("int64",)),
    ("bool-factor", "loha", set_tensor("hada_w2_b", lambda t: t > 0), ("hada_w2_b", "bool")),
    ("uint8-oft", "oft", set_tensor("oft_blocks", lambda t: t.to(torch.uint8)), ("oft_blocks", "uint8")),
    ("int-ia3", "ia3", set_tensor("weight", lambda t: t.to(torch.int16)), ("'weight'", "int16")),
    # ---- alpha
    ("alpha-vector", "lora", set_tensor("alpha", lambda t: torch.ones(3)), ("alpha", "scalar")),
    ("alpha-matrix", "loha", set_tensor("alpha", lambda t: torch.ones(2, 2)), ("alpha", "scalar")),
    ("alpha-empty", "glora", set_tensor("alpha", lambda t: torch.ones(0)), ("alpha", "scalar")),
    # ---- keys
    ("missing-up", "lora", drop("lora_up.weight"), ("unknown adapter keys",)),
    ("missing-down", "lora", drop("lora_down.weight"), ("lora_down.weight",)),
    ("missing-hada", "loha", drop("hada_w2_b"), ("hada_w2_b",)),
    ("missing-t2", "loha", add("hada_t1", torch.ones(2, 2, 1), like="hada_w1_a"), ("hada_t1",)),
    ("missing-lokr-w2", "lokr", drop("lokr_w2_b"), ("lokr_w2_b",)),
    ("missing-glora", "glora", drop("b2.weight"), ("b2.weight",)),
    ("missing-dora", "dora", drop("dora_scale"), ("dora_scale",)),
    ("extra-bias", "lora", add("lora_up.bias", torch.zeros(4), like="lora_up.weight"), ("lora_up.bias",)),
    ("extra-bias-foreign", "lora", foreign(add("lora_up.bias", torch.zeros(4), like="lora_up.weight")), ("bias",)),
    ("extra-scale", "loha", add("scale", torch.ones(()), like="hada_w1_a"), ("'scale'",)),
    ("dora-on-oft", "oft", add("dora_scale", torch.ones(4, 1), like="oft_blocks"), ("dora_scale",)),
    (
        "dora-unused",
        "lora",
        lambda t, m: add("dora_scale", t[_first(t, "lora_up.weight")][:, :1], "lora_up.weight")(t, m),
        ("weight_decompose",),
    ),
    ("mid-unused", "lora", add("lora_mid.weight", torch.ones(2, 2), like="lora_up.weight"), ("lora_mid",)),
    ("rescale-unused", "oft", add("rescale", torch.ones(32, 1), like="oft_blocks"), ("rescale",)),
    ("lokr-both-w1", "lokr", add("lokr_w1_a", torch.ones(2, 2), like="lokr_w1"), ("lokr_w1",)),
    ("lokr-w2-both", "lokr", add("lokr_w2", torch.ones(8, 8), like="lokr_w1"), ("lokr_w2",)),
    ("lokr-t2-linear", "lokr", add("lokr_t2", torch.ones(2, 2, 1), like="lokr_w1"), ("lokr_t2",)),
    ("key-without-suffix", "lora", lambda t, m: t.update({"lora_unet_x": torch.ones(1)}), ("lora_unet_x",)),
    ("key-empty-module", "lora", lambda t, m: t.update({".alpha": torch.ones(())}), (".alpha",)),
    ("unknown-naming", "lora", foreign(lambda t, m: t.update({"model.layer.weight": torch.ones(2)})), ("naming",)),
    ("unknown-keys-foreign", "lora", foreign(lambda t, m: t.update({"lora_unet_x.foo": torch.ones(1)})), ("foo",)),
    # ---- shapes
    ("rank-0", "lora", set_tensor("lora_down.weight", lambda t: t[:0]), ("lora",)),
    ("inner-dims", "lora", set_tensor("lora_up.weight", lambda t: torch.zeros(t.shape[0], t.shape[1] + 1)), ("rank",)),
    (
        "inner-dims-foreign",
        "lora",
        foreign(set_tensor("lora_up.weight", lambda t: torch.zeros(t.shape[0], 3))),
        ("rank",),
    ),
    ("up-3d", "lora", set_tensor("lora_up.weight", lambda t: t[..., None]), ("lora_up.weight", "dims")),
    ("down-1d", "lora", set_tensor("lora_down.weight", lambda t: t.flatten()), ("lora_down.weight", "dims")),
    ("up-kernel", "lora", set_tensor("lora_up.weight", lambda t: t[..., None, None].expand(-1, -1, 3, 1)), ("dims",)),
    ("mid-not-square", "tucker", set_tensor("lora_mid.weight", lambda t: t[:1]), ("lora_mid.weight",)),
    ("loha-ranks", "loha", set_tensor("hada_w2_a", lambda t: torch.zeros(t.shape[0], 3)), ("hada_w2_a",)),
    ("loha-out", "loha", set_tensor("hada_w2_a", lambda t: torch.zeros(t.shape[0] + 1, t.shape[1])), ("output",)),
    ("loha-width", "loha", set_tensor("hada_w2_b", lambda t: torch.zeros(t.shape[0], t.shape[1] + 1)), ("input",)),
    ("lokr-w1-3d", "lokr", set_tensor("lokr_w1", lambda t: t[None]), ("lokr_w1",)),
    ("oft-not-square", "oft", set_tensor("oft_blocks", lambda t: t[:, :, :2]), ("oft_blocks",)),
    ("oft-2d", "oft", set_tensor("oft_blocks", lambda t: t[0]), ("boft", "oft_blocks")),
    ("boft-odd-block", "boft", set_tensor("oft_blocks", lambda t: torch.zeros(1, 2, 3, 3)), ("oft_blocks", "even")),
    ("boft-count", "boft", set_tensor("oft_blocks", lambda t: torch.zeros(1, 3, 4, 4)), ("power of two",)),
    ("boft-stages", "boft", set_tensor("oft_blocks", lambda t: torch.zeros(5, 2, 4, 4)), ("log2",)),
    ("ia3-2d", "ia3", set_tensor("weight", lambda t: t[:, None].expand(-1, 2)), ("'weight'",)),
    ("ia3-on-input-2", "ia3", set_tensor("on_input", lambda t: torch.tensor(2)), ("on_input",)),
    ("glora-layout", "glora", set_tensor("a2.weight", lambda t: torch.zeros(5, 7)), ("GLoRA shapes",)),
    (
        "full-bias",
        "full",
        lambda t, m: t.update({_first(t, "diff").replace("diff", "diff_b"): torch.ones(99)}),
        ("diff_b",),
    ),
    ("full-1d", "full", set_tensor("diff", lambda t: t.flatten()), ("diff",)),
    ("norm-bias", "norm", set_tensor("b_norm", lambda t: torch.zeros(t.numel() + 1)), ("b_norm",)),
    ("norm-2d", "norm", set_tensor("w_norm", lambda t: t[None]), ("w_norm",)),
    ("dora-shape", "dora", set_tensor("dora_scale", lambda t: torch.ones(3, 3)), ("dora_scale",)),
    ("empty-factor", "lokr", set_tensor("lokr_w2_a", lambda t: t[:, :0]), ("empty",)),
    # ---- our metadata
    ("modules-not-json", "lora", raw_modules(lambda r: "{not json"), ("not valid JSON",)),
    ("modules-list", "lora", raw_modules(lambda r: json.dumps(list(r))), ("JSON object", "list")),
    ("modules-number", "lora", raw_modules(lambda r: "3"), ("JSON object", "int")),
    ("record-not-object", "lora", record(lambda r: r.update({sorted(r)[0]: "lora"})), ("string 'algo'",)),
    ("record-without-algo", "lora", first_record(lambda r: r.pop("algo")), ("string 'algo'",)),
    ("record-algo-number", "lora", first_record(lambda r: r.update(algo=3)), ("string 'algo'",)),
    ("record-algo-unknown", "lora", first_record(lambda r: r.update(algo="lorra")), ("unknown algorithm", "lora")),
    ("record-algo-wrong", "lora", first_record(lambda r: r.update(algo="loha")), ("recorded as 'loha'",)),
    ("record-extra-field", "lora", first_record(lambda r: r.update(note="x")), ("unknown field",)),
    ("options-list", "lora", first_record(lambda r: r.update(options=[1])), ("options must be an object",)),
    ("option-unknown", "lora", first_record(lambda r: r["options"].update(rnak=2)), ("takes no option 'rnak'",)),
    ("option-type", "lora", first_record(lambda r: r["options"].update(rank="big")), ("rank", "expected int")),
    ("option-bool", "loha", first_record(lambda r: r["options"].update(use_tucker="yes")), ("use_tucker",)),
    ("option-nan", "glora", first_record(lambda r: r["options"].update(alpha=math.nan)), ("alpha",)),
    ("record-without-tensors", "lora", record(lambda r: r.update(lora_unet_ghost={"algo": "lora"})), ("ghost",)),
    ("tensors-without-record", "lora", record(lambda r: r.pop(sorted(r)[0])), ("no record",)),
    ("format-version", "lora", lambda t, m: m.update({"higanbana.format_version": "9"}), ("format_version",)),
    ("dora-flag-mismatch", "dora", first_record(lambda r: r["options"].update(weight_decompose=False)), ("dora",)),
    (
        "tucker-flag-mismatch",
        "tucker",
        record(lambda r: [v["options"].update(use_tucker=False) for v in r.values()]),
        ("lora_mid",),
    ),
]
IDS = [c[0] for c in CASES]


def make_file(world, tmp_path: Path, source: str, mutation: Mutation) -> Path:
    tensors, meta = load_tensors(world["files"][source])
    mutation(tensors, meta)
    path = tmp_path / "bad.safetensors"
    save_tensors(tensors, path, meta)
    return path


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_info_and_load_refuse(case, world, tmp_path, unchanged):
    _id, source, mutation, fragments = case
    path = make_file(world, tmp_path, source, mutation)
    nan = fragments == ("NaN/Inf",)
    with unchanged(tmp_path):
        result = cli("info", path)
        if nan:  # info describes a damaged file, says every reader refuses it, and exits 1
            assert result.code == 1 and "DAMAGED: NaN/Inf values" in result.out and "Traceback" not in result.err
        else:
            assert_refused(result, str(path), *fragments)
        with pytest.raises(HiganbanaError) as info:
            load_sd_network(path, world["parts"])
        assert all(f.lower() in str(info.value).lower() for f in fragments)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_refuses(case, world, tmp_path, unchanged):
    _id, source, mutation, fragments = case
    path = make_file(world, tmp_path, source, mutation)
    with unchanged(tmp_path):
        assert_refused(cli("merge", world["base"], tmp_path / "merged", "--lora", f"{path}:0.8"), *fragments)


LORA_CASES = [c for c in CASES if c[1] in ("lora", "tucker", "dora")]


@pytest.mark.parametrize("case", LORA_CASES, ids=[c[0] for c in LORA_CASES])
def test_resize_and_convert_refuse(case, world, tmp_path, unchanged):
    _id, source, mutation, fragments = case
    path = make_file(world, tmp_path, source, mutation)
    with unchanged(tmp_path):
        assert_refused(cli("resize", path, tmp_path / "small.safetensors", "--rank", "1"), *fragments)
        assert_refused(cli("convert", path, tmp_path / "peft", "--to", "peft", "--base", world["base"]), *fragments)


def test_the_valid_files_pass_every_reader(world, tmp_path):
    """The corpus' sources are valid: each error above comes from its mutation."""
    for label, path in world["files"].items():
        assert cli("info", path).code == 0, label
        read_network_file(path)
        if label != "norm":
            load_sd_network(path, world["parts"]).detach()
    merged = cli("merge", world["base"], tmp_path / "m", "--lora", f"{world['files']['lora']}:0.5")
    assert merged.code == 0, merged.err


# --------------------------------------------------------------------------- files that are not files
def test_unreadable_files(world, tmp_path, unchanged):
    good = world["files"]["lora"]
    data = good.read_bytes()
    cases = {
        "missing.safetensors": None,
        "empty.safetensors": b"",
        "truncated.safetensors": data[: len(data) // 2],
        "garbage.safetensors": b"\x00\xff" * 100,
        "huge-header.safetensors": (2**60).to_bytes(8, "little") + b"{}",
        "text.safetensors": b"hello world, not a tensor file at all",
        "bad-json.safetensors": (10).to_bytes(8, "little") + b"{not json}",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with unchanged(tmp_path):
            for args in (
                ("info", path),
                ("merge", world["base"], tmp_path / "o", "--lora", path),
                ("resize", path, tmp_path / "o.safetensors", "--rank", "1"),
                ("convert", path, tmp_path / "o.safetensors"),
            ):
                assert_refused(cli(*args), name)
    (tmp_path / "folder.safetensors").mkdir()
    assert_refused(cli("info", tmp_path / "folder.safetensors"), "folder.safetensors")
    pickle = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, pickle)
    assert_refused(cli("info", pickle), "--unsafe-pickle")
    torch.save([1, 2], pickle)
    assert_refused(cli("info", pickle, "--unsafe-pickle"), "flat dict of tensors")
    empty = save_tensors({}, tmp_path / "none.safetensors")
    assert_refused(cli("info", empty), "no tensors")


def test_alpha_zero_reads_as_the_rank(world, tmp_path):
    """kohya/LyCORIS read alpha 0 as alpha = rank; we do the same everywhere, and info names the tools that do not."""
    tensors, meta = load_tensors(world["files"]["lora"])
    for key in [k for k in tensors if k.endswith(".alpha")]:
        tensors[key] = torch.tensor(0.0)
    records = _records(meta)
    for r in records.values():
        r["options"].pop("alpha", None)
    _set_records(meta, records)
    zero = save_tensors(tensors, tmp_path / "zero.safetensors", meta)
    rank = {k: v for k, v in tensors.items()}
    for key in [k for k in rank if k.endswith(".alpha")]:
        rank[key] = torch.tensor(2.0)  # the rank
    explicit = save_tensors(rank, tmp_path / "rank.safetensors", meta)
    a = load_sd_network(zero, world["parts"])
    scales = {a.adapters[n].scale for n in a.adapters}
    a.detach()
    assert scales == {1.0}
    for name, path in (("zero", zero), ("rank", explicit)):
        assert cli("merge", world["base"], tmp_path / name, "--lora", path).code == 0
    w0, _ = load_tensors(world["base"] / "unet" / "diffusion_pytorch_model.safetensors")
    wz, _ = load_tensors(tmp_path / "zero" / "unet" / "diffusion_pytorch_model.safetensors")
    wr, _ = load_tensors(tmp_path / "rank" / "unet" / "diffusion_pytorch_model.safetensors")
    changed = [k for k in w0 if not torch.equal(w0[k], wz[k])]
    assert changed and all(torch.equal(wz[k], wr[k]) for k in w0)  # alpha 0 merges like alpha = rank
    info = cli("info", zero)
    assert info.code == 0 and "alpha 0: ComfyUI reads scale 0" in info.out and "alpha 0: A1111" in info.out


def test_a_rule_that_matches_nothing_is_an_error(world):
    config = {"preset": "attn-only", "rules": [{"names": ["to_qq"], "options": {"rank": 8}}]}
    with pytest.raises(HiganbanaError, match=r"rules\[0\] \(names=\['to_qq'\]\) matches none"):
        sd_network(world["parts"], config, "lora", rank=2, train_text_encoder=False)
    unet_rule = {"preset": "attn-only", "rules": [{"names": ["to_qq"], "parts": ["unet"], "options": {"rank": 8}}]}
    with pytest.raises(HiganbanaError, match=r"rules\[0\]"):
        sd_network(world["parts"], unet_rule, "lora", rank=2, train_text_encoder=False)
    # a rule for a part the network leaves out (the text encoder is not trained) is no error
    te_rule = {
        "preset": "attn-only",
        "rules": [{"names": ["q_proj"], "parts": ["text_encoder"], "options": {"rank": 8}}],
    }
    sd_network(world["parts"], te_rule, "lora", rank=2, train_text_encoder=False).detach()


def test_huge_ranks_are_clamped_to_the_layer_keeping_the_scale(world, tmp_path):
    from higanbana.errors import RankClampedWarning

    with pytest.warns(RankClampedWarning, match="clamped to its full rank"):
        net = sd_network(world["parts"], "attn-only", "lora", rank=100_000, alpha=50_000, train_text_encoder=False)
    sizes = {name: a.rank for name, a in net.adapters.items()}
    assert all(a.rank == min(a.spec.out_features, a.spec.fan_in) for a in net.adapters.values())
    assert {a.scale for a in net.adapters.values()} == {0.5}  # α/r as asked
    assert sum(p.numel() for p in net.parameters()) < 1e6
    path = save_sd_network(net, tmp_path / "big.safetensors", "sd1")
    net.detach()
    again = load_sd_network(path, world["parts"])
    assert {n: a.rank for n, a in again.adapters.items()} == sizes
    assert {a.scale for a in again.adapters.values()} == {0.5}
    again.detach()


def test_strict_shape_mismatch_against_the_model_names_module_and_key(world, tmp_path, unchanged):
    """A file valid on its own but made for other layer sizes: the model's check names the module."""
    tensors, meta = load_tensors(world["files"]["lora"])
    key = _first(tensors, "lora_down.weight")
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    path = save_tensors(tensors, tmp_path / "other.safetensors", meta)
    module = key.partition(".")[0]
    with unchanged(tmp_path):
        assert_refused(cli("merge", world["base"], tmp_path / "o", "--lora", path), module)
        with pytest.raises(HiganbanaError, match=module):
            load_sd_network(path, world["parts"])
    assert cli("info", path).code == 0  # on its own the file is consistent: only a model can tell


@pytest.mark.parametrize(
    "algo,options,fragment",
    [
        ("lora", {"rank": 2.5}, "rank=2.5 must be a whole number"),
        ("loha", {"rank": "4"}, "rank='4' must be a whole number"),
        ("lora", {"rank": 0}, "rank=0 must be ≥ 1"),
        ("lora", {"rank": 2, "alpha": math.nan}, "alpha=nan must be a finite number"),
        ("glora", {"rank": 2, "alpha": math.inf}, "alpha=inf"),
        ("lokr", {"rank": 2, "factor": 1.5}, "factor=1.5"),
        ("boft", {"rank": 4, "boft_stages": 1.5}, "boft_stages=1.5"),
        ("oft", {"rank": 4, "constraint": math.nan}, "constraint=nan"),
        ("oft", {"rank": 4, "constraint": -1.0}, "constraint"),
        ("ia3", {"multiplier": math.inf}, "multiplier=inf"),
        ("lora", {"rank": 2, "dropout": math.nan}, "dropout"),
        ("lora", {"rank": 2, "rank_dropout": 1.5}, "rank_dropout"),
    ],
)
def test_option_values_are_checked_naming_the_module(world, algo, options, fragment):
    """Option values that would silently train something else (int(2.5) = 2, α = NaN) are refused."""
    with pytest.raises(HiganbanaError, match="module lora_unet_") as info:
        sd_network(world["parts"], "attn-only", algo, train_text_encoder=False, **options)
    assert fragment in str(info.value)

"""Property-based fuzzing of the adapter-file readers with hypothesis.

From valid files of every algorithm (Linear, Conv2d and LayerNorm modules of a small model),
hypothesis mutates tensors (drop, rename, reshape, retype, NaN/Inf, new keys), our metadata
(records, options, algorithms, raw JSON) and the bytes of the file. Whatever comes out, every
reader — ``info`` (with the tool verdicts), loading strict and non-strict, ``resize`` — must
either accept the file or raise the project's own error: no other exception, ever.

CI runs a short pass (``FUZZ_EXAMPLES``, default 150 per property); ``make fuzz`` runs thousands.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from higanbana.errors import HiganbanaError
from higanbana.formats import load_network, load_tensors, save_network, save_tensors
from higanbana.formats.inspect import file_info, format_info
from higanbana.formats.reader import read_network_file
from higanbana.network import AdapterNetwork
from higanbana.tools.resize import resize_tensors

from .algorithms.cases import randomize

pytestmark = pytest.mark.fuzz
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 150,  # CI: the same examples every run; `make fuzz`: new ones each time
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SUFFIXES = [
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale", "hada_w1_a", "hada_w1_b",
    "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
    "lokr_w2_b", "lokr_t2", "weight", "on_input", "a1.weight", "a2.weight", "b1.weight", "b2.weight", "oft_blocks",
    "rescale", "diff", "diff_b", "w_norm", "b_norm", "scale", "lora_up.bias", "x",
]  # fmt: skip
ALGOS = ["lora", "loha", "lokr", "ia3", "glora", "oft", "boft", "full", "norm", "dora", "locon", "nope", ""]
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]
SETUPS = [
    ("lora", {"rank": 2}),
    ("lora", {"rank": 2, "use_tucker": True}),
    ("lora", {"rank": 2, "weight_decompose": True}),
    ("loha", {"rank": 2}),
    ("loha", {"rank": 2, "use_tucker": True}),
    ("lokr", {"rank": 1, "factor": 2}),
    ("lokr", {"rank": 1, "factor": 2, "decompose_both": True, "use_tucker": True}),
    ("ia3", {}),
    ("glora", {"rank": 2}),
    ("oft", {"rank": 4, "rescaled": True}),
    ("boft", {"rank": 2}),
    ("full", {}),
    ("norm", {}),
]


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)


def _model() -> Small:
    torch.manual_seed(0)
    return Small().requires_grad_(False)


def _select(algo: str):
    if algo == "norm":
        return lambda path, m: isinstance(m, nn.LayerNorm)
    return lambda path, m: isinstance(m, (nn.Linear, nn.Conv2d))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[tuple[dict, dict]]:
    """(tensors, metadata) of one valid file per setup, and of each as a foreign (record-free) file."""
    folder = tmp_path_factory.mktemp("fuzz")
    out = []
    for i, (algo, options) in enumerate(SETUPS):
        net = AdapterNetwork(_model(), algo, _select(algo), **options)
        randomize(net, std=0.1)
        path = save_network(net, folder / f"{i}.safetensors")
        tensors, meta = load_tensors(path)
        out.append((tensors, meta))
        out.append((tensors, {}))
    return out


# --------------------------------------------------------------------------- mutations
def _shapes():
    return st.lists(st.integers(0, 9), min_size=0, max_size=5)


def _tensor(draw):
    shape = draw(_shapes())
    dtype = draw(st.sampled_from(DTYPES))
    special = draw(st.sampled_from([None, float("nan"), float("inf"), 0.0, -1.0, 1e30]))
    if not dtype.is_floating_point:
        return torch.randint(0, 3, shape).to(dtype)
    t = torch.randn(shape)
    if special is not None and t.numel():
        t.view(-1)[0] = special
    return t.to(dtype)


def _json(text: str | None):
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


@st.composite
def mutated(draw, sources):
    tensors, meta = sources[draw(st.integers(0, len(sources) - 1))]
    tensors, meta = dict(tensors), dict(meta)
    modules = sorted({k.partition(".")[0] for k in tensors})
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["drop", "retype", "reshape", "value", "rename", "add", "record", "raw", "option"]))
        key = draw(st.sampled_from(sorted(tensors))) if tensors else None
        if kind == "drop" and key:
            del tensors[key]
        elif kind == "retype" and key:
            tensors[key] = tensors[key].to(draw(st.sampled_from(DTYPES)))
        elif kind == "reshape" and key:
            tensors[key] = torch.zeros(draw(_shapes()), dtype=tensors[key].dtype)
        elif kind == "value" and key and tensors[key].is_floating_point() and tensors[key].numel():
            t = tensors[key].clone()
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([float("nan"), float("-inf"), 0.0]))
            tensors[key] = t
        elif kind == "rename" and key:
            value = tensors.pop(key)
            module = draw(st.sampled_from([key.partition(".")[0], "lora_unet_x", "lycoris_nope", "", "a.b"]))
            tensors[f"{module}.{draw(st.sampled_from(SUFFIXES))}"] = value
        elif kind == "add":
            module = draw(st.sampled_from([*modules, "lycoris_ghost"]))
            tensors[f"{module}.{draw(st.sampled_from(SUFFIXES))}"] = _tensor(draw)
        elif kind == "record" and isinstance(records := _json(meta.get("higanbana.modules")), dict):
            name = draw(st.sampled_from([*sorted(records), "lycoris_ghost"]))
            choice = draw(st.integers(0, 3))
            if choice == 0:
                records.pop(name, None)
            elif choice == 1:
                old = records.get(name)
                options = old.get("options") if isinstance(old, dict) else None
                records[name] = {"algo": draw(st.sampled_from(ALGOS)), "options": options}
            elif choice == 2:
                records[name] = draw(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers())))
            else:
                records[name] = {"algo": "lora"}
            meta["higanbana.modules"] = json.dumps(records)
        elif kind == "raw":
            meta["higanbana.modules"] = draw(
                st.one_of(st.text(max_size=20), st.sampled_from(["[]", "{}", "null", "1", '{"a": 1}']))
            )
            if draw(st.booleans()):
                meta["higanbana.format_version"] = draw(st.sampled_from(["1", "2", ""]))
        elif kind == "option" and isinstance(records := _json(meta.get("higanbana.modules")), dict) and records:
            name = draw(st.sampled_from(sorted(records)))
            option = draw(st.sampled_from(["rank", "alpha", "use_tucker", "weight_decompose", "factor", "wat"]))
            value = draw(st.one_of(st.integers(-3, 10**6), st.floats(), st.booleans(), st.text(max_size=3)))
            if isinstance(records[name], dict) and isinstance(records[name].get("options"), dict):
                records[name]["options"][option] = value
            meta["higanbana.modules"] = json.dumps(records)
    return tensors, meta


def _every_reader(path: Path) -> None:
    """Run every reader; anything but success or the project's own error fails the property."""
    try:
        info = file_info(path)
        format_info(info)
    except HiganbanaError:
        pass
    try:
        tensors, records, _ = read_network_file(path)
    except HiganbanaError:
        return  # every reader refuses what the reader refuses: the others must agree
    for strict in (True, False):
        model = _model()
        try:
            net = load_network(path, model, strict=strict)
        except HiganbanaError:
            continue  # refused with the project's own error: the property holds
        net.attach()
        x = torch.randn(2, 8)
        model.fc(x)
        model.conv(torch.randn(1, 4, 5, 5))
        model.norm(x)
        net.detach()
    with contextlib.suppress(HiganbanaError):
        resize_tensors(tensors, records, mode="fixed", param=1, skip_other=True)


@FUZZ
@given(data=st.data())
def test_mutated_tensors_and_metadata(sources, data):
    tensors, meta = data.draw(mutated(sources))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.safetensors"
        try:
            save_tensors(tensors, path, meta)
        except HiganbanaError:
            return
        _every_reader(path)


@FUZZ
@given(data=st.data())
def test_mutated_bytes(sources, data):
    tensors, meta = sources[data.draw(st.integers(0, len(sources) - 1))]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.safetensors"
        save_tensors(tensors, path, meta)
        raw = bytearray(path.read_bytes())
        for _ in range(data.draw(st.integers(1, 8))):
            op = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
            at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
            if op == "flip" and raw:
                raw[at] = data.draw(st.integers(0, 255))
            elif op == "truncate":
                del raw[at:]
            else:
                raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        path.write_bytes(bytes(raw))
        _every_reader(path)


def test_the_sources_are_valid(sources):
    """Every source passes every reader, so the fuzzing starts from files that load."""
    with tempfile.TemporaryDirectory() as tmp:
        for i, (tensors, meta) in enumerate(sources):
            path = save_tensors(tensors, Path(tmp) / f"{i}.safetensors", meta)
            read_network_file(path)
            load_network(path, _model()).detach()

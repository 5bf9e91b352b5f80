"""safeio: names that become paths, atomic files and folders, and what a kill leaves behind."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from higanbana.errors import ConfigError, HiganbanaError
from higanbana.formats import load_tensors, save_tensors
from higanbana.safeio import (
    atomic_folder,
    atomic_path,
    check_name,
    check_writable,
    clean_stale_temps,
    inside,
    write_text,
)


def dead_pid() -> int:
    """The pid of a process that has finished (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("name", ["lora-lr1e-4-e10", "zorb toy", "a.b_c+d=e", "x" * 200, "日本語"])
def test_plain_names_pass(name):
    assert check_name(name, "checkpoints[0].name") == name


@pytest.mark.parametrize(
    "name,why",
    [
        ("", "required"),
        (None, "required"),
        (3, "required"),
        (".", "relative folder"),
        ("..", "relative folder"),
        ("../x", "'/'"),
        ("a/b", "'/'"),
        ("a\\b", "'\\\\'"),
        ("c:evil", "':'"),
        ("a\nb", "'\\n'"),
        ("nul\x00", "'\\x00'"),
        (" lead", "space or a dot"),
        ("trail ", "space or a dot"),
        (".hidden", "space or a dot"),
        ("dot.", "space or a dot"),
        ("x" * 201, "longer than 200"),
        ("a*b", "'*'"),
        ("a?b", "'?'"),
        ('a"b', "'\"'"),
        ("a<b>", "'<'"),
        ("a|b", "'|'"),
    ],
)
def test_unsafe_names_are_refused_naming_the_field(name, why):
    with pytest.raises(ConfigError, match="checkpoints\\[0\\].name") as info:
        check_name(name, "checkpoints[0].name")
    assert why in str(info.value)


def test_inside(tmp_path):
    assert inside(tmp_path, tmp_path / "a" / "b", "x") == tmp_path / "a" / "b"
    with pytest.raises(ConfigError, match="outside the output folder"):
        inside(tmp_path / "out", tmp_path / "out" / ".." / "elsewhere", "save.output_name")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="outside"):
        inside(tmp_path / "out", tmp_path / "out" / "link" / "x", "name")


def test_atomic_path_replaces_or_leaves_nothing(tmp_path):
    target = tmp_path / "a.txt"
    write_text(target, "one")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "one" and sorted(os.listdir(tmp_path)) == ["a.txt"]
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:  # Ctrl-C as well
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]
    write_text(target, "two")
    assert target.read_text() == "two" and sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_write_errors_name_the_destination(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(HiganbanaError, match=r"cannot write .*file/out\.safetensors"):
        save_tensors({"a": torch.zeros(1)}, tmp_path / "file" / "out.safetensors")
    with pytest.raises(HiganbanaError, match="is a folder"):
        write_text(tmp_path, "x")
    with pytest.raises(HiganbanaError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "deeper" / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["file"]
    check_writable(tmp_path / "new" / "out.safetensors")  # creates nothing
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_read_only_folder(tmp_path, monkeypatch):
    """A read-only folder (simulated: root writes anywhere) is one error naming the output."""
    import errno

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(args[0]))

    folder = tmp_path / "ro"
    folder.mkdir()
    with monkeypatch.context() as m:
        m.setattr(Path, "touch", refuse)
        with pytest.raises(HiganbanaError, match="cannot write .*x.safetensors: Read-only file system"):
            check_writable(folder / "x.safetensors")
    with monkeypatch.context() as m:
        m.setattr("higanbana.safeio.os.replace", refuse)
        with pytest.raises(HiganbanaError, match="cannot write .*x.safetensors: Read-only file system"):
            save_tensors({"a": torch.zeros(1)}, folder / "x.safetensors")
    assert os.listdir(folder) == []


def test_stale_temporaries_of_dead_processes_are_cleaned(tmp_path):
    pid = dead_pid()
    stale = tmp_path / f".a.safetensors.{pid}.tmp"
    stale.write_bytes(b"partial")
    stale_png = tmp_path / f".0001.png.{pid}.tmp.png"
    stale_png.write_bytes(b"partial")
    mine = tmp_path / f".b.safetensors.{os.getpid()}.tmp"  # a live writer's temporary is left alone
    mine.write_bytes(b"in flight")
    other = tmp_path / ".not-ours.tmp"
    other.write_bytes(b"")
    save_tensors({"a": torch.zeros(1)}, tmp_path / "c.safetensors")  # any write sweeps its folder
    assert not stale.exists() and not stale_png.exists()
    assert mine.exists() and other.exists()
    assert clean_stale_temps(tmp_path) == 0


def test_stranded_old_folder_is_restored_when_its_destination_is_missing(tmp_path):
    pid = dead_pid()
    old = tmp_path / f".model.{pid}.old"  # a kill between the two renames of a folder replacement
    old.mkdir()
    (old / "weights").write_text("old")
    half = tmp_path / f".model.{pid}.tmpdir"
    half.mkdir()
    assert clean_stale_temps(tmp_path) == 2
    assert (tmp_path / "model" / "weights").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["model"]
    again = tmp_path / f".model.{pid}.old"  # the new folder did arrive: the old one is removed
    again.mkdir()
    assert clean_stale_temps(tmp_path) == 1 and sorted(os.listdir(tmp_path)) == ["model"]


def test_atomic_folder_replaces_rename_then_delete(tmp_path):
    dest = tmp_path / "out"
    with atomic_folder(dest) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(HiganbanaError, match="already exists"), atomic_folder(dest):
        pass
    with pytest.raises(ValueError), atomic_folder(dest, overwrite=True) as tmp:
        (tmp / "a").write_text("2")
        raise ValueError("failed half-way")
    assert (dest / "a").read_text() == "1" and sorted(os.listdir(tmp_path)) == ["out"]
    with atomic_folder(dest, overwrite=True) as tmp:
        (tmp / "a").write_text("3")
    assert (dest / "a").read_text() == "3" and sorted(os.listdir(tmp_path)) == ["out"]


WRITER = """
import sys, time, torch
from higanbana.safeio import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"x" * 1000)
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
"""


def test_kill_9_mid_write_leaves_no_destination_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "adapter.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITER), str(target)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = os.listdir(tmp_path)
    assert left == [f".adapter.safetensors.{proc.pid}.tmp"]  # the destination never appeared
    time.sleep(0.01)
    save_tensors({"a": torch.ones(2)}, target)
    assert os.listdir(tmp_path) == ["adapter.safetensors"]
    assert torch.equal(load_tensors(target)[0]["a"], torch.ones(2))


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_follow_the_users_umask(tmp_path, mask):
    """safetensors creates its file 0600; what we write ends up as any new file would (0666 & ~umask)."""
    old = os.umask(mask)
    try:
        path = save_tensors({"a.weight": torch.zeros(2)}, tmp_path / "x.safetensors", {})
        with atomic_folder(tmp_path / "folder") as folder:
            save_tensors({"b.weight": torch.zeros(2)}, folder / "y.safetensors", {})
    finally:
        os.umask(old)
    for written in (path, tmp_path / "folder" / "y.safetensors"):
        assert stat.S_IMODE(os.stat(written).st_mode) == 0o666 & ~mask, written

"""Safe output: names checked before they become paths, atomic and durable writes, no leftovers.

Every file or folder higanbana writes goes through :func:`atomic_path` or :func:`atomic_folder`:

- the content is written to a hidden temporary name beside the destination,
  ``.<name>.<pid>.tmp`` (``.tmpdir`` for folders), and renamed into place, so a crash or a kill
  never leaves a half-written destination;
- with ``durable`` (the default) the data is flushed (``fsync``) before the rename and the folder
  after it, so a power cut cannot leave a renamed but empty file;
- replacing a folder is rename-then-delete: the old folder becomes ``.<name>.<pid>.old``, the new
  one takes its name, then the old one is removed — at no moment is neither on disk;
- temporaries left by a process that died (``kill -9``, a power cut) carry its pid: the next write
  into the same folder removes them (:func:`clean_stale_temps`; a stranded ``.old`` folder is put
  back when its destination is missing). Liveness is the pid's, on this machine: a writer in
  another pid namespace (another container) sharing the folder would look dead;
- an ``OSError`` (read-only folder, full disk, a parent that is a file) becomes a
  :class:`HiganbanaError` that says ``cannot write PATH: reason``, with nothing left behind.

Names that come from configs or files (checkpoint, concept, configuration and output names) pass
:func:`check_name` before they become a path component, and :func:`inside` checks that a path
stays under its output folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError, HiganbanaError

#: characters never allowed in a name that becomes a path component (portable to Windows too)
_FORBIDDEN = set('/\\:*?"<>|')
MAX_NAME = 200
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<kind>tmp|tmpdir|old)(?:\.[A-Za-z0-9]+)?$")


# --------------------------------------------------------------------------- names
def check_name(name: object, where: str) -> str:
    """``name`` if it is safe as one path component, else a :class:`ConfigError` naming ``where``.

    Refused: a non-string or empty name, ``.`` and ``..``, a leading or trailing space or dot, any of
    ``/ \\ : * ? " < > |``, control characters, and names over 200 characters.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: a name is required (a plain file name), got {name!r}")
    why = ""
    if name in (".", ".."):
        why = "is a relative folder reference"
    elif bad := sorted({c for c in name if c in _FORBIDDEN or ord(c) < 32 or ord(c) == 127}):
        why = f"contains {', '.join(repr(c) for c in bad)}"
    elif name != name.strip() or name.endswith(".") or name.startswith("."):
        why = "starts or ends with a space or a dot"
    elif len(name) > MAX_NAME:
        why = f"is longer than {MAX_NAME} characters"
    if why:
        raise ConfigError(f"{where}: name {name!r} {why}; use a plain file name (letters, digits, '-', '_', '.')")
    return name


def inside(root: str | os.PathLike, path: str | os.PathLike, where: str) -> Path:
    """``path`` (resolved) if it lies under ``root``, else a :class:`ConfigError` naming ``where``."""
    root_r, path_r = Path(root).resolve(), Path(path).resolve()
    if path_r != root_r and root_r not in path_r.parents:
        raise ConfigError(f"{where}: {path} is outside the output folder {root}")
    return Path(path)


# --------------------------------------------------------------------------- temporaries
def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _user_file_mode() -> int:
    """``0o666`` less the process umask: the mode a plain ``open(path, "w")`` would give a new file.
    (Some writers — safetensors' among them — create their file 0600; the result should follow the
    user's umask like any other file.)"""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _with_user_modes(root: Path) -> None:
    mode = _user_file_mode()
    if root.is_file():
        os.chmod(root, mode)
        return
    for folder, _dirs, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(folder, name), mode)


def _temp_name(path: Path, kind: str, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{kind}{suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale_temps(folder: str | os.PathLike, *, recursive: bool = False) -> int:
    """Remove the temporaries that processes no longer running left in ``folder``; returns how many.

    A stranded ``.old`` folder (a kill between the two renames of a folder replacement) is renamed
    back to its destination when that is missing, else removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    walk = os.walk(folder) if recursive else [(str(folder), [], [])]
    for top, _dirs, _files in walk:
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            match = _TEMP.match(entry.name)
            if not match or _alive(int(match["pid"])):
                continue
            path = Path(entry.path)
            target = path.with_name(match["name"])
            try:
                if match["kind"] == "old" and not target.exists():
                    os.replace(path, target)
                else:
                    _remove(path)
                removed += 1
            except OSError:
                continue
    return removed


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk; a file system that cannot is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for top, _dirs, files in os.walk(folder):
        for name in files:
            _fsync(Path(top) / name)
        _fsync(Path(top))


def _write_error(path: Path, exc: OSError) -> HiganbanaError:
    return HiganbanaError(f"cannot write {path}: {exc.strerror or exc}; nothing was written")


def writable_folder(folder: str | os.PathLike, *, create: bool = False, where: str = "", target: object = None) -> Path:
    """Fail early — before minutes of work — when nothing could be written into ``folder``.

    The nearest existing folder at or above it must be a folder that accepts a file (a hidden probe is
    created and removed). With ``create`` the folder is made; without (a dry run), nothing is left.
    A refusal is ``[where: ]cannot write TARGET: reason`` (``target`` defaults to the folder).
    """
    folder = Path(folder)
    target = folder if target is None else target
    prefix = f"{where}: " if where else ""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        reason = "it is a file, not a folder" if existing == folder else f"{existing} is a file, not a folder"
        raise HiganbanaError(f"{prefix}cannot write {target}: {reason}")
    probe = (folder if create else existing) / f".write-test.{os.getpid()}.tmp"
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
    except OSError as exc:
        raise HiganbanaError(f"{prefix}cannot write {target}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    return folder


def check_writable(path: str | os.PathLike) -> Path:
    """:func:`writable_folder` for the folder of the file ``path`` (nothing is created)."""
    writable_folder(Path(path).parent, target=path)
    return Path(path)


def discard(path: str | os.PathLike) -> None:
    """Remove a file or folder rename-first: a kill midway leaves a hidden temporary that the next write
    into the folder sweeps away (:func:`clean_stale_temps`), never a half-deleted folder under its name."""
    path = Path(path)
    doomed = _temp_name(path, "tmpdir" if path.is_dir() else "tmp")
    try:
        os.replace(path, doomed)
    except OSError:
        doomed = path
    _remove(doomed)


# --------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, durable: bool = True, sweep: bool = True, suffix: str = ""
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends it replaces ``path`` atomically.

    ``suffix`` ends the temporary name (``.png`` for writers that choose a format by it). ``sweep``
    first removes stale temporaries of dead processes in the folder (callers writing thousands of
    files into one folder sweep once themselves and pass ``False``). On any error, or Ctrl-C, the
    temporary is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = _temp_name(path, "tmp", suffix)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if sweep:
            clean_stale_temps(path.parent)
        if path.is_dir():
            raise IsADirectoryError(21, "is a folder", str(path))
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        yield tmp
        if not tmp.exists():
            raise HiganbanaError(f"cannot write {path}: the writer produced nothing")
        _with_user_modes(tmp)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename not in (None, str(tmp), str(path), str(path.parent)):
            raise
        raise _write_error(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False, durable: bool = True) -> Iterator[Path]:
    """Yield a new empty temporary folder; when the block ends it becomes ``path``.

    An existing ``path`` is an error unless ``overwrite``; then it is replaced rename-then-delete,
    so a kill at any moment leaves either the old or the new folder (a stranded old one is put back
    by the next write, see :func:`clean_stale_temps`).
    """
    path = Path(path)
    tmp, old = _temp_name(path, "tmpdir"), _temp_name(path, "old")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(path.parent)
        if path.exists() and not overwrite:
            raise HiganbanaError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(20, "is a file, not a folder", str(path))
        _remove(tmp)
        tmp.mkdir()
    except OSError as exc:
        raise _write_error(path, exc) from exc
    moved = False
    try:
        yield tmp
        _with_user_modes(tmp)
        if durable:
            _fsync_tree(tmp)
        if path.exists():
            os.replace(path, old)
            moved = True
        os.replace(tmp, path)
        moved = False
        if durable:
            _fsync(path.parent)
        _remove(old)
    except BaseException as exc:
        _remove(tmp)
        if moved:
            os.replace(old, path)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from exc
        if isinstance(exc, HiganbanaError) and str(tmp) in str(exc):  # name the destination, not the temporary
            raise HiganbanaError(str(exc).replace(str(tmp), str(path))) from exc
        raise


def write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)

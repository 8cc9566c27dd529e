"""Atomic file writes: a crash never leaves a half-written mask, checkpoint or result.

Files and directories are created with the usual permissions (``0o666`` / ``0o777`` less
the umask, as ``open()`` and ``mkdir`` do), not the owner-only modes of ``tempfile``, so
a shared cache or run directory stays readable by the group. A failed write raises a
one-line ``LeanKError`` naming the path.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import LeanKError


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _reason(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


def write_error(path: str | os.PathLike, err: OSError) -> LeanKError:
    """The one-line error for a failed write of ``path``."""
    return LeanKError(f"cannot write {path}: {_reason(err)} (check the path, its permissions and the free space)")


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p`` with a one-line ``LeanKError`` on failure (a file in the way, no permission)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise LeanKError(f"cannot create directory {path}: {blocker} is a file, not a directory") from None
    except OSError as e:
        raise write_error(path, e) from None
    return path


def make_shared_tempdir(prefix: str, dir: str | os.PathLike) -> Path:
    """``tempfile.mkdtemp`` with the umask's permissions instead of 0700."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Fail now, in one line, if files cannot be created in directory ``path``.

    Nothing is left behind: if ``path`` does not exist, its nearest existing ancestor is
    probed (it must be a directory where a file can be created) and ``path`` is not made.
    Probing by creating a file works as root too, where permission bits do not stop writes.
    """
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        what = "is not a directory" if probe == path else f"cannot be created: {probe} is a file"
        raise LeanKError(f"output directory {path} {what}: choose another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".leank-write-test.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise LeanKError(f"cannot write to {path}: {_reason(e)} in {probe}: choose another output path") from None
    return path


def check_writable_file(path: str | os.PathLike) -> Path:
    """:func:`check_writable_dir` for a file's directory; ``path`` itself must not be a directory."""
    path = Path(path)
    if path.is_dir():
        raise LeanKError(f"output {path} is a directory: pass a file name, e.g. {path / 'mask.safetensors'}")
    check_writable_dir(path.parent)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result over ``path`` in one rename."""
    path = Path(path)
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        write(tmp)
        # mkstemp makes 0600 (and a writer may re-create the file): give it what open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")

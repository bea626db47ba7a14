"""Writing files so that a crash, an error or a kill never leaves half a file behind.

Everything edgequant writes for the user (checkpoints, ONNX models, TIDL files,
reports, cached float models) is written in full to a temporary first and only then
put in place by an atomic rename in the destination's directory: readers see the old
file or the new one, never a mix. `atomic_path` is the one way to do it.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before any work, when `path` cannot be written."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: directory {parent} is not writable")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory; give a file name")
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Linux: an O_TMPFILE file has no name until it is linked into place, so a process killed
# mid-write (even by SIGKILL) leaves nothing behind. linkat(AT_SYMLINK_FOLLOW) on its
# /proc/self/fd link gives it a name; os.link cannot (it does not follow /proc's link).
_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _anonymous_file(directory: Path) -> int | None:
    """A nameless file in `directory`, or None where the OS or file system has none."""
    if _LIBC is None or not hasattr(os, "O_TMPFILE"):
        return None
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o666 & ~_umask())
    except OSError:  # e.g. a file system without O_TMPFILE support
        return None


def _link(fd: int, destination: Path) -> None:
    """Give the anonymous file `fd` the name `destination`, replacing any file there atomically."""
    fd_path = f"/proc/self/fd/{fd}".encode()
    staging = destination.with_name(f".{destination.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    if _LIBC.linkat(_AT_FDCWD, fd_path, _AT_FDCWD, os.fsencode(staging), _AT_SYMLINK_FOLLOW) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"cannot link the written file into {destination.parent}: {os.strerror(error)}")
    os.replace(staging, destination)  # (linkat cannot replace; the staging name lives for one rename)


@contextmanager
def atomic_path(path: str | os.PathLike, anonymous: bool = True) -> Iterator[Path]:
    """A temporary path for the contents of `path`, put in place when the block succeeds.

    If the block raises, or the process dies, an existing file at `path` is left as it
    was. On Linux the temporary is a nameless file (reached through /proc/self/fd), so
    not even a SIGKILL leaves a temporary behind; elsewhere (or with anonymous=False,
    for writers that put side files next to the path, such as ONNX external data) it is
    a hidden file in the same directory, removed if the block raises. A block may hand
    the temporary to `keep_as` instead, to keep it under another name.
    """
    path = check_writable(path)
    fd = _anonymous_file(path.parent) if anonymous else None
    if fd is not None:
        try:
            tmp = Path(f"/proc/self/fd/{fd}")
            yield tmp
            if fd in _KEPT:
                return
            os.fchmod(fd, 0o666 & ~_umask())
            _link(fd, path)
        finally:
            _KEPT.discard(fd)
            os.close(fd)
        return
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(descriptor)
    try:
        yield Path(name)
        if not os.path.exists(name):
            return  # handed to keep_as
        # mkstemp creates the file private (0600); give it the mode a plain open() would.
        os.chmod(name, 0o666 & ~_umask())
        os.replace(name, path)
    except BaseException:
        if os.path.exists(name):
            os.remove(name)
        raise


_KEPT: set[int] = set()


def keep_as(tmp: Path, destination: Path) -> None:
    """Keep an atomic_path temporary at `destination` (e.g. a rejected export, for inspection)."""
    if str(tmp).startswith("/proc/self/fd/"):
        fd = int(tmp.name)
        _link(fd, destination)
        _KEPT.add(fd)
    else:
        os.replace(tmp, destination)


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through atomic_path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path

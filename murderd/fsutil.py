"""Atomic file operations: nothing murderd writes is ever seen half-written."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = None


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Write data to path via a temp file in the same directory, fsync, rename, fsync dir."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, value, mode: int = 0o644) -> None:
    atomic_write(path, json.dumps(value, indent=1, sort_keys=True).encode() + b"\n", mode)


def read_json(path: str | os.PathLike):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def fsync_dir(directory: str | os.PathLike) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False where unsupported."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is None:
        return False
    res = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def replace_tree(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put directory (or file) new at target atomically, replacing what was there.

    A file replaces a file with rename(2).  A directory replacing an existing one is swapped
    in with RENAME_EXCHANGE, so target never disappears; the old tree is then removed.
    """
    new, target = Path(new), Path(target)
    if not target.is_dir() or target.is_symlink():
        os.replace(new, target)
    elif exchange(new, target):
        shutil.rmtree(new)  # new now holds the old tree
    else:
        aside = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, aside)
        os.rename(new, target)
        shutil.rmtree(aside)
    fsync_dir(target.parent)


def free_bytes(directory: str | os.PathLike) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def ensure_dir(path: str | os.PathLike, mode: int = 0o755) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    return path


def can_hardlink(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> bool:
    """Whether a file in src_dir can be hard-linked into dst_dir (same mount)."""
    fd, probe = tempfile.mkstemp(dir=src_dir, prefix=".murderd-probe-")
    os.close(fd)
    target = Path(dst_dir) / Path(probe).name
    try:
        os.link(probe, target)
    except OSError:
        return False
    else:
        os.unlink(target)
        return True
    finally:
        os.unlink(probe)

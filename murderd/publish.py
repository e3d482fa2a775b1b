"""Placing finished deploys on a peer: atomic placement, safe extraction, retention.

The destination never shows a partial file: data is hard-linked (or copied) under a hidden
temporary name in the destination directory, then renamed into place; a directory replaces
an older one with an atomic exchange.  Archives are unpacked member by member with every
path checked, into a hidden directory that is renamed into place when complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from . import fsutil

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
TMP_PREFIX = ".murderd-"


class PlacementError(Exception):
    """A deploy cannot be placed (unsafe destination, archive member escaping ...)."""


def check_destination(destination: Path, relpaths: list[str]) -> None:
    """Refuse when any path a deploy would occupy goes through or onto a symlink.

    Names starting with TMP_PREFIX are murderd's own in the destination (temporary names
    while placing, and by default the peer's staging_dir): no deploy may take one.
    """
    root = destination.resolve()
    for rel in relpaths:
        parts = PurePosixPath(rel).parts
        if parts and parts[0].startswith(TMP_PREFIX):
            raise PlacementError(
                f"{parts[0]!r}: names starting with {TMP_PREFIX!r} are murderd's own"
            )
        current = destination
        for part in parts:
            current = current / part
            if current.is_symlink():
                raise PlacementError(f"{current} is a symlink: refusing to write through it")
        target = current.resolve()
        if root not in target.parents:
            raise PlacementError(f"{rel} would land outside {destination}")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def place(staging: Path, destination: Path, top: str, info_hash: str) -> Path:
    """Put staging/top (a file or a directory) at destination/top atomically.

    The staged data stays where it is (libtorrent keeps seeding it); the destination gets
    hard links, so no data is copied on the same filesystem.
    """
    source = staging / top
    target = destination / top
    check_destination(destination, [top])
    tmp = destination / f"{TMP_PREFIX}{info_hash[:12]}-{top}"
    _remove(tmp)
    try:
        if source.is_dir():
            for dirpath, _dirnames, filenames in os.walk(source):
                rel = Path(dirpath).relative_to(source)
                (tmp / rel).mkdir(parents=True, exist_ok=True)
                for name in filenames:
                    _link_or_copy(Path(dirpath, name), tmp / rel / name)
        else:
            _link_or_copy(source, tmp)
        fsutil.replace_tree(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    return target


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def archive_stem(name: str) -> str | None:
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _safe_member(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("\\"):
        raise PlacementError(f"archive member {name!r} has an absolute path")
    if any(part == ".." for part in path.parts):
        raise PlacementError(f"archive member {name!r} escapes its directory")
    if any(ord(c) < 32 for c in name):
        raise PlacementError(f"archive member {name!r} has a control character")
    return path


def _extract_tar(archive: Path, into: Path) -> int:
    count = 0
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            rel = _safe_member(member.name)
            if member.issym() or member.islnk():
                raise PlacementError(f"archive member {member.name!r} is a link: refused")
            if not (member.isfile() or member.isdir()):
                raise PlacementError(f"archive member {member.name!r} is a special file")
            target = into / rel
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            with source, open(target, "xb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            os.chmod(target, member.mode & 0o755 | 0o644)
            count += 1
    return count


def _extract_zip(archive: Path, into: Path) -> int:
    count = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            rel = _safe_member(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise PlacementError(f"archive member {info.filename!r} is a link: refused")
            target = into / rel
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as source, open(target, "xb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            count += 1
    return count


def extract(archive: Path, destination: Path, info_hash: str) -> Path:
    """Unpack archive into destination/<name without extension>/ atomically and safely."""
    stem = archive_stem(archive.name)
    if stem is None:
        raise PlacementError(f"{archive.name} is not a .tar, .tar.gz, .tgz or .zip archive")
    target = destination / stem
    check_destination(destination, [stem])
    tmp = destination / f"{TMP_PREFIX}x-{info_hash[:12]}-{stem}"
    _remove(tmp)
    tmp.mkdir()
    try:
        if archive.name.endswith(".zip"):
            count = _extract_zip(archive, tmp)
        else:
            count = _extract_tar(archive, tmp)
        for dirpath, _dirs, _files in os.walk(tmp):  # nothing escaped through a symlink
            if Path(dirpath).is_symlink():
                raise PlacementError(f"{dirpath} became a symlink during extraction")
        fsutil.replace_tree(tmp, target)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        _remove(tmp)
        raise PlacementError(f"{archive.name}: damaged archive: {exc}") from None
    except BaseException:
        _remove(tmp)
        raise
    log.info("extracted %d files of %s into %s", count, archive.name, target)
    return target


def remove_placed(path: Path) -> None:
    """Remove something murderd placed earlier (retention)."""
    _remove(path)

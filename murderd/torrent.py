"""Make, parse and validate deploy torrents.

Torrents are v1 by default (every client speaks it) with each file's SHA-256 recorded in the
info dictionary (key ``sha256``, 32 raw bytes) so a peer verifies the placed file end to end.
All bencoding is libtorrent's.  Parsing validates everything a hostile torrent could abuse
before anything touches disk: sizes, piece counts, and names (no absolute paths, no ``..``,
no control characters, no symlinks).
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import __version__
from .lt import bdecode, bencode, create_torrent, info_hash_hex, set_piece_hashes, torrent_info

FORMATS = ("v1", "hybrid", "v2")
MIN_PIECE = 128 * 1024
MAX_PIECE = 16 * 1024 * 1024
TARGET_PIECES = 1500
READ_CHUNK = 4 * 1024 * 1024
MAX_NAME_BYTES = 255
MAX_FILES = 100_000


class TorrentError(ValueError):
    """A torrent (or a file to make one of) that murderd refuses; the message says why."""


class FileChangedError(TorrentError):
    """The file changed (or vanished) while it was being hashed."""


def choose_piece_size(total_size: int) -> int:
    """A power of two giving about TARGET_PIECES pieces, within 128 KiB .. 16 MiB.

    Few big pieces cut per-piece overhead on a fast LAN; enough pieces keep every peer
    busy trading with the others from the first seconds.  Small deploys get 128 KiB: a
    piece goes on to the other peers only once it is whole, so a swarm runs a few pieces
    per peer behind its source (bench/, session 8, with lt.py's request queues: N=16, 64
    MiB, 9.31 s against 9.46 with 256 KiB, medians of 3 in two sittings; session 6, with
    whole pieces from one peer, had measured 128 KiB worse at N=16).
    """
    size = MIN_PIECE
    while size < MAX_PIECE and total_size / size > TARGET_PIECES:
        size *= 2
    return size


@dataclass
class SourceFile:
    relpath: str  # path inside the torrent, '/'-separated, starting with the torrent's name
    abspath: str
    size: int
    mtime_ns: int


def list_source(path: str | os.PathLike) -> list[SourceFile]:
    """The regular files making up a deploy (a file, or a directory walked in name order).

    Symlinks, FIFOs and other special files are refused: a deploy is regular files only.
    """
    root = Path(path)
    try:
        st = root.lstat()
    except FileNotFoundError:
        raise FileChangedError(f"{root}: vanished before it could be hashed") from None
    if stat.S_ISREG(st.st_mode):
        return [SourceFile(root.name, str(root), st.st_size, st.st_mtime_ns)]
    if not stat.S_ISDIR(st.st_mode):
        raise TorrentError(f"{root}: not a regular file or directory")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath, name)
            fst = full.lstat()
            if not stat.S_ISREG(fst.st_mode):
                raise TorrentError(f"{full}: not a regular file (symlink or special file)")
            rel = full.relative_to(root.parent).as_posix()
            out.append(SourceFile(rel, str(full), fst.st_size, fst.st_mtime_ns))
    if not out:
        raise TorrentError(f"{root}: directory holds no files")
    if len(out) > MAX_FILES:
        raise TorrentError(f"{root}: more than {MAX_FILES} files")
    return out


@dataclass
class MadeTorrent:
    data: bytes  # the .torrent file
    info_hash: str  # 40 hex chars (v1, or truncated v2 for v2-only)
    name: str
    total_size: int
    piece_size: int
    sha256: dict = field(default_factory=dict)  # relpath -> hex
    sources: list = field(default_factory=list)  # SourceFile snapshot that was hashed


def _check_unchanged(files: list[SourceFile]) -> None:
    for f in files:
        try:
            st = os.lstat(f.abspath)
        except FileNotFoundError:
            raise FileChangedError(f"{f.abspath}: deleted while being hashed") from None
        if st.st_size != f.size or st.st_mtime_ns != f.mtime_ns:
            raise FileChangedError(f"{f.abspath}: changed while being hashed")


def _hash_v1(ct, files: list[SourceFile], piece_size: int, progress) -> dict:
    """One read pass: SHA-1 per piece (the torrent) and SHA-256 per file, on two threads."""
    by_path = {f.relpath: f for f in files}
    storage = ct.files()
    sha256 = {}
    piece = 0
    piece_hash = hashlib.sha1()
    filled = 0
    done = 0
    with ThreadPoolExecutor(1, thread_name_prefix="sha256") as pool:
        for index in range(storage.num_files()):
            size = storage.file_size(index)
            relpath = storage.file_path(index).replace(os.sep, "/")
            source = by_path.get(relpath)
            file_hash = hashlib.sha256()
            # None: a pad file (zeros).  Closed in the finally below.
            handle = open(source.abspath, "rb") if source else None  # noqa: SIM115
            try:
                remaining = size
                while remaining:
                    want = min(piece_size - filled, remaining, READ_CHUNK)
                    if handle is None:
                        chunk = bytes(want)
                    else:
                        chunk = handle.read(want)
                        if len(chunk) != want:
                            raise FileChangedError(f"{source.abspath}: shrank while being hashed")
                    pending = pool.submit(file_hash.update, chunk) if handle else None
                    piece_hash.update(chunk)
                    if pending:
                        pending.result()
                    filled += want
                    remaining -= want
                    done += want
                    if filled == piece_size:
                        ct.set_hash(piece, piece_hash.digest())
                        piece += 1
                        piece_hash = hashlib.sha1()
                        filled = 0
                        if progress:
                            progress(done)
            finally:
                if handle:
                    handle.close()
            if source:
                sha256[relpath] = file_hash.hexdigest()
    if filled:
        ct.set_hash(piece, piece_hash.digest())
    return sha256


def sha256_file(path: str | os.PathLike, chunk: int = READ_CHUNK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def make_torrent(
    path: str | os.PathLike,
    trackers: list[str],
    piece_size: int = 0,
    fmt: str = "v1",
    comment: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> MadeTorrent:
    """Hash a file or directory into a private torrent (blocking: run it off the loop)."""
    if fmt not in FORMATS:
        raise TorrentError(f"unknown torrent format {fmt!r} (use one of {', '.join(FORMATS)})")
    files = list_source(path)
    total = sum(f.size for f in files)
    if total == 0:
        raise TorrentError(f"{path}: is empty; an empty deploy cannot be a torrent")
    if piece_size and (piece_size < 16384 or piece_size & (piece_size - 1)):
        raise TorrentError(f"piece size {piece_size} is not a power of two of 16 KiB or more")
    piece_size = piece_size or choose_piece_size(total)
    ct = create_torrent([(f.relpath, f.size) for f in files], piece_size, fmt)
    for tier, url in enumerate(trackers):
        ct.add_tracker(url, tier)
    ct.set_priv(True)
    ct.set_creator(f"murderd {__version__}")
    if comment:
        ct.set_comment(comment)
    if fmt == "v1":
        sha256 = _hash_v1(ct, files, piece_size, progress)
    else:
        parent = str(Path(path).parent)
        with ThreadPoolExecutor(len(files), thread_name_prefix="sha256") as pool:
            futures = {f.relpath: pool.submit(sha256_file, f.abspath) for f in files}
            set_piece_hashes(ct, parent, (lambda p: progress(p * piece_size)) if progress else None)
            sha256 = {rel: fut.result() for rel, fut in futures.items()}
    _check_unchanged(files)
    entry = ct.generate()
    entry[b"creation date"] = int(time.time())
    info = entry[b"info"]
    if b"files" in info:
        for item in info[b"files"]:
            if item.get(b"attr", b"").find(b"p") >= 0:
                continue
            rel = "/".join([info[b"name"].decode()] + [p.decode() for p in item[b"path"]])
            item[b"sha256"] = bytes.fromhex(sha256[rel])
    else:
        info[b"sha256"] = bytes.fromhex(sha256[files[0].relpath])
    data = bencode(entry)
    parsed = parse(data)
    return MadeTorrent(
        data=data,
        info_hash=parsed.info_hash,
        name=parsed.name,
        total_size=total,
        piece_size=piece_size,
        sha256=sha256,
        sources=files,
    )


# --- parsing and validation -------------------------------------------------------------


@dataclass
class TorrentFile:
    path: str  # '/'-separated, relative, starting with the torrent's name for multi-file
    size: int
    sha256: str | None  # hex, when the torrent records it


@dataclass
class Torrent:
    data: bytes
    name: str
    info_hash: str
    total_size: int
    piece_size: int
    num_pieces: int
    files: list  # [TorrentFile] without pad files
    trackers: list
    multi_file: bool
    has_v2: bool
    info: object = None  # libtorrent torrent_info
    # A hybrid torrent is announced under its v1 hash and its truncated v2 hash too.
    v2_alias: str | None = None

    @property
    def has_sha256(self) -> bool:
        return all(f.sha256 for f in self.files)


def check_name(component: bytes | str, what: str = "name") -> str:
    """One path component, decoded and checked safe; TorrentError naming the problem."""
    if isinstance(component, bytes):
        try:
            component = component.decode("utf-8")
        except UnicodeDecodeError:
            raise TorrentError(f"{what} {component!r} is not UTF-8") from None
    if not isinstance(component, str):
        raise TorrentError(f"{what} is not a string")
    if component in ("", ".", ".."):
        raise TorrentError(f"{what} {component!r} is not allowed (empty, '.' or '..')")
    if "/" in component or "\\" in component:
        raise TorrentError(f"{what} {component!r} contains a path separator")
    if any(ord(c) < 32 or ord(c) == 127 for c in component):
        raise TorrentError(f"{what} {component!r} contains a control character")
    if len(component.encode("utf-8")) > MAX_NAME_BYTES:
        raise TorrentError(f"{what} is longer than {MAX_NAME_BYTES} bytes")
    return component


def _v1_files(info: dict, name: str) -> list[TorrentFile]:
    raw = info.get(b"files")
    if raw is None:
        length = info.get(b"length")
        if not isinstance(length, int) or length < 0:
            raise TorrentError("single-file torrent without a valid length")
        digest = info.get(b"sha256")
        return [TorrentFile(name, length, _sha256_hex(digest))]
    if not isinstance(raw, list) or not raw:
        raise TorrentError("'files' is not a non-empty list")
    if len(raw) > MAX_FILES:
        raise TorrentError(f"more than {MAX_FILES} files")
    out = []
    for item in raw:
        if not isinstance(item, dict):
            raise TorrentError("a 'files' entry is not a dictionary")
        attr = item.get(b"attr", b"")
        if isinstance(attr, bytes) and b"l" in attr:
            raise TorrentError("symlink entries are not allowed")
        parts = item.get(b"path")
        if not isinstance(parts, list) or not parts:
            raise TorrentError("a 'files' entry has no path")
        length = item.get(b"length")
        if not isinstance(length, int) or length < 0:
            raise TorrentError("a 'files' entry has no valid length")
        names = [check_name(p, "path component") for p in parts]
        if isinstance(attr, bytes) and b"p" in attr:
            continue  # pad file: never written to disk as a file
        out.append(TorrentFile("/".join([name] + names), length, _sha256_hex(item.get(b"sha256"))))
    return out


def _v2_files(tree: dict, prefix: list[str], out: list, depth: int = 0) -> None:
    if depth > 64:
        raise TorrentError("file tree nested too deeply")
    if not isinstance(tree, dict):
        raise TorrentError("'file tree' is malformed")
    for key, node in tree.items():
        if key == b"" and isinstance(node, dict):
            length = node.get(b"length")
            if not isinstance(length, int) or length < 0:
                raise TorrentError("a 'file tree' entry has no valid length")
            if b"l" in node.get(b"attr", b""):
                raise TorrentError("symlink entries are not allowed")
            out.append(TorrentFile("/".join(prefix), length, None))
            continue
        _v2_files(node, prefix + [check_name(key, "path component")], out, depth + 1)
        if len(out) > MAX_FILES:
            raise TorrentError(f"more than {MAX_FILES} files")


def _check_unique(paths: list[str]) -> None:
    """Refuse a path listed twice, or as a file and as a directory (libtorrent would
    rename one of them, and the end-to-end check would read the wrong file)."""
    files: set[str] = set()
    directories: set[str] = set()
    for path in paths:
        if path in files:
            raise TorrentError(f"path {path!r} appears twice")
        if path in directories:
            raise TorrentError(f"path {path!r} is both a file and a directory")
        files.add(path)
        parts = path.split("/")
        for end in range(1, len(parts)):
            parent = "/".join(parts[:end])
            if parent in files:
                raise TorrentError(f"path {parent!r} is both a file and a directory")
            directories.add(parent)


def _sha256_hex(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, bytes) or len(value) != 32:
        raise TorrentError("'sha256' is not 32 raw bytes")
    return value.hex()


def parse(data: bytes, max_bytes: int = 16 * 1024 * 1024, max_total: int | None = None) -> Torrent:
    """Parse and validate a .torrent; TorrentError says why a torrent is refused."""
    if len(data) > max_bytes:
        raise TorrentError(f"torrent file is {len(data)} bytes, more than the cap of {max_bytes}")
    try:
        top = bdecode(data)
    except ValueError as exc:
        raise TorrentError(str(exc)) from None
    if not isinstance(top, dict) or not isinstance(top.get(b"info"), dict):
        raise TorrentError("no info dictionary")
    info = top[b"info"]
    name = check_name(info.get(b"name", b""), "name")
    piece_size = info.get(b"piece length")
    if not isinstance(piece_size, int) or piece_size < 16384 or piece_size & (piece_size - 1):
        raise TorrentError("piece length is not a power of two of 16 KiB or more")
    has_v1 = b"pieces" in info
    has_v2 = b"file tree" in info
    if not has_v1 and not has_v2:
        raise TorrentError("neither v1 pieces nor a v2 file tree")
    if has_v1:
        files = _v1_files(info, name)
        multi = b"files" in info
    else:
        files = []
    if has_v2:
        v2files: list = []
        _v2_files(info[b"file tree"], [], v2files)
        _check_unique([f.path for f in v2files])
        if not has_v1:
            multi = len(v2files) != 1 or v2files[0].path != name
            files = [
                TorrentFile(f"{name}/{f.path}" if multi else f.path, f.size, None) for f in v2files
            ]
        if not v2files:
            raise TorrentError("empty file tree")
    _check_unique([f.path for f in files])
    total = sum(f.size for f in files)
    if total <= 0:
        raise TorrentError("torrent holds no data")
    if max_total is not None and total > max_total:
        raise TorrentError(f"deploy is {total} bytes, more than the cap of {max_total}")
    pieces = (total + piece_size - 1) // piece_size
    if has_v1:
        raw_pieces = info.get(b"pieces")
        if not isinstance(raw_pieces, bytes) or len(raw_pieces) % 20:
            raise TorrentError("'pieces' is not a multiple of 20 bytes")
    try:
        # v2 aligns every file to a piece boundary: up to one more piece per file.
        ti = torrent_info(data, max_pieces=pieces + len(files) + 1)
    except ValueError as exc:
        raise TorrentError(str(exc)) from None
    if ti.total_size() < total:
        raise TorrentError("libtorrent sees a different size than the info dictionary")
    trackers = _trackers(top)

    return Torrent(
        data=bytes(data),
        name=name,
        info_hash=info_hash_hex(ti),
        v2_alias=str(ti.info_hashes().v2)[:40] if has_v1 and has_v2 else None,
        total_size=total,
        piece_size=piece_size,
        num_pieces=ti.num_pieces(),
        files=files,
        trackers=trackers,
        multi_file=multi,
        has_v2=has_v2,
        info=ti,
    )


def _trackers(top: dict) -> list[str]:
    urls = []
    tiers = top.get(b"announce-list")
    if isinstance(tiers, list):
        for tier in tiers:
            for url in tier if isinstance(tier, list) else []:
                if isinstance(url, bytes):
                    urls.append(url.decode("utf-8", "replace"))
    announce = top.get(b"announce")
    if isinstance(announce, bytes) and announce.decode("utf-8", "replace") not in urls:
        urls.insert(0, announce.decode("utf-8", "replace"))
    return urls


def load(path: str | os.PathLike, **limits) -> Torrent:
    with open(path, "rb") as handle:
        data = handle.read(limits.get("max_bytes", 16 * 1024 * 1024) + 1)
    return parse(data, **limits)


def verify_data(parsed: Torrent, target: str | os.PathLike) -> list[str]:
    """Check a file (single-file torrent) or directory (multi-file) against a torrent.

    Sizes, the recorded SHA-256 of each file, and every piece hash.  Returns the problems
    found; empty means the data matches.
    """
    from .lt import check_pieces

    target = Path(target)
    root = target.parent
    problems = []
    if target.name != parsed.name:
        # Verify a file under another name: look at it through a same-named link.
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="murderctl-verify-"))
        try:
            (tmp / parsed.name).symlink_to(target.resolve())
            return verify_data(parsed, tmp / parsed.name)
        finally:
            (tmp / parsed.name).unlink()
            tmp.rmdir()
    for f in parsed.files:
        path = root / f.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{f.path}: missing")
            continue
        if size != f.size:
            problems.append(f"{f.path}: {size} bytes, torrent says {f.size}")
            continue
        if f.sha256:
            actual = sha256_file(path)
            if actual != f.sha256:
                problems.append(f"{f.path}: sha256 {actual}, torrent says {f.sha256}")
    if problems:
        return problems
    bad = check_pieces(parsed.info, str(root))
    if bad:
        problems.append(f"{len(bad)} of {parsed.num_pieces} pieces fail their hash: {bad[:10]}")
    return problems

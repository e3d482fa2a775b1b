"""Torrents: made with libtorrent, read back by libtorrent; sha256 keys; formats; validation."""

from __future__ import annotations

import hashlib
import os

import pytest

from murderd import torrent
from murderd.lt import bdecode, bencode, lt

TRACKERS = ["http://127.0.0.1:8998/announce", "http://127.0.0.2:8998/announce"]


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "release"
    (root / "bin").mkdir(parents=True)
    files = {
        "release/app.jar": os.urandom(700_000),
        "release/bin/run.sh": b"#!/bin/sh\necho hi\n",
        "release/README": os.urandom(1),
    }
    for rel, data in files.items():
        (tmp_path / rel).write_bytes(data)
    return root, {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


def test_single_file_v1_round_trip(tmp_path):
    data = os.urandom(1_500_000)
    (tmp_path / "app.bin").write_bytes(data)
    made = torrent.make_torrent(tmp_path / "app.bin", TRACKERS)
    ti = lt.torrent_info(lt.bdecode(made.data))
    assert ti.name() == "app.bin"
    assert ti.total_size() == len(data)
    assert ti.priv()
    assert ti.info_hashes().has_v1() and not ti.info_hashes().has_v2()
    assert str(ti.info_hashes().v1) == made.info_hash
    info = bdecode(made.data)[b"info"]
    assert info[b"sha256"] == hashlib.sha256(data).digest()
    assert len(info[b"sha256"]) == 32
    # Piece hashes are what libtorrent itself computes for the same data.
    for piece in range(ti.num_pieces()):
        start = piece * ti.piece_length()
        chunk = data[start : start + ti.piece_length()]
        assert ti.hash_for_piece(piece) == hashlib.sha1(chunk).digest()
    parsed = torrent.parse(made.data)
    assert parsed.trackers == TRACKERS
    assert parsed.files[0].sha256 == hashlib.sha256(data).hexdigest()


def test_multi_file_v1_sha256_per_file(tree):
    root, sums = tree
    made = torrent.make_torrent(root, TRACKERS, piece_size=16384)
    info = bdecode(made.data)[b"info"]
    seen = {}
    for entry in info[b"files"]:
        rel = "/".join(["release"] + [p.decode() for p in entry[b"path"]])
        seen[rel] = entry[b"sha256"].hex()
    assert seen == sums
    assert b"sha256" not in info  # only per file in a multi-file torrent
    parsed = torrent.parse(made.data)
    assert {f.path: f.sha256 for f in parsed.files} == sums
    assert parsed.multi_file
    # The data checks out against the torrent (sizes, sha256, every piece).
    assert torrent.verify_data(parsed, root) == []
    (root / "bin" / "run.sh").write_bytes(b"#!/bin/sh\necho HI\n")
    problems = torrent.verify_data(parsed, root)
    assert problems and "run.sh" in problems[0]


@pytest.mark.parametrize("fmt", ["hybrid", "v2"])
def test_v2_hashes_present(tree, fmt):
    root, sums = tree
    made = torrent.make_torrent(root, TRACKERS, fmt=fmt)
    ti = lt.torrent_info(lt.bdecode(made.data))
    assert ti.info_hashes().has_v2()
    assert ti.info_hashes().has_v1() == (fmt == "hybrid")
    info = bdecode(made.data)[b"info"]
    assert b"file tree" in info
    assert b"piece layers" in bdecode(made.data)
    parsed = torrent.parse(made.data)
    assert sorted(f.path for f in parsed.files) == sorted(sums)
    assert torrent.verify_data(parsed, root) == []


@pytest.mark.parametrize(
    "size,expected",
    [
        (1, 128 * 1024),
        (64 << 20, 128 * 1024),
        (256 << 20, 256 * 1024),
        (1 << 30, 1 << 20),
        (10 << 30, 8 << 20),
        (1 << 40, 16 << 20),
    ],
)
def test_piece_size_from_file_size(size, expected):
    assert torrent.choose_piece_size(size) == expected


def test_piece_size_given_and_checked(tmp_path):
    (tmp_path / "f").write_bytes(os.urandom(100_000))
    assert torrent.make_torrent(tmp_path / "f", TRACKERS, piece_size=32768).piece_size == 32768
    with pytest.raises(torrent.TorrentError, match="power of two"):
        torrent.make_torrent(tmp_path / "f", TRACKERS, piece_size=30000)


def test_refuses_empty_and_special_files(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(torrent.TorrentError, match="empty"):
        torrent.make_torrent(tmp_path / "empty", TRACKERS)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(torrent.TorrentError, match="not a regular file"):
        torrent.make_torrent(tmp_path / "fifo", TRACKERS)
    (tmp_path / "real").write_bytes(b"x")
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(torrent.TorrentError, match="not a regular file"):
        torrent.make_torrent(tmp_path / "link", TRACKERS)


def _rewrite(made: bytes, **info_changes) -> bytes:
    top = bdecode(made)
    for key, value in info_changes.items():
        top[b"info"][key.encode()] = value
    return bencode(top)


@pytest.mark.parametrize(
    "changes,reason",
    [
        ({"name": b".."}, "not allowed"),
        ({"name": b"a/b"}, "separator"),
        ({"name": b"bell\x07"}, "control character"),
        ({"name": b"\xff\xfe"}, "UTF-8"),
        ({"piece length": 1000}, "power of two"),
        ({"pieces": b"123"}, "multiple of 20"),
        ({"sha256": b"short"}, "32 raw bytes"),
    ],
)
def test_parse_refuses_hostile_fields(tmp_path, changes, reason):
    (tmp_path / "f").write_bytes(os.urandom(50_000))
    made = torrent.make_torrent(tmp_path / "f", TRACKERS).data
    with pytest.raises(torrent.TorrentError, match=reason):
        torrent.parse(_rewrite(made, **changes))


def test_parse_refuses_caps_and_garbage(tmp_path):
    (tmp_path / "f").write_bytes(os.urandom(50_000))
    made = torrent.make_torrent(tmp_path / "f", TRACKERS).data
    with pytest.raises(torrent.TorrentError, match="cap"):
        torrent.parse(made, max_bytes=100)
    with pytest.raises(torrent.TorrentError, match="cap"):
        torrent.parse(made, max_total=1000)
    for garbage in (b"", b"d", b"i1e", b"d4:infoi1ee", b"l" * 5000 + b"e" * 5000):
        with pytest.raises(torrent.TorrentError):
            torrent.parse(garbage)


def test_same_infohash_on_every_run(tmp_path):
    """Making a torrent twice of the same file gives the same info-hash (deterministic)."""
    (tmp_path / "f").write_bytes(os.urandom(300_000))
    a = torrent.make_torrent(tmp_path / "f", TRACKERS)
    b = torrent.make_torrent(tmp_path / "f", TRACKERS)
    assert a.info_hash == b.info_hash

#!/usr/bin/env python3
"""Write the hostile-torrent corpus of tests/hostile/ into this directory.

    .venv/bin/python tests/data/hostile/make_corpus.py [OUTDIR]

Every torrent is built as a Python structure and bencoded by libtorrent (murderd.lt), or
is bencoding cut or nested on purpose; nothing is random, so running this again gives the
same bytes (tests/hostile/test_hostile_torrents.py checks that the committed files are
what this script writes).  expected.json maps each file to a fragment of the reason a peer
must give when it refuses it; "setup" names a symlink the test puts in the destination
first (the torrent itself is harmless, the destination is not); "placement" marks a harmless
torrent refused by the destination check alone (a name reserved for murderd).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from murderd.lt import bencode  # noqa: E402

ANNOUNCE = b"http://127.0.0.1:1/announce"
PIECE = 16384


def pieces(total: int, piece: int = PIECE) -> bytes:
    """Piece hashes for total bytes; just one for an absurd size (the torrent lies)."""
    count = max(1, -(-total // piece)) if isinstance(total, int) and total < 1 << 30 else 1
    return b"".join(hashlib.sha1(i.to_bytes(8, "big")).digest() for i in range(count))


def single(name=b"app.bin", length=40000, **info) -> dict:
    base = {b"name": name, b"piece length": PIECE, b"length": length, b"pieces": pieces(length)}
    base.update({k.replace("_", " ").encode(): v for k, v in info.items()})
    return {b"announce": ANNOUNCE, b"info": base}


def multi(files: list, name=b"app") -> dict:
    total = sum(f[b"length"] for f in files)
    info = {b"name": name, b"piece length": PIECE, b"files": files, b"pieces": pieces(total)}
    return {b"announce": ANNOUNCE, b"info": info}


def entry(*path: bytes, length: int = 1000, **extra) -> dict:
    out = {b"length": length, b"path": list(path)}
    out.update({k.replace("_", " ").encode(): v for k, v in extra.items()})
    return out


def v2(tree: dict, name=b"app") -> dict:
    info = {b"name": name, b"piece length": PIECE, b"meta version": 2, b"file tree": tree}
    return {b"announce": ANNOUNCE, b"info": info, b"piece layers": {}}


def leaf(length: int = 1000, **extra) -> dict:
    node = {b"length": length, b"pieces root": b"\x01" * 32}
    node.update({k.encode(): v for k, v in extra.items()})
    return {b"": node}


def nested_tree(depth: int) -> dict:
    tree = leaf()
    for level in range(depth):
        tree = {f"d{level}".encode(): tree}
    return tree


def corpus() -> dict[str, tuple[bytes, dict]]:
    """name -> (bytes, expectation)."""
    good = bencode(single())
    cases: dict[str, tuple[object, dict]] = {
        # -- bencoding itself
        "truncated.torrent": (good[: len(good) // 2], {"reason": "bencoding"}),
        "truncated-in-pieces.torrent": (good[:-30], {"reason": "bencoding"}),
        "deeply-nested-list.torrent": (
            b"d8:announce3:abc4:info" + b"l" * 5000 + b"e" * 5000 + b"e",
            {"reason": "bencoding"},
        ),
        "deeply-nested-dict.torrent": (
            b"d4:infod" + b"1:ad" * 3000 + b"e" * 3000 + b"ee",
            {"reason": "bencoding"},
        ),
        "not-a-dict.torrent": (b"li1ei2ee", {"reason": "no info dictionary"}),
        "info-is-a-list.torrent": (
            bencode({b"announce": ANNOUNCE, b"info": [b"name"]}),
            {"reason": "no info dictionary"},
        ),
        "huge-integer.torrent": (
            good.replace(b"6:lengthi40000e", b"6:lengthi" + b"9" * 400 + b"e"),
            {"reason": "bencoding"},
        ),
        # -- sizes and pieces
        "absurd-length.torrent": (single(length=1 << 62), {"reason": "cap"}),
        "absurd-piece-count.torrent": (
            {**single(), b"info": {**single()[b"info"], b"length": 200 << 30}},
            {"reason": "piece"},
        ),
        "absurd-piece-length.torrent": (single(piece_length=1 << 40), {"reason": "piece length"}),
        "zero-piece-length.torrent": (single(piece_length=0), {"reason": "piece length"}),
        "odd-piece-length.torrent": (single(piece_length=20000), {"reason": "piece length"}),
        "negative-length.torrent": (single(length=-40000), {"reason": "length"}),
        "string-length.torrent": (single(length=b"40000"), {"reason": "length"}),
        "pieces-not-multiple-of-20.torrent": (single(pieces=b"x" * 41), {"reason": "pieces"}),
        "total-overflows.torrent": (
            multi([entry(b"a", length=(1 << 62) + 1), entry(b"b", length=(1 << 62) + 1)]),
            {"reason": "cap"},
        ),
        "sha256-wrong-length.torrent": (single(sha256=b"short"), {"reason": "sha256"}),
        "empty.torrent": (single(length=0, pieces=b""), {"reason": "no data"}),
        # -- names and paths
        "traversal-name.torrent": (single(name=b".."), {"reason": "not allowed"}),
        "dot-name.torrent": (single(name=b"."), {"reason": "not allowed"}),
        "empty-name.torrent": (single(name=b""), {"reason": "not allowed"}),
        "traversal-path.torrent": (
            multi([entry(b"..", b"..", b"etc", b"passwd")]),
            {"reason": "not allowed"},
        ),
        "traversal-inside-component.torrent": (
            multi([entry(b"a/../../../etc/passwd")]),
            {"reason": "separator"},
        ),
        "absolute-name.torrent": (single(name=b"/etc/passwd"), {"reason": "separator"}),
        "absolute-path.torrent": (multi([entry(b"/etc/cron.d/evil")]), {"reason": "separator"}),
        "backslash-path.torrent": (multi([entry(b"..\\..\\evil")]), {"reason": "separator"}),
        "escape-codes-name.torrent": (single(name=b"evil\x1b[2Jname"), {"reason": "control"}),
        "newline-name.torrent": (single(name=b"app\nFAKE LOG LINE"), {"reason": "control"}),
        "nul-in-path.torrent": (multi([entry(b"ok\x00.bin")]), {"reason": "control"}),
        "del-in-path.torrent": (multi([entry(b"ok\x7f.bin")]), {"reason": "control"}),
        "not-utf8-name.torrent": (single(name=b"\xff\xfeapp"), {"reason": "UTF-8"}),
        "long-name.torrent": (single(name=b"a" * 300), {"reason": "longer than"}),
        "no-name.torrent": (
            {
                b"announce": ANNOUNCE,
                b"info": {k: v for k, v in single()[b"info"].items() if k != b"name"},
            },
            {"reason": "not allowed"},
        ),
        "duplicate-paths.torrent": (
            multi([entry(b"same.bin"), entry(b"same.bin")]),
            {"reason": "twice"},
        ),
        "file-and-directory.torrent": (
            multi([entry(b"x"), entry(b"x", b"y")]),
            {"reason": "both a file and a directory"},
        ),
        "pad-file-traversal.torrent": (
            multi([entry(b"ok.bin"), entry(b"..", b"..", b"evil", attr=b"p")]),
            {"reason": "not allowed"},
        ),
        # -- links
        "symlink-entry.torrent": (
            multi(
                [
                    entry(b"ok.bin"),
                    entry(b"link", length=0, attr=b"l", symlink_path=[b"..", b"..", b"etc"]),
                ]
            ),
            {"reason": "symlink"},
        ),
        "v2-symlink-entry.torrent": (
            v2({b"link": leaf(0, attr=b"l", **{"symlink path": [b"etc", b"passwd"]})}),
            {"reason": "symlink"},
        ),
        "v2-traversal.torrent": (v2({b"..": {b"..": leaf()}}), {"reason": "not allowed"}),
        "v2-deeply-nested-tree.torrent": (v2(nested_tree(90)), {"reason": "nested"}),
        "v2-file-and-directory.torrent": (
            v2({b"x": {**leaf(), b"y": leaf()}}),
            {"reason": "both a file and a directory"},
        ),
        # -- harmless torrents that would land on a symlink already in the destination
        "lands-on-symlink.torrent": (
            single(name=b"linked.bin"),
            {"reason": "symlink", "setup": "linked.bin"},
        ),
        "lands-in-symlinked-dir.torrent": (
            multi([entry(b"conf", b"app.cfg")], name=b"site"),
            {"reason": "symlink", "setup": "site/conf"},
        ),
        # -- a harmless torrent named like the peer's own staging dir inside the destination
        "takes-murderd-name.torrent": (
            multi([entry(b"x.bin")], name=b".murderd-staging"),
            {"reason": "murderd's own", "placement": True},
        ),
    }
    out = {}
    for name, (value, expect) in cases.items():
        out[name] = (value if isinstance(value, bytes) else bencode(value), expect)
    return out


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    expected = {}
    for name, (data, expect) in corpus().items():
        (directory / name).write_bytes(data)
        written.append(directory / name)
        expected[name] = expect
    (directory / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    for path in write(target):
        print(path)

"""publish.extract refuses archive members that would escape: .., absolute paths, symlinks,
hard links, special files; nothing is left behind, in the destination or outside it."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from murderd import publish

INFO_HASH = "ab" * 20


def tar_member(name: str, data: bytes = b"evil", **attrs) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def write_tar(path: Path, members: list) -> Path:
    mode = "w:gz" if path.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tar:
        for info, data in [tar_member("app/ok.txt", b"ok"), *members]:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def write_zip(path: Path, members: list) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("app/ok.txt", b"ok")
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


TAR_CASES = {
    "dotdot": [tar_member("../escaped.txt")],
    "dotdot-deep": [tar_member("app/../../escaped.txt")],
    "dot-slash-dotdot": [tar_member("./../escaped.txt")],
    "absolute": [tar_member("/tmp/escaped.txt")],
    "symlink": [tar_member("app/link", type=tarfile.SYMTYPE, linkname="/etc")],
    "symlink-then-write-through": [
        tar_member("app/up", type=tarfile.SYMTYPE, linkname=".."),
        tar_member("app/up/escaped.txt"),
    ],
    "hardlink": [tar_member("app/passwd", type=tarfile.LNKTYPE, linkname="/etc/passwd")],
    "fifo": [tar_member("app/fifo", type=tarfile.FIFOTYPE)],
    "char-device": [tar_member("app/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3)],
    "control-character": [tar_member("app/evil\x1b[2J.txt")],
}
REASONS = {
    "dotdot": "escapes",
    "dotdot-deep": "escapes",
    "dot-slash-dotdot": "escapes",
    "absolute": "absolute",
    "symlink": "link",
    "symlink-then-write-through": "link",
    "hardlink": "link",
    "fifo": "special file",
    "char-device": "special file",
    "control-character": "control character",
}


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def site(tmp_path):
    """tmp_path/site/dest is the destination; anything new under tmp_path is an escape."""
    destination = tmp_path / "site" / "dest"
    destination.mkdir(parents=True)
    (tmp_path / "archives").mkdir()
    return tmp_path, destination


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar"])
@pytest.mark.parametrize("case", sorted(TAR_CASES))
def test_tar_members_that_escape_are_refused(site, case, suffix):
    root, destination = site
    archive = write_tar(root / "archives" / f"web-1.0{suffix}", TAR_CASES[case])
    before = snapshot(root)
    with pytest.raises(publish.PlacementError, match=REASONS[case]):
        publish.extract(archive, destination, INFO_HASH)
    assert snapshot(root) == before  # no web-1.0/, no temporary, nothing outside


ZIP_CASES = {
    "dotdot": ("../escaped.txt", b"evil", None, "escapes"),
    "dotdot-deep": ("app/../../escaped.txt", b"evil", None, "escapes"),
    "absolute": ("/tmp/escaped.txt", b"evil", None, "absolute"),
    "symlink": ("app/link", b"/etc", stat.S_IFLNK | 0o777, "link"),
    "control-character": ("app/bell\x07.txt", b"evil", None, "control character"),
}


@pytest.mark.parametrize("case", sorted(ZIP_CASES))
def test_zip_members_that_escape_are_refused(site, case):
    root, destination = site
    name, data, mode, reason = ZIP_CASES[case]
    archive = write_zip(root / "archives" / "web-1.0.zip", [(name, data, mode)])
    before = snapshot(root)
    with pytest.raises(publish.PlacementError, match=reason):
        publish.extract(archive, destination, INFO_HASH)
    assert snapshot(root) == before


def test_a_damaged_archive_is_a_placement_error(site):
    root, destination = site
    archive = write_tar(root / "archives" / "web-1.0.tar.gz", [])
    archive.write_bytes(archive.read_bytes()[:40])
    before = snapshot(root)
    with pytest.raises(publish.PlacementError, match="damaged"):
        publish.extract(archive, destination, INFO_HASH)
    assert snapshot(root) == before


def test_extract_into_a_symlinked_target_is_refused(site):
    root, destination = site
    (root / "elsewhere").mkdir()
    (destination / "web-1.0").symlink_to(root / "elsewhere")
    archive = write_tar(root / "archives" / "web-1.0.tar", [])
    with pytest.raises(publish.PlacementError, match="symlink"):
        publish.extract(archive, destination, INFO_HASH)
    assert not any((root / "elsewhere").iterdir())


def test_a_clean_archive_is_extracted_whole(site):
    root, destination = site
    archive = write_tar(root / "archives" / "web-1.0.tar.gz", [tar_member("app/b/c.txt", b"c")])
    target = publish.extract(archive, destination, INFO_HASH)
    assert target == destination / "web-1.0"
    assert (target / "app" / "ok.txt").read_bytes() == b"ok"
    assert (target / "app" / "b" / "c.txt").read_bytes() == b"c"
    assert snapshot(destination) == [
        "web-1.0",
        "web-1.0/app",
        "web-1.0/app/b",
        "web-1.0/app/b/c.txt",
        "web-1.0/app/ok.txt",
    ]

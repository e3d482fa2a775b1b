"""Hostile torrents (tests/data/hostile/, written by make_corpus.py there) never get a peer to
write anything: each is refused before any byte lands, quarantined with its reason, and the
daemon goes on serving."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from murderd import publish, torrent
from murderd.localfleet import wait_for

CORPUS = Path(__file__).parents[1] / "data" / "hostile"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())
CAP = 1 << 40  # [peer] max_deploy_bytes default


def test_corpus_is_what_make_corpus_writes(tmp_path):
    subprocess.run(
        [sys.executable, str(CORPUS / "make_corpus.py"), str(tmp_path)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    made = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in CORPUS.iterdir() if p.name != "make_corpus.py")
    assert made == committed
    for name in made:
        assert (tmp_path / name).read_bytes() == (CORPUS / name).read_bytes(), name


def make_symlinks(destination: Path, outside: Path) -> None:
    """What the "setup" torrents would land on: symlinks out of the destination."""
    outside.mkdir(exist_ok=True)
    for expect in EXPECTED.values():
        setup = expect.get("setup")
        if not setup:
            continue
        link = destination / setup
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(outside / f"target-of-{link.name}")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parse_and_placement_checks_refuse(name, tmp_path):
    data = (CORPUS / name).read_bytes()
    expect = EXPECTED[name]
    if expect.get("setup") or expect.get("placement"):
        parsed = torrent.parse(data, max_total=CAP)  # harmless itself
        destination = tmp_path / "dest"
        destination.mkdir()
        make_symlinks(destination, tmp_path / "outside")
        with pytest.raises(publish.PlacementError, match=expect["reason"]):
            publish.check_destination(destination, [f.path for f in parsed.files])
        return
    with pytest.raises(torrent.TorrentError) as info:
        torrent.parse(data, max_total=CAP)
    assert expect["reason"] in str(info.value)


def test_peer_quarantines_every_hostile_torrent_and_goes_on(fleet_factory, tmp_path):
    fleet = fleet_factory(1)
    destination = fleet.peer_destination(0)
    destination.mkdir(parents=True)
    outside = tmp_path / "outside"
    make_symlinks(destination, outside)
    before = sorted(str(p.relative_to(destination)) for p in destination.rglob("*"))
    fleet.start()
    drop = fleet.peer_drop(0)
    for name in EXPECTED:
        shutil.copyfile(CORPUS / name, drop / f"{name}.part")
        os.replace(drop / f"{name}.part", drop / name)
    rejected = drop / "rejected"
    for name, expect in EXPECTED.items():
        reason = rejected / f"{name}.reason"
        wait_for(reason.exists, 30, what=f"{name} to be quarantined")
        assert expect["reason"] in reason.read_text(), (name, reason.read_text())
        assert (rejected / name).read_bytes() == (CORPUS / name).read_bytes()
    peer = fleet.peers[0]
    assert peer.proc.poll() is None
    # Nothing was written: no staging, no state, no deploy; the symlinks led nowhere.
    assert not any((fleet.peer_dirs[0] / "staging").iterdir())
    assert not any((fleet.peer_dirs[0] / "state").iterdir())
    assert sorted(str(p.relative_to(destination)) for p in destination.rglob("*")) == before
    assert not any(outside.iterdir())
    assert not [p for p in drop.iterdir() if p.is_file()]
    log = peer.log_text()
    assert "Traceback" not in log
    # Names with control characters are logged escaped: a torrent cannot forge log lines.
    assert "\nFAKE LOG LINE" not in log and "\x1b[2J" not in log

    # ... and a good deploy still goes through.
    (tmp_path / "good.bin").write_bytes(os.urandom(300_000))
    fleet.drop(tmp_path / "good.bin")
    fleet.distribute("good.bin")
    wait_for((destination / "good.bin").exists, 60, what="a good deploy after the corpus")
    good = (tmp_path / "good.bin").read_bytes()
    assert (destination / "good.bin").read_bytes() == good

"""The staging filesystem fills up mid-download (a small tmpfs the test mounts, as root)."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile

import pytest
from deploykit import (
    DestinationWatcher,
    MiB,
    fill,
    give,
    peer_config_replace,
    random_file,
    set_peer_key,
    sha256,
    small_filesystem,
    state_of,
    wait_state,
)

from murderd.localfleet import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def test_staging_full_stalls_keeps_serving_and_completes_once_freed(fleet_factory, tmp_path):
    big, small = 24 * MiB, 4 * MiB
    fleet = fleet_factory(2)
    base = fleet.peer_dirs[0]
    with small_filesystem(base / "vol", 64) as vol:
        try:
            peer_config_replace(fleet, 0, str(base / "staging"), str(vol / "staging"))
            peer_config_replace(fleet, 0, str(base / "dest"), str(vol / "dest"))
            # peer1 keeps seeding what it placed (the "other deploy" it must go on serving) and
            # downloads slowly enough for the test to fill its disk mid-way.
            set_peer_key(fleet, 0, "linger_seconds", 600)
            set_peer_key(fleet, 0, "max_linger_seconds", 600)
            set_peer_key(fleet, 0, "download_rate_limit", 4 * MiB)
            fleet.start()
            sums = {}
            for name, size in (("lib-1.0.bin", small), ("app-2.0.bin", big), ("cfg-1.0.bin", MiB)):
                sums[name] = random_file(tmp_path / name, size)
                fleet.drop(tmp_path / name)
                fleet.torrent_for(name)
            give(fleet, 0, "lib-1.0.bin")
            wait_state(fleet, 0, "lib-1.0.bin", "seeding", 30)

            dest = vol / "dest"
            with DestinationWatcher(dest, {"lib-1.0.bin": small, "app-2.0.bin": big}) as watcher:
                give(fleet, 0, "app-2.0.bin")
                wait_state(fleet, 0, "app-2.0.bin", "downloading", 30)
                ballast = fill(vol)
                state = wait_state(fleet, 0, "app-2.0.bin", "stalled", 30)
                assert "no space left" in state["error"], state["error"]
                assert "retrying" in state["error"]
                log = fleet.peers[0].log_text()
                assert "No space left on device" in log or "no space left" in log
                assert not (dest / "app-2.0.bin").exists()

                # Still serving: with the seeder gone, peer2 gets lib-1.0.bin from peer1 alone...
                assert fleet.seeder.stop(timeout=20) == 0
                give(fleet, 1, "lib-1.0.bin")
                wait_state(fleet, 1, "lib-1.0.bin", ("seeding", "done"), 60)
                assert sha256(fleet.peer_destination(1) / "lib-1.0.bin") == sums["lib-1.0.bin"]
                # ... and still takes drops: one that cannot fit is refused with the reason.
                give(fleet, 0, "cfg-1.0.bin")
                reason = fleet.peer_drop(0) / "rejected" / "cfg-1.0.bin.torrent.reason"
                wait_for(reason.exists, 30, what="the refusal of a deploy that cannot fit")
                assert "not enough disk space" in reason.read_text()
                assert fleet.peers[0].proc.poll() is None
                assert state_of(fleet, 0, "app-2.0.bin")["state"] == "stalled"

                # Space comes back: the stalled deploy resumes and completes, verified.
                ballast.unlink()
                fleet.seeder.start()
                wait_state(fleet, 0, "app-2.0.bin", ("seeding", "done"), 90)
            assert sha256(dest / "app-2.0.bin") == sums["app-2.0.bin"]
            assert watcher.partial == []
            log = fleet.peers[0].log_text()
            assert "Traceback" not in log
            # One clear line per stall, not one per failed block write.
            assert log.count("No space left on device") <= 10, log.count("No space left on device")
        finally:
            fleet.close()  # before the unmount, even after a failure


def test_destination_full_while_unpacking_stalls_and_completes_once_grown(fleet_factory, tmp_path):
    """extract = yes, and the archive unpacks to more than the destination holds: the deploy
    stalls (it does not fail), nothing half-unpacked shows, and it completes once there is
    room (the test grows its tmpfs)."""
    unpacked = 64 * MiB
    archive = tmp_path / "site-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        member = tarfile.TarInfo("www/big.bin")
        member.size = unpacked
        tar.addfile(member, io.BytesIO(b"\0" * unpacked))  # zeros: a small archive
    fleet = fleet_factory(1)
    base = fleet.peer_dirs[0]
    with small_filesystem(base / "vol", 48) as vol:
        try:
            peer_config_replace(
                fleet, 0, str(base / "staging"), str(vol / "dest" / ".murderd-staging")
            )
            peer_config_replace(fleet, 0, str(base / "dest"), str(vol / "dest"))
            set_peer_key(fleet, 0, "extract", "yes")
            fleet.start()
            fleet.drop(archive)
            give(fleet, 0, archive.name)
            state = wait_state(fleet, 0, archive.name, "stalled", 60)
            assert "no space left" in state["error"] and "while placing" in state["error"]
            dest = vol / "dest"
            assert not (dest / "site-1.0").exists()
            assert not [p for p in dest.iterdir() if p.name.startswith(".murderd-x-")]
            assert fleet.peers[0].proc.poll() is None

            subprocess.run(["mount", "-o", "remount,size=160m", str(vol)], check=True)
            wait_state(fleet, 0, archive.name, ("seeding", "done"), 60)
            assert (dest / "site-1.0" / "www" / "big.bin").stat().st_size == unpacked
            assert (dest / archive.name).stat().st_size == archive.stat().st_size
            assert "Traceback" not in fleet.peers[0].log_text()
        finally:
            fleet.close()  # before the unmount, even after a failure

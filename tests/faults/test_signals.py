"""Signals during a download, as systemd sends them: reload (HUP) and stop (TERM)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from deploykit import (
    DestinationWatcher,
    MiB,
    give,
    random_file,
    set_peer_key,
    sha256,
    state_of,
    wait_progress,
    wait_state,
)

from murderd.localfleet import BIN, free_port, wait_for, write_config

UNIT = Path(__file__).parents[2] / "systemd" / "murder-peer.service"


def unit_stop_timeout() -> float:
    match = re.search(r"^TimeoutStopSec=(\d+)s?$", UNIT.read_text(), re.M)
    assert match, f"no TimeoutStopSec in {UNIT}"
    return float(match.group(1))


def fetched(state: dict) -> int:
    return state["bytes_from_seeder"] + state["bytes_from_peers"]


def test_sighup_during_a_download_does_not_interrupt_it(fleet_factory, tmp_path):
    size = 16 * MiB
    fleet = fleet_factory(1)
    set_peer_key(fleet, 0, "download_rate_limit", 3 * MiB)
    fleet.start()
    want = random_file(tmp_path / "api-4.2.bin", size)
    fleet.drop(tmp_path / "api-4.2.bin")
    give(fleet, 0, "api-4.2.bin")
    before = wait_progress(fleet, 0, "api-4.2.bin", 0.2, 30)["progress"]
    peer = fleet.peers[0]
    set_peer_key(fleet, 0, "download_rate_limit", 6 * MiB)  # a live key: applied, not restarted
    peer.poll_messages()
    peer.messages.clear()
    peer.signal(signal.SIGHUP)
    peer.wait_message("RELOADING=1", 10)
    peer.wait_message("READY=1", 10)
    assert "[peer] download_rate_limit is now 6291456" in peer.log_text()
    state = state_of(fleet, 0, "api-4.2.bin")
    assert state["state"] == "downloading" and state["progress"] >= before
    state = wait_state(fleet, 0, "api-4.2.bin", ("seeding", "done"), 60)
    assert sha256(fleet.peer_destination(0) / "api-4.2.bin") == want
    # The same download went on: started once, nothing fetched twice.
    assert peer.log_text().count("queued -> downloading") == 1
    assert fetched(state) < 1.1 * size, fetched(state)
    assert peer.proc.poll() is None


def test_sigterm_during_a_download_saves_resume_data_and_exits_in_time(fleet_factory, tmp_path):
    size = 24 * MiB
    fleet = fleet_factory(1)
    set_peer_key(fleet, 0, "download_rate_limit", 4 * MiB)
    # No periodic save: the resume data on disk is the one the stop writes.
    set_peer_key(fleet, 0, "resume_save_interval", 3600)
    fleet.start()
    want = random_file(tmp_path / "db-9.bin", size)
    fleet.drop(tmp_path / "db-9.bin")
    give(fleet, 0, "db-9.bin")
    wait_progress(fleet, 0, "db-9.bin", 0.3, 30)
    state_dir = fleet.peer_dirs[0] / "state"
    assert not list(state_dir.glob("*.resume"))
    peer = fleet.peers[0]
    with DestinationWatcher(fleet.peer_destination(0), {"db-9.bin": size}) as watcher:
        started = time.monotonic()
        peer.signal(signal.SIGTERM)
        assert peer.proc.wait(unit_stop_timeout()) == 0
        took = time.monotonic() - started
        assert took < 10, f"stop took {took:.1f}s"
        assert "resume data saved" in peer.log_text()
        [resume] = state_dir.glob("*.resume")
        at_stop = state_of(fleet, 0, "db-9.bin")
        assert at_stop["state"] == "downloading" and at_stop["progress"] >= 0.3
        assert not (fleet.peer_destination(0) / "db-9.bin").exists()

        peer.start()
        state = wait_state(fleet, 0, "db-9.bin", ("seeding", "done"), 60)
    assert sha256(fleet.peer_destination(0) / "db-9.bin") == want
    assert watcher.partial == []
    again = fetched(state)  # the restarted process counts from zero
    missing = (1 - at_stop["progress"]) * size
    print(f"SIGTERM at {at_stop['progress']:.0%} after {took:.2f}s; re-fetched {again} bytes")
    assert again < missing + 4 * MiB, f"re-fetched {again} bytes, {missing:.0f} were missing"


def test_a_full_notify_socket_never_blocks_start_or_stop(tmp_path):
    """systemd not reading its notify socket must not wedge the event loop (SIGTERM included).

    The socket is filled before the daemon starts (net.unix.max_dgram_qlen datagrams), and
    nobody reads it: the daemon still gets ready, and stops on SIGTERM.
    """
    path = Path("/tmp") / f"mdn-full-{free_port()}.sock"
    path.unlink(missing_ok=True)
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setblocking(False)
    queued = 0
    try:
        while True:
            sender.sendto(b"STATUS=filler", str(path))
            queued += 1
    except BlockingIOError:
        pass
    config = write_config(
        tmp_path,
        {
            "tracker": {
                "listen": f"127.0.0.1:{free_port()}",
                "torrents_dir": str(tmp_path / "torrents"),
                "state_dir": str(tmp_path / "state"),
            }
        },
    )
    log = tmp_path / "log" / "tracker.log"
    proc = subprocess.Popen(
        [str(BIN / "murder-tracker"), "--config", str(config)],
        env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000", "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: log.exists() and "murder-tracker ready" in log.read_text(),
            10,
            what="the tracker to get ready with its notify socket full",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "murder-tracker stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        sender.close()
        receiver.close()
        path.unlink(missing_ok=True)
    assert queued >= 1

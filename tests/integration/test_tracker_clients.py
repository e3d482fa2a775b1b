"""Real BitTorrent clients find each other through murder-tracker and move a file.

Two libtorrent sessions (built through murderd.lt, as the daemons build theirs), then aria2c
(Debian's aria2) downloading from a libtorrent seed.  Everything is on 127.0.0.1: both peers
share that address with distinct ports, so the tracker must key peers by peer_id.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, wait_for, write_config

from murderd import lt as mlt
from murderd.torrent import make_torrent, parse

lt = mlt.lt
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
SIZE = 3 * 1024 * 1024 + 12345  # a few pieces and a short last one


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stats(base: str) -> dict:
    with OPENER.open(base + "/stats", timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def swarm(daemons, tmp_path):
    """A running tracker that knows one deploy; the deploy's data and torrent."""
    return start_swarm(daemons, tmp_path, "v1")


def start_swarm(daemons, tmp_path, fmt: str) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    src = tmp_path / "seed"
    src.mkdir()
    data = src / "release.bin"
    data.write_bytes(os.urandom(SIZE))
    made = make_torrent(data, [base + "/announce"], piece_size=256 * 1024, fmt=fmt)
    torrents = tmp_path / "torrents"
    torrents.mkdir()
    (torrents / "release.bin.torrent").write_bytes(made.data)
    config = write_config(
        tmp_path,
        {
            "tracker": {
                "listen": f"127.0.0.1:{port}",
                "torrents_dir": str(torrents),
                "state_dir": str(tmp_path / "state"),
                "interval": 2,
                "min_interval": 1,
            }
        },
    )
    tracker = daemons("tracker", config, tmp_path)
    return {"base": base, "data": data, "made": made, "tmp": tmp_path, "tracker": tracker}


class Session:
    """A libtorrent session on 127.0.0.1 with our LAN settings, closed by the test."""

    def __init__(self, *, seeder: bool):
        self.port = free_port()
        settings = mlt.lan_settings(f"127.0.0.1:{self.port}", seeder=seeder)
        self.session = mlt.make_session(settings)

    def add(self, made, save_path: Path, seed: bool = False):
        params = lt.add_torrent_params()
        params.ti = mlt.torrent_info(made.data)
        params.save_path = str(save_path)
        if seed:
            params.flags |= lt.torrent_flags.seed_mode
        return self.session.add_torrent(params)

    def errors(self) -> list[str]:
        return [
            a.message()
            for a in self.session.pop_alerts()
            if isinstance(a, (lt.tracker_error_alert, lt.torrent_error_alert))
        ]

    def close(self) -> None:
        self.session.pause()
        del self.session


def test_two_libtorrent_sessions_transfer_through_the_tracker(swarm):
    transfer_through_the_tracker(swarm)


def test_hybrid_torrent_v1_and_v2_announces_share_one_swarm(daemons, tmp_path):
    """libtorrent announces a hybrid torrent under both hashes: both must be accepted."""
    swarm = start_swarm(daemons, tmp_path, "hybrid")
    assert swarm["made"].info_hash != parse(swarm["made"].data).v2_alias
    seeder, leecher = transfer_through_the_tracker(swarm, keep_open=True)
    try:
        assert not [e for e in leecher.errors() + seeder.errors() if "unknown deploy" in e]
        (deploy,) = stats(swarm["base"])["deploys"]
        assert deploy["info_hash"] == swarm["made"].info_hash
    finally:
        seeder.close()
        leecher.close()


def seed_then_fetch(made, data: Path, out: Path, seed_announced, what: str):
    """A seed session, then a second session fetching the deploy through the tracker.

    seed_announced() tells when the tracker has the seed.  Returns (seeder, leecher), open;
    the caller closes them (they are closed here if anything fails).
    """
    seeder, leecher = Session(seeder=True), Session(seeder=False)
    try:
        seed_handle = seeder.add(made, data.parent, seed=True)
        wait_for(seed_announced, 30, what=what)
        handle = leecher.add(made, out)
        wait_for(
            lambda: handle.status().is_seeding,
            120,
            interval=0.2,
            what=f"the download (tracker errors: {leecher.errors() + seeder.errors()})",
        )
        assert sha256(out / data.name) == sha256(data)
        assert seed_handle.status().is_seeding
    except BaseException:
        seeder.close()
        leecher.close()
        raise
    return seeder, leecher


def transfer_through_the_tracker(swarm, keep_open: bool = False):
    made, data = swarm["made"], swarm["data"]
    out = swarm["tmp"] / "leech"
    out.mkdir()
    seeder, leecher = seed_then_fetch(
        made,
        data,
        out,
        lambda: any(d["seeders"] for d in stats(swarm["base"])["deploys"]),
        "the seed's announce",
    )
    try:
        # The tracker saw both, same address, each with its own listen port and peer id.
        def both_seeding():
            deploy = stats(swarm["base"])["deploys"][0]
            return deploy if deploy["seeders"] == 2 else None

        deploy = wait_for(both_seeding, 30, interval=0.2, what="the leecher's next announce")
        peers = deploy["peers"]
        assert {p["address"] for p in peers} == {"127.0.0.1"}
        assert {p["port"] for p in peers} == {seeder.port, leecher.port}
        assert len({p["peer_id"] for p in peers}) == 2
        assert deploy["name"] == "release.bin" and deploy["size"] == SIZE
        assert deploy["completed"] == 1
    except BaseException:
        keep_open = False
        raise
    finally:
        if not keep_open:
            seeder.close()
            leecher.close()
    return seeder, leecher


@pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c not installed (apt: aria2)")
def test_aria2c_downloads_from_libtorrent_seed_through_the_tracker(swarm):
    made, data, tmp = swarm["made"], swarm["data"], swarm["tmp"]
    torrent_file = tmp / "release.torrent"
    torrent_file.write_bytes(made.data)
    out = tmp / "aria2"
    out.mkdir()
    seeder = Session(seeder=True)
    try:
        seeder.add(made, data.parent, seed=True)
        wait_for(
            lambda: any(d["seeders"] for d in stats(swarm["base"])["deploys"]),
            30,
            what="the seed's announce",
        )
        aria2_port = free_port()
        result = subprocess.run(
            [
                "aria2c",
                "--no-conf",
                "--enable-dht=false",
                "--enable-dht6=false",
                "--bt-enable-lpd=false",
                "--enable-peer-exchange=false",
                "--seed-time=0",
                "--bt-tracker-interval=1",
                "--bt-stop-timeout=90",
                f"--listen-port={aria2_port}",
                "--file-allocation=none",
                "--summary-interval=0",
                "--console-log-level=warn",
                f"--log={tmp}/aria2.log",
                "--log-level=info",
                f"--dir={out}",
                str(torrent_file),
            ],
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert sha256(out / "release.bin") == sha256(data)
        # aria2c (--seed-time=0) finished and sent "stopped" with left=0; the seed stays.
        deploy = stats(swarm["base"])["deploys"][0]
        assert deploy["completed"] == 1
        assert [p["port"] for p in deploy["peers"]] == [seeder.port]
    finally:
        seeder.close()

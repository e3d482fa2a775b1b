"""Faults in the swarm: the tracker dies, the seeder goes away, a peer serves corrupt data.

Real tracker, seeder and peers as subprocesses on 127.0.0.1 (LocalFleet), real kills.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import urllib.request

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

from murderd import torrent
from murderd.localfleet import free_port, wait_for
from murderd.lt import lan_settings, lt, make_session

PLACED = ("seeding", "done")


def tracker_stats(fleet) -> dict:
    with urllib.request.urlopen(f"{fleet.tracker_url}/stats", timeout=5) as resp:
        return json.load(resp)


def test_tracker_killed_and_restarted_mid_deploy(fleet_factory, tmp_path):
    """SIGKILL the tracker while two peers download; a third peer joins while it is down.

    The two keep trading without it; the restarted tracker learns the deploy again from
    torrents_dir and the swarm again from the next announces, and the third peer, which
    could not announce at all, finds the others through it.
    """
    size = 24 * MiB
    fleet = fleet_factory(
        3,
        tracker={"interval": 2, "min_interval": 1},
        seeder={"upload_rate_limit": 4 * MiB},
    ).start()
    want = random_file(tmp_path / "app-1.0.bin", size)
    fleet.drop(tmp_path / "app-1.0.bin")
    give(fleet, 0, "app-1.0.bin")
    give(fleet, 1, "app-1.0.bin")
    state = wait_progress(fleet, 0, "app-1.0.bin", 0.1, 60)
    info_hash = state["info_hash"]

    fleet.tracker.proc.send_signal(signal.SIGKILL)
    fleet.tracker.proc.wait(10)
    give(fleet, 2, "app-1.0.bin")
    wait_for(
        lambda: f"{fleet.tracker_url}/announce" in fleet.peers[2].log_text(),
        30,
        what="peer3 to fail announcing to the dead tracker",
    )
    # Without a tracker the two that know each other keep going.
    before = state_of(fleet, 0, "app-1.0.bin")["progress"]
    wait_progress(fleet, 0, "app-1.0.bin", min(before + 0.1, 1.0), 30)
    assert state_of(fleet, 2, "app-1.0.bin")["progress"] == 0.0
    fleet.tracker.start()
    with DestinationWatcher(fleet.peer_destination(2), {"app-1.0.bin": size}) as watcher:
        for peer in range(3):
            wait_state(fleet, peer, "app-1.0.bin", PLACED, 90)
    assert watcher.partial == []
    for peer in range(3):
        assert sha256(fleet.peer_destination(peer) / "app-1.0.bin") == want
    # The restarted tracker saw peer3 (at least) finish.
    [deploy] = [d for d in tracker_stats(fleet)["deploys"] if d["info_hash"] == info_hash]
    assert deploy["completed"] >= 1
    assert "Traceback" not in fleet.tracker.log_text()


def test_seeder_stopped_once_a_full_copy_is_among_the_peers(fleet_factory, tmp_path):
    """peer1 (fast) gets a full copy; the seeder stops; peers 2 and 3 (slow) finish from it."""
    size = 16 * MiB
    fleet = fleet_factory(3, seeder={"upload_rate_limit": 8 * MiB})
    for peer in (1, 2):
        set_peer_key(fleet, peer, "download_rate_limit", 2 * MiB)
    fleet.start()
    want = random_file(tmp_path / "svc-2.0.bin", size)
    fleet.drop(tmp_path / "svc-2.0.bin")
    for peer in range(3):
        give(fleet, peer, "svc-2.0.bin")
    wait_state(fleet, 0, "svc-2.0.bin", PLACED, 60)
    assert fleet.seeder.stop(timeout=20) == 0
    stopped = time.time()
    # Their first state writes after the stop: what they had then, or a little more.
    after = [
        wait_for(
            lambda p=peer: (s := state_of(fleet, p, "svc-2.0.bin"))["updated"] > stopped and s,
            10,
            what="a state write after the stop",
        )
        for peer in (1, 2)
    ]
    behind = [s["progress"] for s in after]
    assert max(behind) < 1.0, behind
    for peer in (1, 2):
        state = wait_state(fleet, peer, "svc-2.0.bin", PLACED, 60)
        assert sha256(fleet.peer_destination(peer) / "svc-2.0.bin") == want
        # What they lacked when the seeder left came from the other peers.
        assert state["bytes_from_peers"] >= (1.0 - behind[peer - 1]) * size * 0.9


class CorruptSeed:
    """A libtorrent session (built with murderd.lt) seeding a damaged copy of a deploy.

    seed_mode claims every piece without checking; disable_hash_checks stops libtorrent from
    verifying pieces before serving them, so it really sends the damaged bytes.  It announces
    to the fleet's tracker like any peer (the tracker knows the deploy: it is published).

    It lives on its own loopback address, as a real host has its own address: libtorrent
    bans a peer by address, and on 127.0.0.1 the ban would hit the honest seeder too.
    """

    ADDRESS = "127.0.0.66"

    def __init__(self, torrent_path, data_dir):
        settings = lan_settings(
            f"{self.ADDRESS}:{free_port()}", seeder=True, fingerprint="-XX0001-"
        )
        settings["outgoing_interfaces"] = self.ADDRESS
        settings["disable_hash_checks"] = True
        self.session = make_session(settings)
        params = lt.add_torrent_params()
        params.ti = torrent.load(torrent_path).info
        params.save_path = str(data_dir)
        params.flags = lt.torrent_flags.seed_mode
        self.handle = self.session.add_torrent(params)

    def status(self):
        return self.handle.status()

    def talking(self) -> int:
        """Connections past the handshake: peers it really exchanges messages with.

        It connects out to the peers the tracker lists, like any seed; a peer that has
        blocked its address closes such a connection at once, but for that moment it is
        in num_peers (connecting or handshaking), so num_peers alone is no proof of trust.
        """
        early = lt.peer_info.connecting | lt.peer_info.handshake
        return sum(1 for p in self.handle.get_peer_info() if not p.flags & early)

    def close(self) -> None:
        self.session.remove_torrent(self.handle)
        self.session.pause()


def test_peer_serving_corrupt_data_is_banned_and_every_copy_is_right(fleet_factory, tmp_path):
    size = 16 * MiB
    fleet = fleet_factory(3, seeder={"upload_rate_limit": 2 * MiB}).start()
    data = bytearray(os.urandom(size))
    (tmp_path / "web-3.1.bin").write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    fleet.drop(tmp_path / "web-3.1.bin")
    published = fleet.torrent_for("web-3.1.bin")
    parsed = torrent.load(published)
    for offset in range(0, size, parsed.piece_size):  # one flipped byte in every piece
        data[offset + 7] ^= 0xFF
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "web-3.1.bin").write_bytes(data)
    bad = CorruptSeed(published, tmp_path / "bad")
    try:
        wait_for(
            lambda: any(
                d["info_hash"] == parsed.info_hash and d["seeders"] >= 2
                for d in tracker_stats(fleet)["deploys"]
            ),
            30,
            what="the corrupt seed to join the swarm",
        )
        for peer in range(3):
            give(fleet, peer, "web-3.1.bin")
        # Every peer meets it (uncapped, it is their fastest source) and gets bad pieces...
        wait_for(
            lambda: all(
                (state_of(fleet, p, "web-3.1.bin") or {}).get("hash_failures") for p in range(3)
            ),
            30,
            what="every peer to see a bad piece",
        )
        # ... drops it while it still needs data, and never talks to it again, though it
        # announces itself as a seed all along.
        wait_for(lambda: bad.talking() == 0, 30, what="every peer to drop it")
        states = [state_of(fleet, p, "web-3.1.bin") for p in range(3)]
        assert min(s["progress"] for s in states) < 1.0, "dropped only once done: no proof"
        sent = bad.status().total_payload_upload
        seen_again = []

        def placed_everywhere():
            seen_again.append(bad.talking())
            states = [state_of(fleet, p, "web-3.1.bin") for p in range(3)]
            return all(s["state"] in PLACED for s in states) and states

        states = wait_for(placed_everywhere, 90, interval=0.1, what="every peer to finish")
        assert max(seen_again) == 0, f"a peer went back to the corrupt seed: {seen_again}"
        again = bad.status().total_payload_upload - sent
        assert again == 0, f"the corrupt seed sent {again} more bytes after every peer dropped it"
        for peer in range(3):
            assert sha256(fleet.peer_destination(peer) / "web-3.1.bin") == want
        failures = [s["hash_failures"] for s in states]
        # Trusting it, a peer would have taken most of its pieces from it, all bad.
        assert max(failures) < parsed.num_pieces / 4, failures
        for peer in fleet.peers:
            assert f"peer {CorruptSeed.ADDRESS}:" in peer.log_text()
            assert (
                f"sent corrupt data: banned, and {CorruptSeed.ADDRESS} blocked for 3600s"
                in peer.log_text()
            )
        # The block expires (corrupt_peer_block_seconds, here shortened by a reload).
        set_peer_key(fleet, 0, "corrupt_peer_block_seconds", 1)
        fleet.peers[0].signal(signal.SIGHUP)
        wait_for(
            lambda: f"{CorruptSeed.ADDRESS} no longer blocked" in fleet.peers[0].log_text(),
            30,
            what="the block to expire",
        )
        assert "no longer blocked" not in fleet.peers[1].log_text()
        print(
            f"corrupt seed: sent {bad.status().all_time_upload} bytes; "
            f"hash failures per peer {failures} of {parsed.num_pieces} pieces"
        )
    finally:
        bad.close()


def test_a_copy_whose_sha256_is_not_the_torrents_is_never_placed(fleet_factory, tmp_path):
    """Every piece is right, but the SHA-256 the torrent records for the file is not (a
    forged or broken torrent): the peer's end-to-end check fails the deploy, and nothing
    reaches the destination.  The check runs on the pieces as they came (digest.py); the
    seed is an honest libtorrent session with the real data."""
    size = 4 * MiB
    fleet = fleet_factory(1).start()
    src = tmp_path / "src"
    src.mkdir()
    want = random_file(src / "api-9.bin", size)
    made = torrent.make_torrent(src / "api-9.bin", [f"{fleet.tracker_url}/announce"])
    decoded = lt.bdecode(made.data)
    assert decoded[b"info"][b"sha256"] == bytes.fromhex(want)
    decoded[b"info"][b"sha256"] = hashlib.sha256(b"something else").digest()
    forged = tmp_path / "api-9.bin.torrent"
    forged.write_bytes(lt.bencode(decoded))
    info_hash = torrent.load(forged).info_hash
    # The tracker learns of it as of any published deploy (its torrents_dir).
    part = fleet.publish_dir / "api-9.bin.torrent.part"
    part.write_bytes(forged.read_bytes())
    os.replace(part, fleet.publish_dir / "api-9.bin.torrent")
    wait_for(
        lambda: any(d["info_hash"] == info_hash for d in tracker_stats(fleet)["deploys"]),
        30,
        what="the tracker to know the forged deploy",
    )
    seed = CorruptSeed(forged, src)  # seeding the right bytes
    try:
        drop = fleet.peer_drop(0)
        (drop / "api-9.bin.torrent.part").write_bytes(forged.read_bytes())
        os.replace(drop / "api-9.bin.torrent.part", drop / "api-9.bin.torrent")
        state = wait_state(fleet, 0, "api-9.bin", ("failed", "seeding", "done"), 60)
    finally:
        seed.close()
    assert state["state"] == "failed", state
    assert state["error"].startswith("sha256 mismatch for api-9.bin: expected "), state
    assert state["error"].endswith(f"got {want}"), state  # the real file's
    assert not (fleet.peer_destination(0) / "api-9.bin").exists()
    assert "verified by" not in fleet.peers[0].log_text()

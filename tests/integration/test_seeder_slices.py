"""Seeder slices end to end: real seeder, tracker and following peers on loopback."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal

from deploykit import MiB, fetch_index, random_file, seeder_metric, wait_followers, wait_placed

from murderd.localfleet import wait_for


def test_each_following_peer_gets_its_own_slice(fleet_factory, tmp_path):
    fleet = fleet_factory(3, follow=True).start()
    wait_followers(fleet, 3)
    want = random_file(tmp_path / "web-2.0.bin", 8 * MiB)
    fleet.drop(tmp_path / "web-2.0.bin")
    for peer in range(3):
        wait_placed(fleet, peer, "web-2.0.bin", want)
    dealt = []
    for peer in range(3):
        found = re.search(r"slice (\d+) of (\d+) from the seeder", fleet.peers[peer].log_text())
        assert found, f"peer{peer + 1} was given no slice"
        dealt.append((int(found.group(1)), int(found.group(2))))
    assert sorted(dealt) == [(0, 3), (1, 3), (2, 3)]
    assert "3 slices for the peers following" in fleet.seeder.log_text()
    # A plain reader of index.json (no ?peer=) sees no slice.
    assert "slice" not in fetch_index(fleet)["deploys"][0]


def test_a_slice_owner_that_never_downloads_holds_nobody_up(fleet_factory, tmp_path):
    """A follower that takes a slice and vanishes: once its own slice is in, the peer takes
    the vanished one's pieces from the seeder too."""
    fleet = fleet_factory(1, follow=True, peer={"follow_interval": 600}).start()
    want = deal_with_a_ghost(fleet, tmp_path / "api-3.1.bin", 4 * MiB)
    wait_placed(fleet, 0, "api-3.1.bin", want, what="the peer to place it without the ghost")
    assert re.search(r"slice \d of 2 from the seeder", fleet.peers[0].log_text())


def test_the_seeder_moves_a_lagging_slice_to_the_peer_that_is_done(fleet_factory, tmp_path):
    """The ghost's slice never goes out: the seeder's rebalancing moves it, half by half, to
    the peer that is done with its own, and index.json tells both (slice_add, slice_drop)."""
    fleet = fleet_factory(
        1, follow=True, seeder={"upload_rate_limit": MiB}, peer={"follow_interval": 600}
    ).start()
    want = deal_with_a_ghost(fleet, tmp_path / "db-9.bin", 4 * MiB)
    first = fetch_index(fleet, "?peer=ghost")
    assert "slice_drop" not in first["deploys"][0]
    # The ghost's long poll is answered when its slice changes (the seeder would hold it
    # 60 s otherwise, past this read's timeout).
    moved = fetch_index(fleet, f"?after={first['generation']}&wait=60&peer=ghost", 45)
    assert moved["generation"] != first["generation"]
    assert moved["deploys"][0].get("slice_drop"), moved
    wait_placed(fleet, 0, "db-9.bin", want)
    out = r"every piece is out \((\d+) slice moves, "
    wait_for(lambda: re.search(out, fleet.seeder.log_text()), 30, what="the seeder's last look")
    moves = int(re.search(out, fleet.seeder.log_text()).group(1))
    assert moves >= 1
    assert seeder_metric(fleet, "murderd_seeder_slice_moves_total") == moves
    ghost = fetch_index(fleet, "?peer=ghost")["deploys"][0]
    index, count = ghost["slice"]
    assert count == 2 and ghost.get("slice_drop"), ghost
    assert all(p % 2 == index for p in ghost["slice_drop"])
    assert "slice_add" not in ghost  # nothing moved to the ghost: it never took any


def test_no_data_for_a_while_lifts_the_gate(fleet_factory, tmp_path):
    """The seeder freezes while the peer still lacks some of its own slice: after
    STALL_SECONDS without data the peer stops gating (and completes once the seeder is back)."""
    fleet = fleet_factory(
        1, follow=True, seeder={"upload_rate_limit": MiB}, peer={"follow_interval": 600}
    ).start()
    want = deal_with_a_ghost(fleet, tmp_path / "job-7.bin", 8 * MiB)
    wait_for(
        lambda: "-> downloading" in fleet.peers[0].log_text(), 30, what="the download to start"
    )
    os.kill(fleet.seeder.proc.pid, signal.SIGSTOP)  # its slice takes 4 s at 1 MiB/s
    try:
        wait_for(
            lambda: "with slices: any piece from anyone now" in fleet.peers[0].log_text(),
            30,
            what="the peer to lift its gate",
        )
    finally:
        os.kill(fleet.seeder.proc.pid, signal.SIGCONT)
    wait_placed(fleet, 0, "job-7.bin", want)


def deal_with_a_ghost(fleet, path, size: int) -> str:
    """Publish path while the peer and a ghost follower (a long poll that never downloads)
    follow the seeder: 2 slices.  Its sha256."""
    wait_followers(fleet, 1)
    generation = fetch_index(fleet)["generation"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        ghost = pool.submit(fetch_index, fleet, f"?after={generation}&wait=50&peer=ghost", 60)
        wait_followers(fleet, 2)
        want = random_file(path, size)
        fleet.drop(path)
        answer = ghost.result(timeout=60)
    assert answer["deploys"][0]["slice"][1] == 2
    return want


def test_slices_off_on_the_peer(fleet_factory, tmp_path):
    fleet = fleet_factory(2, follow=True, peer={"slices": False}).start()
    want = random_file(tmp_path / "db-1.0.bin", 2 * MiB)
    fleet.drop(tmp_path / "db-1.0.bin")
    for peer in range(2):
        wait_placed(fleet, peer, "db-1.0.bin", want)
        assert "from the seeder" not in fleet.peers[peer].log_text()
    assert seeder_metric(fleet, "murderd_seeder_followers") == 0

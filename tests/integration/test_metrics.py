"""/metrics of the tracker, the seeder and the peer, parsed with prometheus-client's parser,
followed through one deploy: before, while downloading, placed, and after the linger."""

from __future__ import annotations

import os
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from murderd.localfleet import free_port, wait_for

MiB = 1 << 20


def scrape(url: str) -> dict[str, float]:
    """{'name' or 'name{label="value",...}': value} of every sample at url."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def test_metrics_follow_a_deploy(fleet_factory, tmp_path):
    size = 6 * MiB
    peer_http = f"127.0.0.1:{free_port()}"
    fleet = fleet_factory(
        1,
        # A capped seeder makes the download last long enough to be seen half-way.
        seeder={"upload_rate_limit": 2 * MiB},
        peer={"http_listen": peer_http, "linger_seconds": 2},
    ).start()
    tracker_url = f"{fleet.tracker_url}/metrics"
    seeder_url = f"{fleet.seeder_url}/metrics"
    peer_url = f"http://{peer_http}/metrics"

    def tracker():
        return scrape(tracker_url)

    def seeder():
        return scrape(seeder_url)

    def peer():
        return scrape(peer_url)

    # Before any deploy: everything at zero, every series present.
    t, s, p = tracker(), seeder(), peer()
    assert t["murderd_tracker_deploys"] == 0
    assert t['murderd_tracker_peers{state="downloading"}'] == 0
    assert t['murderd_tracker_peers{state="seeding"}'] == 0
    assert t['murderd_tracker_announces_total{result="ok"}'] == 0
    for daemon, m in (("seeder", s), ("peer", p)):
        for name in (
            "uploaded_bytes_total",
            "downloaded_bytes_total",
            "hash_failures_total",
            "active_torrents",
            "deploys_completed_total",
            "deploys_failed_total",
            "deploy_duration_seconds_count",
        ):
            assert m[f"murderd_{daemon}_{name}"] == 0, (daemon, name)

    # The seeder publishes: one deploy completed (hashed), one torrent active.
    (tmp_path / "app-3.1.bin").write_bytes(os.urandom(size))
    fleet.drop(tmp_path / "app-3.1.bin")
    wait_for(lambda: seeder()["murderd_seeder_deploys_completed_total"] == 1, 30, what="published")
    s = seeder()
    assert s["murderd_seeder_active_torrents"] == 1
    assert s["murderd_seeder_deploy_duration_seconds_count"] == 1
    assert s['murderd_seeder_deploy_duration_seconds_bucket{le="+Inf"}'] == 1
    wait_for(lambda: tracker()["murderd_tracker_deploys"] == 1, 30, what="tracker knows it")

    # The peer downloads: seen half-way on the peer and on the tracker at the same time.
    fleet.distribute("app-3.1.bin")

    def half_way():
        p, t = peer(), tracker()
        return (
            p["murderd_peer_active_torrents"] == 1
            and 0 < p["murderd_peer_downloaded_bytes_total"] < size
            and p["murderd_peer_deploys_completed_total"] == 0
            and t['murderd_tracker_peers{state="downloading"}'] == 1
        )

    wait_for(half_way, 30, interval=0.02, what="the download half-way")

    # Placed: the peer counts a completed deploy and its duration.
    dest = fleet.peer_destination(0) / "app-3.1.bin"
    wait_for(dest.exists, 60, what="the deploy placed")
    wait_for(lambda: peer()["murderd_peer_deploys_completed_total"] == 1, 30, what="completed")
    p, s, t = peer(), seeder(), tracker()
    assert p["murderd_peer_downloaded_bytes_total"] >= size
    assert p["murderd_peer_deploy_duration_seconds_count"] == 1
    assert p["murderd_peer_deploy_duration_seconds_sum"] > 0
    assert p["murderd_peer_hash_failures_total"] == 0
    assert p["murderd_peer_deploys_failed_total"] == 0
    assert s["murderd_seeder_uploaded_bytes_total"] >= size
    assert t['murderd_tracker_announces_total{result="ok"}'] >= 2
    assert t['murderd_tracker_request_duration_seconds_count{endpoint="announce"}'] >= 2

    # After the linger the peer stops its torrent and leaves the swarm.
    wait_for(lambda: peer()["murderd_peer_active_torrents"] == 0, 30, what="linger over")
    wait_for(
        lambda: (
            tracker()['murderd_tracker_peers{state="seeding"}'] == 1
            and tracker()['murderd_tracker_peers{state="downloading"}'] == 0
        ),
        30,
        what="the peer to leave the swarm",
    )
    assert seeder()["murderd_seeder_active_torrents"] == 1  # the seeder keeps seeding

"""murder-tracker's UDP tracker (BEP 15) as a real subprocess, talked to with raw datagrams.

A small BEP 15 client over a connected UDP socket on 127.0.0.1 (a missing listener shows up
as ConnectionRefusedError, an unanswered datagram as a timeout), then two real libtorrent
sessions moving a file with nothing but a ``udp://`` tracker URL.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, wait_for, write_config
from prometheus_client.parser import text_string_to_metric_families

from murderd.torrent import make_torrent, parse

PROTOCOL_ID = 0x41727101980
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
EVENT_NONE, EVENT_COMPLETED, EVENT_STARTED, EVENT_STOPPED = 0, 1, 2, 3


class BEP15:
    """One client socket: connect, announce, scrape; replies matched by transaction id."""

    def __init__(self, port: int, timeout: float = 5.0, source: str = "127.0.0.1"):
        self.v6 = ":" in source
        self.sock = socket.socket(socket.AF_INET6 if self.v6 else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(timeout)
        self.sock.bind((source, 0))
        self.sock.connect((source if self.v6 else "127.0.0.1", port))
        self.tid = 0
        self.cid: bytes | None = None

    def close(self) -> None:
        self.sock.close()

    def request(self, body_after_tid: bytes, head: bytes) -> tuple[int, bytes]:
        """Send head + tid + rest; (action, payload after the transaction id) of the reply."""
        self.tid += 1
        tid = struct.pack("!I", self.tid)
        self.sock.send(head + tid + body_after_tid)
        for _ in range(8):  # bounded: stale replies to earlier, abandoned requests
            reply = self.sock.recv(65536)
            assert len(reply) >= 8, reply
            if reply[4:8] == tid:
                return struct.unpack_from("!I", reply)[0], reply[8:]
        raise AssertionError("no reply with our transaction id")

    def connect(self) -> bytes:
        action, payload = self.request(b"", struct.pack("!QI", PROTOCOL_ID, 0))
        assert action == 0 and len(payload) == 8, (action, payload)
        self.cid = payload
        return payload

    def announce_raw(
        self,
        info_hash: bytes,
        peer_id: bytes,
        port: int,
        *,
        left: int = 0,
        event: int = EVENT_NONE,
        numwant: int = -1,
        ip: str = "0.0.0.0",
        downloaded: int = 0,
        uploaded: int = 0,
        cid: bytes | None = None,
    ) -> tuple[int, bytes]:
        if cid is None:
            cid = self.cid or self.connect()
        rest = struct.pack(
            "!20s20sqqqI4sIiH",
            info_hash,
            peer_id,
            downloaded,
            left,
            uploaded,
            event,
            socket.inet_aton(ip),
            0x1234,
            numwant,
            port,
        )
        return self.request(rest, cid + struct.pack("!I", 1))

    def announce(self, *args, **kwargs) -> dict:
        action, payload = self.announce_raw(*args, **kwargs)
        assert action == 1, (action, payload)
        interval, leechers, seeders = struct.unpack_from("!III", payload)
        blob = payload[12:]
        family, size = (socket.AF_INET6, 18) if self.v6 else (socket.AF_INET, 6)
        assert len(blob) % size == 0
        peers = {
            (
                socket.inet_ntop(family, blob[i : i + size - 2]),
                int.from_bytes(blob[i + size - 2 : i + size], "big"),
            )
            for i in range(0, len(blob), size)
        }
        return {"interval": interval, "leechers": leechers, "seeders": seeders, "peers": peers}

    def scrape_raw(self, hashes: list[bytes], cid: bytes | None = None) -> tuple[int, bytes]:
        if cid is None:
            cid = self.cid or self.connect()
        return self.request(b"".join(hashes), cid + struct.pack("!I", 2))


def error_text(reply: tuple[int, bytes]) -> str:
    action, payload = reply
    assert action == 3, reply
    return payload.decode()


def pid(n: int) -> bytes:
    return b"-TU0001-" + n.to_bytes(12, "big")


def http_get(url: str) -> bytes:
    with OPENER.open(url, timeout=10) as response:
        return response.read()


def metrics(base: str) -> dict:
    samples = {}
    for family in text_string_to_metric_families(http_get(base + "/metrics").decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


class Tracker:
    def __init__(self, daemon, port: int, udp_port: int, tmp: Path):
        self.daemon = daemon
        self.port = port
        self.udp_port = udp_port
        self.base = f"http://127.0.0.1:{port}"
        self.tmp = tmp

    def client(self, source: str = "127.0.0.1") -> BEP15:
        return BEP15(self.udp_port, source=source)


def make_deploy(tmp: Path, name: str, fmt: str = "v1", tracker: str = "udp://127.0.0.1:1/a"):
    src = tmp / "src"
    src.mkdir(exist_ok=True)
    path = src / name
    path.write_bytes(os.urandom(300_000))
    made = make_torrent(path, [tracker], fmt=fmt)
    torrents = tmp / "torrents"
    torrents.mkdir(exist_ok=True)
    (torrents / f"{name}.torrent").write_bytes(made.data)
    return made


@pytest.fixture
def start_tracker(daemons, tmp_path):
    def start(**overrides) -> Tracker:
        port = free_port()
        values = {
            "listen": f"127.0.0.1:{port}",
            "torrents_dir": str(tmp_path / "torrents"),
            "state_dir": str(tmp_path / "state"),
            "interval": 9,
            "min_interval": 2,
        }
        values.update(overrides)
        (tmp_path / "torrents").mkdir(exist_ok=True)
        config = write_config(tmp_path, {"tracker": values})
        daemon = daemons("tracker", config, tmp_path)
        udp_listen = values.get("udp_listen") or values["listen"]
        port = int(values["listen"].rpartition(":")[2])
        return Tracker(daemon, port, int(udp_listen.rpartition(":")[2]), tmp_path)

    return start


def test_connect_announce_scrape_follow_the_http_rules(start_tracker, tmp_path):
    made = make_deploy(tmp_path, "app.tar")
    hybrid = make_deploy(tmp_path, "hybrid.tar", fmt="hybrid")
    t = start_tracker()
    ih = bytes.fromhex(made.info_hash)
    client = t.client()
    try:
        cid = client.connect()
        assert client.connect() == cid  # stateless: the same source in the same minute

        seed = client.announce(ih, pid(1), 7001, left=0, event=EVENT_STARTED)
        assert seed == {"interval": 9, "leechers": 0, "seeders": 1, "peers": set()}
        leech = client.announce(ih, pid(2), 7002, left=5000, event=EVENT_STARTED)
        assert leech["peers"] == {("127.0.0.1", 7001)}
        assert (leech["seeders"], leech["leechers"]) == (1, 1)
        client.announce(ih, pid(3), 7003, left=0, event=EVENT_STARTED)
        # Seeds get leechers only, never the other seed.
        assert client.announce(ih, pid(1), 7001, left=0)["peers"] == {("127.0.0.1", 7002)}
        leech = client.announce(ih, pid(2), 7002, left=5000)
        assert leech["peers"] == {("127.0.0.1", 7001), ("127.0.0.1", 7003)}
        assert client.announce(ih, pid(2), 7002, left=5000, numwant=1)["peers"] in (
            {("127.0.0.1", 7001)},
            {("127.0.0.1", 7003)},
        )
        assert client.announce(ih, pid(2), 7002, left=5000, numwant=0)["peers"] == set()

        done = client.announce(ih, pid(2), 7002, left=0, event=EVENT_COMPLETED)
        assert (done["seeders"], done["leechers"], done["peers"]) == (3, 0, set())

        # The same registry as HTTP: /stats sees UDP peers, an HTTP announce gets them.
        (deploy,) = [
            d for d in json.loads(http_get(t.base + "/stats"))["deploys"] if d["name"] == "app.tar"
        ]
        assert (deploy["seeders"], deploy["leechers"], deploy["completed"]) == (3, 0, 1)

        # Scrape: seeders, completed, leechers per hash, in order; zeros for an unknown one.
        unknown = os.urandom(20)
        action, payload = client.scrape_raw([ih, unknown])
        assert action == 2
        assert struct.unpack("!6I", payload) == (3, 1, 0, 0, 0, 0)
        assert "unknown deploy" in error_text(client.scrape_raw([unknown]))

        # The allowlist: an unknown deploy is an error, and gets no swarm.
        assert error_text(client.announce_raw(unknown, pid(9), 7009, left=1)).startswith(
            "unknown deploy " + unknown.hex()
        )

        # stopped removes the peer.
        client.announce(ih, pid(3), 7003, left=0, event=EVENT_STOPPED)
        assert client.announce(ih, pid(4), 7004, left=10)["seeders"] == 2

        # A hybrid deploy's v2 hash joins its v1 swarm, as over HTTP.
        v1 = bytes.fromhex(hybrid.info_hash)
        v2 = bytes.fromhex(parse(hybrid.data).v2_alias)
        client.announce(v1, pid(5), 7005, left=0)
        assert client.announce(v2, pid(6), 7006, left=1)["peers"] == {("127.0.0.1", 7005)}

        samples = metrics(t.base)
        assert samples[("murderd_tracker_announces_total", (("result", "ok"),))] >= 12
        assert samples[("murderd_tracker_announces_total", (("result", "unknown_deploy"),))] == 1
        udp_ok = (("action", "announce"), ("result", "ok"))
        assert samples[("murderd_tracker_udp_requests_total", udp_ok)] >= 12
        assert samples[("murderd_tracker_scrapes_total", (("result", "ok"),))] == 1
    finally:
        client.close()


def test_ip_claims_only_from_trusted_networks(start_tracker, tmp_path):
    made = make_deploy(tmp_path, "app.tar")
    ih = bytes.fromhex(made.info_hash)
    t = start_tracker()  # trusted_networks defaults to loopback
    client = t.client()
    try:
        client.announce(ih, pid(1), 7001, left=0, ip="10.1.2.3")
        assert client.announce(ih, pid(2), 7002, left=1)["peers"] == {("10.1.2.3", 7001)}
    finally:
        client.close()


def test_ip_claim_ignored_from_untrusted_source(start_tracker, tmp_path):
    made = make_deploy(tmp_path, "app.tar")
    ih = bytes.fromhex(made.info_hash)
    t = start_tracker(trusted_networks="10.0.0.0/8,")
    client = t.client()
    try:
        client.announce(ih, pid(1), 7001, left=0, ip="10.1.2.3")
        assert client.announce(ih, pid(2), 7002, left=1)["peers"] == {("127.0.0.1", 7001)}
    finally:
        client.close()


def test_ipv6_sources_get_18_byte_peers(start_tracker):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    port = free_port()
    t = start_tracker(allowlist=False, listen=f"[::]:{port}")  # dual-stack
    ih = os.urandom(20)
    v4, v6 = t.client(), t.client(source="::1")
    try:
        v6.announce(ih, pid(1), 7001, left=0)
        assert v4.announce(ih, pid(2), 7002, left=10)["peers"] == set()  # no IPv4 seed
        assert v4.announce(ih, pid(3), 7003, left=0)["peers"] == {("127.0.0.1", 7002)}
        reply = v6.announce(ih, pid(4), 7004, left=10)
        assert reply["peers"] == {("::1", 7001)}
        assert (reply["seeders"], reply["leechers"]) == (2, 2)
    finally:
        v4.close()
        v6.close()


def test_bad_connection_id_is_refused(start_tracker, tmp_path):
    made = make_deploy(tmp_path, "app.tar")
    ih = bytes.fromhex(made.info_hash)
    t = start_tracker()
    client, other = t.client(), t.client(source="127.0.0.2")
    try:
        forged = os.urandom(8)
        reply = client.announce_raw(ih, pid(1), 7001, cid=forged)
        assert error_text(reply) == "bad connection id"
        assert error_text(client.scrape_raw([ih], cid=forged)) == "bad connection id"
        # An id is bound to the source address it was given to.
        cid = client.connect()
        assert error_text(other.announce_raw(ih, pid(1), 7001, cid=cid)) == "bad connection id"
        assert client.announce(ih, pid(1), 7001)["seeders"] == 1
        refused = (("action", "announce"), ("result", "bad_connection_id"))
        assert metrics(t.base)[("murderd_tracker_udp_requests_total", refused)] == 2
    finally:
        client.close()
        other.close()
    # The key is kept in state_dir: a restarted tracker takes the ids it gave out.
    assert (tmp_path / "state" / "udp-secret").stat().st_mode & 0o077 == 0
    t.daemon.stop()
    t = start_tracker()
    client = t.client()
    try:
        assert client.announce(ih, pid(1), 7001, cid=cid)["seeders"] == 1
    finally:
        client.close()


def test_garbage_datagrams_do_not_hurt_it(start_tracker, tmp_path):
    made = make_deploy(tmp_path, "app.tar")
    ih = bytes.fromhex(made.info_hash)
    t = start_tracker()
    client = t.client()
    try:
        cid = client.connect()
        announce = struct.pack(
            "!8sII20s20sqqqIIIiH", cid, 1, 77, ih, pid(1), 0, 0, 0, 0, 0, 0, -1, 7001
        )
        dropped = (
            [
                b"",
                b"\x00",
                os.urandom(15),
                struct.pack("!QII", 0x1234, 0, 1),  # connect with the wrong protocol id
                cid + struct.pack("!II", 9, 1),  # unknown action
                cid + struct.pack("!II", 3, 1) + b"error from a client?",
                announce[:97],  # truncated announce
                cid + struct.pack("!II", 2, 1) + b"x" * 19,  # scrape without a whole hash
            ]
            + [os.urandom(n) for n in (16, 98, 500, 1500, 9000) for _ in range(20)]
        )
        for datagram in dropped:
            client.sock.send(datagram)
        # Still answering, and nothing above came back (replies are matched by tid).
        assert client.announce(ih, pid(1), 7001, left=0)["seeders"] == 1

        def refused(rest: bytes, action: int = 1) -> str:
            return error_text(client.request(rest, cid + struct.pack("!I", action)))

        body = announce[16:]
        assert refused(body[:64] + struct.pack("!I", 9) + body[68:]) == "unknown event 9"
        assert refused(body[:80] + b"\x00\x00") == "port 0 is outside 1-65535"
        negative = body[:40] + struct.pack("!q", -1) + body[48:]
        assert "must not be negative" in refused(negative)
        assert "more than 74" in refused(os.urandom(20) * 75, action=2)
        assert "whole number" in refused(ih + b"x", action=2)
        # A 98-byte announce with BEP 41 options after it is fine.
        assert client.request(body + b"\x02\x09/announce\x00", cid + b"\x00\x00\x00\x01")[0] == 1

        assert t.daemon.proc.poll() is None
        samples = metrics(t.base)
        malformed = sum(
            v
            for (name, labels), v in samples.items()
            if name == "murderd_tracker_udp_requests_total" and ("result", "malformed") in labels
        )
        assert malformed >= len(dropped) - 1  # the empty datagram may be dropped by the kernel
        log = t.daemon.log_text()
        assert "Traceback" not in log, log[-3000:]
        assert "refused" in log  # at debug, rate-limited
    finally:
        client.close()


def test_udp_off_and_on_its_own_port(start_tracker, tmp_path):
    made = make_deploy(tmp_path, "app.tar")
    ih = bytes.fromhex(made.info_hash)
    t = start_tracker(udp=False)
    client = t.client()
    try:
        with pytest.raises(ConnectionRefusedError):  # loopback: ICMP port unreachable
            client.connect()
    finally:
        client.close()
    t.daemon.stop()

    udp_port = free_port()
    t = start_tracker(udp_listen=f"127.0.0.1:{udp_port}")
    client = t.client()
    try:
        assert t.udp_port == udp_port
        assert client.announce(ih, pid(1), 7001, left=0)["seeders"] == 1
    finally:
        client.close()


def test_two_libtorrent_sessions_transfer_with_a_udp_tracker_only(start_tracker, tmp_path):
    from test_tracker_clients import seed_then_fetch

    port = free_port()
    made = make_deploy(tmp_path, "release.bin", tracker=f"udp://127.0.0.1:{port}/announce")
    assert parse(made.data).trackers == [f"udp://127.0.0.1:{port}/announce"]
    t = start_tracker(listen=f"127.0.0.1:{port}", interval=2, min_interval=1)
    data = tmp_path / "src" / "release.bin"
    out = tmp_path / "leech"
    out.mkdir()
    seeder, leecher = seed_then_fetch(
        made,
        data,
        out,
        lambda: json.loads(http_get(t.base + "/stats"))["deploys"][0]["seeders"],
        "the seed's UDP announce",
    )
    try:
        udp_ok = (("action", "announce"), ("result", "ok"))
        assert metrics(t.base)[("murderd_tracker_udp_requests_total", udp_ok)] >= 2
        # Nothing came over HTTP: every announce was a UDP one.
        http_count = metrics(t.base)[
            ("murderd_tracker_request_duration_seconds_count", (("endpoint", "announce"),))
        ]
        assert http_count == 0
    finally:
        seeder.close()
        leecher.close()


def test_a_fleet_deploys_through_the_udp_tracker_alone(fleet_factory, tmp_path):
    """[seeder] trackers names only udp://: peers announce over UDP, and the seeder still
    registers the deploy (over HTTP on the same port) with a tracker that could not learn
    it any other way (its torrents_dir is not the seeder's publish_dir)."""
    fleet = fleet_factory(2)
    http_announce = f"{fleet.tracker_url}/announce"
    udp_announce = http_announce.replace("http://", "udp://")
    seeder_conf = fleet.seeder_config.read_text()
    assert http_announce in seeder_conf
    fleet.seeder_config.write_text(seeder_conf.replace(http_announce, udp_announce))
    tracker_conf = fleet.tracker_config.read_text()
    elsewhere = tmp_path / "tracker-torrents"
    fleet.tracker_config.write_text(tracker_conf.replace(str(fleet.publish_dir), str(elsewhere)))
    fleet.start()
    data = os.urandom(3 * 1024 * 1024)
    (tmp_path / "svc-4.0.bin").write_bytes(data)
    fleet.drop(tmp_path / "svc-4.0.bin")
    torrent_path = fleet.torrent_for("svc-4.0.bin")
    assert udp_announce.encode() in torrent_path.read_bytes()
    assert http_announce.encode() not in torrent_path.read_bytes()
    fleet.distribute("svc-4.0.bin")
    for peer in range(2):
        placed = fleet.peer_destination(peer) / "svc-4.0.bin"
        wait_for(placed.exists, 60, what=f"peer{peer + 1}'s copy")
        assert placed.read_bytes() == data
    assert "registered deploy svc-4.0.bin" in fleet.tracker.log_text()
    stats = json.loads(urllib.request.urlopen(f"{fleet.tracker_url}/stats", timeout=10).read())
    assert [d["name"] for d in stats["deploys"]] == ["svc-4.0.bin"]
    metrics = urllib.request.urlopen(f"{fleet.tracker_url}/metrics", timeout=10).read().decode()
    udp_announces = sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "murderd_tracker_udp_requests_total"
        and sample.labels.get("action") == "announce"
    )
    assert udp_announces >= 3  # the seeder and both peers


@pytest.mark.parametrize("mmsg", [True, False], ids=["recvmmsg", "recvfrom"])
def test_a_burst_gets_every_reply_whichever_way_the_socket_is_read(monkeypatch, mmsg):
    """More datagrams than one batch, garbage among them, and a reply too long for a
    sendmmsg slot: each well-formed datagram is answered, in-process, on both socket paths
    (recvmmsg/sendmmsg on Linux, recvfrom/sendto elsewhere)."""
    import asyncio
    import time

    from prometheus_client import CollectorRegistry

    from murderd.tracker import announce, udp
    from murderd.tracker import registry as reg

    if not mmsg:
        monkeypatch.setattr(udp, "_mmsg_calls", lambda: None)
    elif udp._mmsg_calls() is None:
        pytest.skip("no recvmmsg here")
    ih = bytes(range(20))
    registry = reg.Registry(allowlist=True)
    registry.add_known(ih, "burst.bin", 1000, "test")
    settings = {
        "interval": 60,
        "min_interval": 1,
        "numwant_default": 50,
        "numwant_max": 1000,
        "trusted_networks": [],
    }
    core = announce.Tracker(registry, settings, CollectorRegistry())
    for n in range(800):  # enough peers for a reply longer than udp.SEND_SLOT
        ip = f"10.{n // 250}.{n % 250}.1"
        core.announce(ih, pid(1000 + n), ip, 6000, 0, 0, 5, reg.EVENT_STARTED, 0, time.monotonic())
    tracker = udp.TrackerUDP(core, CollectorRegistry())

    async def burst() -> dict:
        tracker.open(udp.bind_socket("127.0.0.1", 0))
        client = BEP15(tracker._sock.getsockname()[1])
        client.sock.setblocking(False)
        connect = struct.pack("!QI4s", PROTOCOL_ID, 0, b"tid0")
        client.cid = tracker.handle(connect, "127.0.0.1", time.time())[8:16]  # no loop yet
        sent = {}
        for n in range(150):
            tid = struct.pack("!I", 5000 + n)
            numwant = 800 if n == 7 else 10
            rest = struct.pack(
                "!20s20sqqqIIIiH", ih, pid(n), 0, 10, 0, EVENT_STARTED, 0, 0, numwant, 7000 + n
            )
            client.sock.send(client.cid + struct.pack("!I", 1) + tid + rest)
            sent[tid] = numwant
            if n % 10 == 0:
                client.sock.send(b"\xff" * (n % 30))  # dropped without a reply
        replies = {}
        for _ in range(500):
            await asyncio.sleep(0.01)
            try:
                while True:
                    reply = client.sock.recv(65536)
                    replies[reply[4:8]] = reply
            except BlockingIOError:
                pass
            if len(replies) == len(sent):
                break
        client.close()
        tracker.close()
        return {tid: (replies.get(tid), numwant) for tid, numwant in sent.items()}

    for tid, (reply, numwant) in asyncio.run(burst()).items():
        assert reply is not None and reply[:4] == struct.pack("!I", 1), (tid, reply)
        assert len(reply) == 20 + 6 * numwant

"""murder-tracker as a real subprocess: announce, scrape, allowlist, registration, stats, metrics.

Every test starts its own tracker (the ``daemons`` fixture waits for READY=1) and talks HTTP to
it on loopback, decoding replies with libtorrent's bdecode.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote_from_bytes

import pytest
from conftest import free_port, wait_for, write_config
from prometheus_client.parser import text_string_to_metric_families

from murderd.lt import bdecode
from murderd.torrent import make_torrent

TOKEN = "s3cret-token-for-tests"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(url: str, data: bytes | None = None, method: str | None = None, headers=None):
    """(status, body bytes) of one request; HTTP errors are results, not exceptions."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with OPENER.open(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Tracker:
    """A started tracker and what a test needs to talk to it."""

    def __init__(self, daemon, base: str, tmp: Path, config: Path):
        self.daemon = daemon
        self.base = base
        self.tmp = tmp
        self.config = config
        self.torrents_dir = tmp / "torrents"

    def get(self, path: str, host_base: str | None = None):
        return http((host_base or self.base) + path)

    def announce(self, info_hash: bytes, peer_id: bytes, port: int, base=None, **params):
        params.setdefault("uploaded", 0)
        params.setdefault("downloaded", 0)
        params.setdefault("left", 0)
        query = f"info_hash={quote_from_bytes(info_hash)}&peer_id={quote_from_bytes(peer_id)}"
        query += f"&port={port}" + "".join(f"&{k}={v}" for k, v in params.items())
        status, body = self.get(f"/announce?{query}", base)
        assert status == 200, body
        return bdecode(body)

    def stats(self, suffix: str = "") -> dict:
        status, body = self.get("/stats" + suffix)
        assert status == 200, body
        return json.loads(body)

    def register(self, data: bytes, token: str | None = TOKEN):
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        status, body = http(self.base + "/register", data=data, method="POST", headers=headers)
        return status, json.loads(body) if body.startswith(b"{") else body

    def write_torrent(self, made, name: str | None = None) -> Path:
        """Publish a torrent the way the seeder does: temp file, then rename (IN_MOVED_TO)."""
        path = self.torrents_dir / (name or f"{made.name}.torrent")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(made.data)
        os.replace(tmp, path)
        return path


def tracker_sections(tmp: Path, port: int, **overrides) -> dict:
    token_file = tmp / "token"
    if not token_file.exists():
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
    values = {
        "listen": f"127.0.0.1:{port}",
        "torrents_dir": str(tmp / "torrents"),
        "state_dir": str(tmp / "state"),
        "token_file": str(token_file),
        "interval": 10,
        "min_interval": 2,
    }
    values.update(overrides)
    return {"tracker": values}


@pytest.fixture
def start_tracker(daemons, tmp_path):
    def start(wait: bool = True, **overrides) -> Tracker:
        port = free_port()
        listen = overrides.get("listen", f"127.0.0.1:{port}")
        port = int(listen.rpartition(":")[2])
        config = write_config(tmp_path, tracker_sections(tmp_path, port, **overrides))
        daemon = daemons("tracker", config, tmp_path, wait=wait)
        return Tracker(daemon, f"http://127.0.0.1:{port}", tmp_path, config)

    return start


def make_deploy(tmp: Path, name: str = "app.tar", size: int = 100_000, tracker="http://t/a"):
    src = tmp / "src"
    src.mkdir(exist_ok=True)
    path = src / name
    path.write_bytes(os.urandom(size))
    return make_torrent(path, [tracker])


def pid(n: int) -> bytes:
    return b"-TT0001-" + n.to_bytes(12, "big")


def compact_peers(blob: bytes) -> set:
    assert len(blob) % 6 == 0
    return {
        (
            socket.inet_ntop(socket.AF_INET, blob[i : i + 4]),
            int.from_bytes(blob[i + 4 : i + 6], "big"),
        )
        for i in range(0, len(blob), 6)
    }


def compact_peers6(blob: bytes) -> set:
    assert len(blob) % 18 == 0
    return {
        (
            socket.inet_ntop(socket.AF_INET6, blob[i : i + 16]),
            int.from_bytes(blob[i + 16 : i + 18], "big"),
        )
        for i in range(0, len(blob), 18)
    }


def failure(reply: dict) -> str:
    assert b"failure reason" in reply, reply
    return reply[b"failure reason"].decode()


# -- announce ----------------------------------------------------------------------------------


def test_compact_and_dictionary_replies(start_tracker, tmp_path):
    made = make_deploy(tmp_path)
    (tmp_path / "torrents").mkdir()
    (tmp_path / "torrents" / "app.tar.torrent").write_bytes(made.data)
    t = start_tracker(interval=7, min_interval=3)
    ih = bytes.fromhex(made.info_hash)

    seed = t.announce(ih, pid(1), 7001, left=0, event="started")
    assert seed[b"interval"] == 7 and seed[b"min interval"] == 3
    assert seed[b"peers"] == b""  # alone, and a seed is never told about itself

    leech = t.announce(ih, pid(2), 7002, left=5000, event="started", compact=1)
    assert compact_peers(leech[b"peers"]) == {("127.0.0.1", 7001)}
    assert (leech[b"complete"], leech[b"incomplete"]) == (1, 1)
    assert b"peers6" not in leech

    seed = t.announce(ih, pid(1), 7001, left=0)
    assert compact_peers(seed[b"peers"]) == {("127.0.0.1", 7002)}

    listed = t.announce(ih, pid(2), 7002, left=5000, compact=0)
    assert listed[b"peers"] == [{b"ip": b"127.0.0.1", b"port": 7001, b"peer id": pid(1)}]
    listed = t.announce(ih, pid(2), 7002, left=5000, compact=0, no_peer_id=1)
    assert listed[b"peers"] == [{b"ip": b"127.0.0.1", b"port": 7001}]

    done = t.announce(ih, pid(2), 7002, left=0, event="completed")
    assert (done[b"complete"], done[b"incomplete"], done[b"downloaded"]) == (2, 0, 1)
    assert done[b"peers"] == b""  # seeds get leechers only

    # stopped removes the peer
    t.announce(ih, pid(2), 7002, left=0, event="stopped")
    assert t.announce(ih, pid(3), 7003, left=10)[b"complete"] == 1


def test_numwant_is_capped_and_defaulted(start_tracker, tmp_path):
    t = start_tracker(allowlist=False, numwant_default=5, numwant_max=8)
    ih = os.urandom(20)
    for n in range(20):
        t.announce(ih, pid(n), 6000 + n, left=0)
    asker = dict(left=100)
    assert len(compact_peers(t.announce(ih, pid(99), 7000, **asker)[b"peers"])) == 5
    assert len(compact_peers(t.announce(ih, pid(99), 7000, numwant=3, **asker)[b"peers"])) == 3
    assert len(compact_peers(t.announce(ih, pid(99), 7000, numwant=500, **asker)[b"peers"])) == 8
    assert t.announce(ih, pid(99), 7000, numwant=0, **asker)[b"peers"] == b""


def test_every_byte_of_info_hash_and_peer_id_survives(start_tracker):
    t = start_tracker(allowlist=False)
    hashes = [bytes(range(n, n + 20)) for n in range(0, 240, 20)] + [b"\xff" * 20, b"+%&= " * 4]
    for n, ih in enumerate(hashes):
        peer_id = bytes(255 - b for b in ih)
        t.announce(ih, peer_id, 6000 + n, left=0)
    deploys = {d["info_hash"]: d for d in t.stats()["deploys"]}
    for ih in hashes:
        peers = deploys[ih.hex()]["peers"]
        assert [p["peer_id"] for p in peers] == [bytes(255 - b for b in ih).hex()]


def test_allowlist_refuses_unknown_deploy(start_tracker):
    t = start_tracker()
    ih = os.urandom(20)
    status, body = t.get(
        f"/announce?info_hash={quote_from_bytes(ih)}&peer_id={quote_from_bytes(pid(1))}"
        "&port=6881&uploaded=0&downloaded=0&left=0"
    )
    assert status == 200  # BitTorrent clients show a failure reason, not an HTTP error
    assert "unknown deploy" in failure(bdecode(body)) and ih.hex() in failure(bdecode(body))
    assert t.stats()["deploys"] == []


def test_ipv6_peers6_and_trusted_ip(start_tracker):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    port = free_port()
    t = start_tracker(allowlist=False, listen=f"[::]:{port}")
    base6 = f"http://[::1]:{port}"
    ih = os.urandom(20)

    t.announce(ih, pid(1), 7001, base=base6, left=0)  # from ::1
    reply = t.announce(ih, pid(2), 7002, left=10)  # from 127.0.0.1 on the dual-stack socket
    assert compact_peers6(reply[b"peers6"]) == {("::1", 7001)}
    assert reply[b"peers"] == b""
    reply = t.announce(ih, pid(3), 7003, base=base6, left=10)
    assert compact_peers6(reply[b"peers6"]) == {("::1", 7001)}
    assert compact_peers(reply[b"peers"]) == {("127.0.0.1", 7002)}
    # ip= from a trusted network (loopback by default) sets the address
    t.announce(ih, pid(4), 7004, left=0, ip="2001:db8::5")
    reply = t.announce(ih, pid(2), 7002, left=10, numwant=50)
    assert compact_peers6(reply[b"peers6"]) == {("::1", 7001), ("::1", 7003), ("2001:db8::5", 7004)}
    listed = t.announce(ih, pid(2), 7002, left=10, compact=0)
    assert {(p[b"ip"], p[b"port"]) for p in listed[b"peers"]} == {
        (b"::1", 7001),
        (b"2001:db8::5", 7004),
        (b"::1", 7003),
    }
    addresses = {p["address"] for p in t.stats()["deploys"][0]["peers"]}
    assert addresses == {"::1", "127.0.0.1", "2001:db8::5"}


def test_ip_parameter_ignored_from_untrusted_source(start_tracker):
    t = start_tracker(allowlist=False, trusted_networks="10.0.0.0/8,")
    ih = os.urandom(20)
    t.announce(ih, pid(1), 7001, left=0, ip="192.0.2.9")
    assert t.stats()["deploys"][0]["peers"][0]["address"] == "127.0.0.1"


# -- scrape ------------------------------------------------------------------------------------


def test_scrape(start_tracker, tmp_path):
    made = make_deploy(tmp_path)
    t = start_tracker()
    t.torrents_dir.mkdir(exist_ok=True)
    t.write_torrent(made)
    ih = bytes.fromhex(made.info_hash)
    wait_for(lambda: t.stats()["deploys"], 10, what="torrent loaded")
    t.announce(ih, pid(1), 7001, left=0)
    t.announce(ih, pid(2), 7002, left=10)
    t.announce(ih, pid(3), 7003, left=10)
    t.announce(ih, pid(3), 7003, left=0, event="completed")

    status, body = t.get(f"/scrape?info_hash={quote_from_bytes(ih)}")
    assert status == 200
    files = bdecode(body)[b"files"]
    assert files == {ih: {b"complete": 2, b"incomplete": 1, b"downloaded": 1, b"name": b"app.tar"}}
    status, body = t.get("/scrape")  # full scrape
    assert list(bdecode(body)[b"files"]) == [ih]
    status, body = t.get(f"/scrape?info_hash={quote_from_bytes(os.urandom(20))}")
    assert "unknown deploy" in failure(bdecode(body))
    status, body = t.get("/scrape?info_hash=short")
    assert "20 bytes" in failure(bdecode(body))


# -- torrents_dir ------------------------------------------------------------------------------


def test_torrents_dir_is_watched(start_tracker, tmp_path):
    first = make_deploy(tmp_path, "one.tar")
    second = make_deploy(tmp_path, "two.tar")
    t = start_tracker()
    h1, h2 = bytes.fromhex(first.info_hash), bytes.fromhex(second.info_hash)

    def known():
        return {d["name"] for d in t.stats()["deploys"]}

    assert known() == set()
    path1 = t.write_torrent(first)  # moved in
    (t.torrents_dir / "two.tar.torrent").write_bytes(second.data)  # written in place
    wait_for(lambda: known() == {"one.tar", "two.tar"}, 10, what="both torrents seen")
    assert b"failure reason" not in t.announce(h1, pid(1), 7001)
    assert b"failure reason" not in t.announce(h2, pid(1), 7001)

    # garbage and non-.torrent names are skipped, logged, and never stop the daemon
    (t.torrents_dir / "broken.torrent").write_bytes(b"d4:infod4:name3:abcee")
    (t.torrents_dir / "notes.txt").write_text("hello")
    wait_for(lambda: "broken.torrent" in t.daemon.log_text(), 10, what="broken torrent logged")
    assert "skipping" in t.daemon.log_text()

    path1.unlink()
    wait_for(lambda: known() == {"two.tar"}, 10, what="deleted torrent forgotten")
    assert "unknown deploy" in failure(t.announce(h1, pid(1), 7001))
    os.rename(t.torrents_dir / "two.tar.torrent", tmp_path / "moved-out.torrent")
    wait_for(lambda: known() == set(), 10, what="moved-out torrent forgotten")
    assert t.daemon.proc.poll() is None


def test_torrents_present_at_start_are_known_when_ready(start_tracker, tmp_path):
    made = make_deploy(tmp_path)
    (tmp_path / "torrents").mkdir()
    (tmp_path / "torrents" / "x.torrent").write_bytes(made.data)
    (tmp_path / "torrents" / "bad.torrent").write_bytes(b"not bencoded")
    t = start_tracker()
    reply = t.announce(bytes.fromhex(made.info_hash), pid(1), 7001)
    assert b"failure reason" not in reply


# -- registration ------------------------------------------------------------------------------


def test_registration_requires_token_and_survives_restart(start_tracker, tmp_path):
    made = make_deploy(tmp_path, "reg.tar")
    ih = bytes.fromhex(made.info_hash)
    t = start_tracker()

    assert t.register(made.data, token=None)[0] == 401
    assert t.register(made.data, token="wrong")[0] == 401
    status, body = t.register(b"this is not a torrent")
    assert status == 400 and "not a valid torrent" in body["error"]
    assert "unknown deploy" in failure(t.announce(ih, pid(1), 7001))

    status, body = t.register(made.data)
    assert status == 200
    assert body == {"info_hash": made.info_hash, "name": "reg.tar"}
    assert b"failure reason" not in t.announce(ih, pid(1), 7001)
    state = json.loads((tmp_path / "state" / "registrations.json").read_text())
    assert [r["info_hash"] for r in state["registrations"]] == [made.info_hash]
    assert not list((tmp_path / "state").glob(".*tmp"))

    assert t.daemon.stop() == 0
    t.daemon.start()
    assert b"failure reason" not in t.announce(ih, pid(1), 7001)
    assert [d["name"] for d in t.stats()["deploys"]] == ["reg.tar"]

    delete = t.base + f"/register/{made.info_hash}"
    assert http(delete, method="DELETE")[0] == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert http(t.base + "/register/zz", method="DELETE", headers=auth)[0] == 400
    assert http(delete, method="DELETE", headers=auth)[0] == 200
    assert http(delete, method="DELETE", headers=auth)[0] == 404
    assert "unknown deploy" in failure(t.announce(ih, pid(1), 7001))


def test_registration_off_with_empty_token_file(start_tracker, tmp_path):
    token = tmp_path / "empty-token"
    token.write_text("")
    token.chmod(0o600)
    t = start_tracker(token_file=str(token))
    made = make_deploy(tmp_path)
    status, body = t.register(made.data)
    assert status == 403 and "registration is off" in body["error"]


def test_world_readable_token_file_refused(start_tracker, tmp_path):
    token = tmp_path / "open-token"
    token.write_text(TOKEN)
    token.chmod(0o644)
    t = start_tracker(wait=False, token_file=str(token))
    assert t.daemon.proc.wait(30) != 0
    assert str(token) in t.daemon.log_text()
    assert "chmod 600" in t.daemon.log_text()


def test_port_in_use_is_a_clear_startup_error(start_tracker):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t = start_tracker(wait=False, listen=f"127.0.0.1:{port}")
        assert t.daemon.proc.wait(30) == 1
    log_text = t.daemon.log_text()
    assert f"cannot listen on 127.0.0.1:{port}" in log_text
    assert "Traceback" not in log_text


# -- expiry, stats, metrics, health -------------------------------------------------------------


def test_silent_peers_expire(start_tracker):
    t = start_tracker(allowlist=False, interval=1, min_interval=1, peer_timeout=2)
    ih = os.urandom(20)
    t.announce(ih, pid(1), 7001, left=0)
    t.announce(ih, pid(2), 7002, left=10)
    assert len(t.stats()["deploys"][0]["peers"]) == 2

    def only_the_live_peer():
        reply = t.announce(ih, pid(2), 7002, left=10)  # peer 2 keeps announcing
        return reply[b"complete"] == 0 and reply[b"peers"] == b""

    wait_for(only_the_live_peer, 15, interval=0.3, what="peer 1 to expire")
    assert [p["port"] for p in t.stats()["deploys"][0]["peers"]] == [7002]


def test_stats(start_tracker, tmp_path):
    made = make_deploy(tmp_path, size=200_000)
    t = start_tracker()
    t.register(made.data)
    ih = bytes.fromhex(made.info_hash)
    t.announce(ih, pid(1), 7001, left=0, uploaded=500)
    t.announce(ih, pid(2), 7002, left=50_000, downloaded=150_000)

    body = t.stats()
    [deploy] = body["deploys"]
    assert {k: deploy[k] for k in ("name", "info_hash", "size", "seeders", "leechers")} == {
        "name": "app.tar",
        "info_hash": made.info_hash,
        "size": 200_000,
        "seeders": 1,
        "leechers": 1,
    }
    peers = {p["port"]: p for p in deploy["peers"]}
    assert peers[7001]["state"] == "seeding" and peers[7001]["progress"] == 1.0
    assert peers[7001]["uploaded"] == 500 and peers[7001]["peer_id"] == pid(1).hex()
    assert peers[7002]["state"] == "downloading" and peers[7002]["progress"] == 0.75
    assert peers[7002]["left"] == 50_000 and peers[7002]["downloaded"] == 150_000
    assert peers[7002]["address"] == "127.0.0.1"
    import time

    assert abs(peers[7002]["last_seen"] - time.time()) < 60

    assert t.stats(f"/{made.info_hash}") == body
    assert t.stats(f"?info_hash={made.info_hash}") == body
    assert t.get("/stats/nothex")[0] == 400
    assert t.get(f"/stats/{os.urandom(20).hex()}")[0] == 404
    assert t.get("/healthz") == (200, b"ok")


def test_metrics(start_tracker):
    t = start_tracker(allowlist=False)
    ih = os.urandom(20)
    t.announce(ih, pid(1), 7001, left=0)
    t.announce(ih, pid(2), 7002, left=10)
    t.get("/announce?info_hash=short")
    status, body = t.get("/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("murderd_tracker_deploys", ())] == 1
    assert samples[("murderd_tracker_peers", (("state", "seeding"),))] == 1
    assert samples[("murderd_tracker_peers", (("state", "downloading"),))] == 1
    assert samples[("murderd_tracker_announces_total", (("result", "ok"),))] == 2
    assert samples[("murderd_tracker_announces_total", (("result", "malformed"),))] == 1
    count = samples[("murderd_tracker_request_duration_seconds_count", (("endpoint", "announce"),))]
    assert count == 3


# -- malformed requests ------------------------------------------------------------------------

GOOD_HASH = quote_from_bytes(b"h" * 20)
GOOD_PID = quote_from_bytes(b"p" * 20)
BASE_QUERY = f"info_hash={GOOD_HASH}&peer_id={GOOD_PID}&uploaded=0&downloaded=0&left=0"


@pytest.mark.parametrize(
    "query, reason",
    [
        ("", "missing info_hash"),
        (f"peer_id={GOOD_PID}&port=1&left=0", "missing info_hash"),
        (f"info_hash={GOOD_HASH}&port=1&left=0", "missing peer_id"),
        (f"info_hash=abc&peer_id={GOOD_PID}&port=1&left=0", "info_hash must be 20 bytes"),
        (f"info_hash={'%41' * 400}&peer_id={GOOD_PID}&port=1&left=0", "must be 20 bytes"),
        (f"info_hash={GOOD_HASH}&peer_id=xyz&port=1&left=0", "peer_id must be 20 bytes"),
        (BASE_QUERY, "missing port"),
        (BASE_QUERY + "&port=abc", "port must be a non-negative integer"),
        (BASE_QUERY + "&port=0", "outside 1-65535"),
        (BASE_QUERY + "&port=70000", "outside 1-65535"),
        (BASE_QUERY + "&port=-1", "port must be a non-negative integer"),
        (BASE_QUERY.replace("left=0", "left=-5") + "&port=1", "left must be"),
        (BASE_QUERY.replace("uploaded=0", "uploaded=1e5") + "&port=1", "uploaded must be"),
        (BASE_QUERY.replace("downloaded=0", "downloaded=") + "&port=1", "downloaded must be"),
        (BASE_QUERY + "&port=1&numwant=many", "numwant must be"),
        (BASE_QUERY + "&port=1&left=99999999999999999999999", "left must be"),
        (BASE_QUERY + "&port=1&event=exploded", "unknown event"),
        (BASE_QUERY + "&port=1&ip=not-an-ip", "not an IP address"),
        ("&".join(f"x{n}=1" for n in range(100)), "too many query parameters"),
    ],
)
def test_malformed_announces_get_a_failure_reason(start_tracker, query, reason):
    t = start_tracker(allowlist=False)
    status, body = t.get(f"/announce?{query}")
    assert status == 200
    assert reason in failure(bdecode(body))
    # the daemon still serves a good announce afterwards
    good = t.announce(b"h" * 20, b"p" * 20, 6881)
    assert b"failure reason" not in good
    assert t.daemon.proc.poll() is None


def test_hostile_requests_never_get_a_5xx(start_tracker):
    t = start_tracker(allowlist=False)
    paths = [
        "/announce?" + "a" * 20000,  # a request line aiohttp refuses (4xx)
        "/announce?info_hash=%zz%&peer_id=%%%",
        "/announce?info_hash=" + "%FF" * 20 + "&peer_id=" + "%00" * 20 + "&port=1&left=0&ip=",
        "/scrape?" + "&".join(f"info_hash={GOOD_HASH}" for _ in range(1200)),
        "/stats/" + "g" * 40,
        "/register/abc",
    ]
    for path in paths:
        try:
            status, _ = t.get(path)
        except (ConnectionError, urllib.error.URLError):
            continue  # the server may drop an over-long request line; that is not a crash
        assert status < 500, path
    assert t.get("/healthz") == (200, b"ok")
    assert t.daemon.proc.poll() is None
    assert "Traceback" not in t.daemon.log_text()


# -- reload --------------------------------------------------------------------------------------


def test_sighup_applies_interval_and_stats_networks_live(start_tracker, tmp_path):
    t = start_tracker(allowlist=False, interval=10, min_interval=2)
    ih = os.urandom(20)
    assert t.announce(ih, pid(1), 7001)[b"interval"] == 10

    port = int(t.base.rpartition(":")[2])
    sections = tracker_sections(tmp_path, port, allowlist=False, interval=4, min_interval=2)
    sections["tracker"]["stats_networks"] = "10.0.0.0/8,"
    write_config(tmp_path, sections)
    t.daemon.poll_messages()
    t.daemon.messages.clear()
    t.daemon.signal(signal.SIGHUP)
    t.daemon.wait_message("READY=1", 20)

    reply = t.announce(ih, pid(1), 7001)
    assert reply[b"interval"] == 4 and reply[b"min interval"] == 2
    assert t.get("/stats")[0] == 403
    assert t.get("/metrics")[0] == 403
    assert t.get("/healthz") == (200, b"ok")
    assert "[tracker] interval is now 4" in t.daemon.log_text()

"""murder-tracker under hostile HTTP: property-based fuzzing and a flood, against the daemon.

One real tracker (subprocess, 127.0.0.1) per module; requests go over raw sockets so that
anything can be sent: non-UTF-8 bytes, repeated keys, oversized fields, bad methods.
The property: never a 5xx, never a crash, never a traceback in the log.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from murderd import fsutil
from murderd.localfleet import Daemon, free_port, write_config
from murderd.lt import bdecode
from murderd.torrent import make_torrent

TOKEN = "fuzz-token-" + "x" * 20
FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Raw:
    """Raw HTTP/1.1 over a socket: (status, body), or (None, b"") when the server hangs up."""

    def __init__(self, port: int):
        self.port = port

    def request(self, head: bytes, body: bytes = b"") -> tuple[int | None, bytes]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            try:
                sock.sendall(head + body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered (and closed) before reading everything
            chunks = []
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except ConnectionResetError:
                pass
        data = b"".join(chunks)
        if not data.startswith(b"HTTP/1."):
            return None, data
        status = int(data.split(b" ", 2)[1])
        return status, data.partition(b"\r\n\r\n")[2]

    def get(self, target: bytes, headers: bytes = b"") -> tuple[int | None, bytes]:
        head = b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + headers
        return self.request(head + b"\r\n")


def start_tracker(tmp: Path, **tracker) -> Daemon:
    token = tmp / "token"
    fsutil.atomic_write(token, TOKEN.encode(), mode=0o600)
    port = free_port()
    values = {
        "listen": f"127.0.0.1:{port}",
        "torrents_dir": str(tmp / "torrents"),
        "state_dir": str(tmp / "state"),
        "token_file": str(token),
    }
    values.update(tracker)
    config = write_config(tmp, {"tracker": values, "log": {"level": "info"}})
    daemon = Daemon("tracker", config, tmp).start()
    daemon.port = port
    return daemon


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzzed-tracker")
    daemon = start_tracker(tmp, allowlist=False, max_deploys=500, max_peers_per_deploy=200)
    made = make_torrent(_source(tmp), ["http://127.0.0.1:1/announce"])
    daemon.raw = Raw(daemon.port)
    daemon.torrent = made
    status, body = daemon.raw.request(
        b"POST /register HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(made.data)}\r\n\r\n".encode(),
        made.data,
    )
    assert status == 200, body
    yield daemon
    daemon.close()
    log = daemon.log_text()
    assert "Traceback" not in log, log[-3000:]


def _source(tmp: Path) -> Path:
    path = tmp / "fuzz-app.bin"
    path.write_bytes(os.urandom(300_000))
    return path


def _alive(tracker) -> None:
    assert tracker.proc.poll() is None, tracker.stderr_path.read_text()[-2000:]


# -- strategies -----------------------------------------------------------------------------

KEYS = [
    "info_hash",
    "peer_id",
    "port",
    "uploaded",
    "downloaded",
    "left",
    "event",
    "numwant",
    "compact",
    "no_peer_id",
    "ip",
    "key",
]
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["", "0", "65535", "65536", "1e5", "0x10", " 1", "1 ", "+1", "٣", "NaN"]),
)


def _pct(raw: bytes) -> str:
    return quote_from_bytes(raw, safe="")


VALUES = st.one_of(
    st.binary(min_size=0, max_size=64).map(_pct),
    st.binary(min_size=20, max_size=20).map(_pct),
    NUMBERS,
    st.sampled_from(["started", "completed", "stopped", "paused", "", "exploded"]),
    st.text(max_size=40).map(lambda t: _pct(t.encode("utf-8", "surrogatepass"))),
    st.sampled_from(["%", "%z", "%zz", "%%", "+", "%00", "%ff%fe", "::1", "127.0.0.1", "[::1]"]),
    st.binary(min_size=1, max_size=30),  # raw bytes, not percent-encoded at all
)


def _value_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


@st.composite
def queries(draw) -> bytes:
    pairs = draw(
        st.lists(
            st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=12)), VALUES),
            max_size=24,
        )
    )
    if draw(st.booleans()):  # a mostly well-formed announce with some fields fuzzed
        good = {
            "info_hash": _pct(draw(st.binary(min_size=20, max_size=20))),
            "peer_id": _pct(draw(st.binary(min_size=20, max_size=20))),
            "port": "6881",
            "left": "0",
        }
        pairs = list(good.items()) + pairs
    return b"&".join(_pct(k.encode()).encode() + b"=" + _value_bytes(v) for k, v in pairs)


PATHS = st.sampled_from(
    [b"/announce", b"/scrape", b"/stats", b"/metrics", b"/healthz", b"/register", b"/"]
)


# -- properties ----------------------------------------------------------------------------


@FUZZ
@given(query=queries())
def test_announce_never_5xx(tracker, query):
    status, body = tracker.raw.get(b"/announce?" + query)
    _alive(tracker)
    assert status is None or status < 500, (status, body[:300])
    if status == 200:
        reply = bdecode(body)
        assert b"failure reason" in reply or b"interval" in reply, reply


@FUZZ
@given(path=PATHS, query=queries(), tail=st.binary(max_size=60))
def test_any_endpoint_never_5xx(tracker, path, query, tail):
    status, body = tracker.raw.get(path + b"?" + query + tail)
    _alive(tracker)
    assert status is None or status < 500, (status, body[:300])


@FUZZ
@given(
    hashes=st.lists(st.binary(min_size=0, max_size=40), max_size=30),
    known=st.booleans(),
)
def test_scrape_never_5xx(tracker, hashes, known):
    if known:
        hashes.append(bytes.fromhex(tracker.torrent.info_hash))
    query = b"&".join(b"info_hash=" + _pct(h).encode() for h in hashes)
    status, body = tracker.raw.get(b"/scrape?" + query)
    _alive(tracker)
    assert status is not None and status < 500, (status, body[:300])
    if status == 200:
        reply = bdecode(body)
        assert b"files" in reply or b"failure reason" in reply


@FUZZ
@given(
    method=st.sampled_from([b"POST", b"DELETE", b"PUT", b"GET", b"PATCH", b"POST"]),
    target=st.one_of(
        st.just(b"/register"),
        st.binary(max_size=50).map(lambda h: b"/register/" + _pct(h).encode()),
    ),
    auth=st.one_of(
        st.none(),
        st.just(f"Bearer {TOKEN}".encode()),
        st.binary(max_size=80).filter(lambda b: b"\r" not in b and b"\n" not in b),
        st.binary(max_size=40)
        .filter(lambda b: b"\r" not in b and b"\n" not in b)
        .map(lambda b: b"Bearer " + b),
        st.text(max_size=40).map(lambda t: ("Bearer " + t).encode("utf-8", "surrogatepass")),
    ),
    body=st.one_of(st.binary(max_size=2000), st.just(b"")),
    mutate=st.integers(min_value=0, max_value=2000),
)
def test_register_never_5xx(tracker, method, target, auth, body, mutate):
    if not body and method == b"POST":
        data = bytearray(tracker.torrent.data)  # a real torrent, maybe one byte off
        if mutate < len(data):
            data[mutate] ^= 0x55
        body = bytes(data)
    head = method + b" " + target + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
    if auth is not None:
        auth = auth.replace(b"\r", b"").replace(b"\n", b"")
        head += b"Authorization: " + auth + b"\r\n"
    head += b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    status, reply = tracker.raw.request(head, body)
    _alive(tracker)
    assert status is None or status < 500, (status, reply[:300])
    if auth is None or TOKEN.encode() not in auth:
        assert status in (None, 400, 401, 404, 405), (status, reply[:300])


def test_oversized_requests_get_4xx_and_the_tracker_goes_on(tracker):
    raw = tracker.raw
    cases = [
        b"/announce?" + b"info_hash=" + b"%41" * 100_000,
        b"/announce?" + b"&".join(b"x%d=1" % n for n in range(5000)),
        b"/scrape?" + b"&".join(b"info_hash=" + b"%41" * 20 for _ in range(2000)),
    ]
    for target in cases:
        try:
            status, _ = raw.get(target)
        except (BrokenPipeError, ConnectionResetError):
            status = None  # the server may hang up on an over-long request line
        assert status is None or 400 <= status < 500 or status == 200, status
    head = b"POST /register HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
    size = (16 << 20) + 4096  # over the tracker's cap on a torrent
    head += f"Authorization: Bearer {TOKEN}\r\nContent-Length: {size}\r\n\r\n".encode()
    status, _ = raw.request(head, b"x" * size)
    assert status == 413, status
    status, body = raw.get(b"/healthz")
    assert status == 200
    _alive(tracker)


# -- a flood of distinct peers and deploys ---------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def flood(raw_port: int, announces: list[bytes]) -> None:
    """Announces over a few keep-alive connections (fast enough for tens of thousands)."""
    pending = list(announces)
    while pending:
        batch, pending = pending[:200], pending[200:]
        with socket.create_connection(("127.0.0.1", raw_port), timeout=10) as sock:
            request = b"".join(
                b"GET /announce?" + q + b" HTTP/1.1\r\nHost: t\r\n\r\n" for q in batch
            )
            sock.sendall(request)
            seen = 0
            data = b""
            while seen < len(batch):
                chunk = sock.recv(1 << 20)
                assert chunk, "the tracker hung up during a flood"
                data += chunk
                seen = data.count(b"HTTP/1.1 200")
            assert b"HTTP/1.1 5" not in data


def announce_query(info_hash: bytes, peer_id: bytes, port: int) -> bytes:
    return (
        f"info_hash={_pct(info_hash)}&peer_id={_pct(peer_id)}&port={port}"
        "&uploaded=0&downloaded=0&left=100".encode()
    )


def metrics(raw: Raw) -> dict:
    status, body = raw.get(b"/metrics")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_flood_of_peers_and_deploys_stays_bounded_and_evicts_the_oldest(tmp_path):
    max_deploys, max_peers = 300, 100
    tracker = start_tracker(
        tmp_path,
        allowlist=False,
        max_deploys=max_deploys,
        max_peers_per_deploy=max_peers,
        peer_timeout=3600,
    )
    try:
        raw = Raw(tracker.port)
        hot = os.urandom(20)

        def wave(n: int, tag: int) -> tuple[list[bytes], list[bytes]]:
            hashes = [tag.to_bytes(4, "big") + os.urandom(16) for _ in range(n)]
            peers = [b"-FL0001-" + tag.to_bytes(4, "big") + os.urandom(8) for _ in range(n)]
            queries = [announce_query(h, p, 6881) for h, p in zip(hashes, peers)]
            queries += [announce_query(hot, p, 7000 + i % 1000) for i, p in enumerate(peers)]
            flood(tracker.port, queries)
            return hashes, peers

        # Warm up past the caps, then flood four times as much again.
        first_hashes, _ = wave(2000, 1)
        rss_at_caps = rss_kib(tracker.proc.pid)
        last_hashes, last_peers = [], []
        for tag in range(2, 6):
            last_hashes, last_peers = wave(2000, tag)
        rss_after = rss_kib(tracker.proc.pid)

        stats = json.loads(raw.get(b"/stats")[1])
        deploys = {d["info_hash"]: d for d in stats["deploys"]}
        assert len(deploys) <= max_deploys
        assert all(len(d["peers"]) <= max_peers for d in deploys.values())
        # The oldest went, the newest stayed.
        assert not any(h.hex() in deploys for h in first_hashes)
        assert all(h.hex() in deploys for h in last_hashes[-50:])
        hot_peers = {p["peer_id"] for p in deploys[hot.hex()]["peers"]}
        assert len(hot_peers) == max_peers
        assert hot_peers == {p.hex() for p in last_peers[-max_peers:]}
        counters = metrics(raw)
        assert counters["murderd_tracker_deploys"] <= max_deploys
        assert counters["murderd_tracker_deploys_evicted_total"] > 0
        assert counters['murderd_tracker_peers_removed_total{reason="evicted"}'] > 0
        growth = rss_after - rss_at_caps
        print(f"flood: RSS {rss_at_caps} KiB at the caps, {rss_after} KiB after 4x more")
        assert growth < 16 * 1024, f"RSS grew {growth} KiB past the caps"
        assert "Traceback" not in tracker.log_text()
    finally:
        tracker.close()


def test_flood_of_registrations_keeps_max_deploys_and_drops_the_oldest(tmp_path):
    cap = 20
    tracker = start_tracker(tmp_path, max_deploys=cap)
    try:
        raw = Raw(tracker.port)
        (tmp_path / "src").mkdir()
        hashes = []
        for n in range(3 * cap):
            path = tmp_path / "src" / f"svc{n}.bin"
            path.write_bytes(os.urandom(1000 + n))
            made = make_torrent(path, ["http://127.0.0.1:1/announce"])
            head = b"POST /register HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            head += f"Authorization: Bearer {TOKEN}\r\n".encode()
            head += f"Content-Length: {len(made.data)}\r\n\r\n".encode()
            status, body = raw.request(head, made.data)
            assert status == 200, body
            hashes.append(made.info_hash)
        saved = json.loads((tmp_path / "state" / "registrations.json").read_text())
        assert [r["info_hash"] for r in saved["registrations"]] == hashes[-cap:]
        known = {d["info_hash"] for d in json.loads(raw.get(b"/stats")[1])["deploys"]}
        assert known == set(hashes[-cap:])
        oldest = bytes.fromhex(hashes[0])
        status, body = raw.get(b"/announce?" + announce_query(oldest, b"-FL0001-" + b"p" * 12, 1))
        assert b"unknown deploy" in bdecode(body)[b"failure reason"]
    finally:
        tracker.close()

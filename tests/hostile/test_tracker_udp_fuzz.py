"""murder-tracker's UDP tracker under hostile datagrams: property-based fuzzing.

Twice: in process (the real protocol object over a real registry, many examples fast), and
against the real daemon (subprocess, 127.0.0.1).  The properties: handling never raises;
every reply is a well-formed BEP 15 reply that echoes the transaction id; the daemon keeps
answering, with no traceback in its log.  A datagram without a valid connection id (what
a spoofed source sends) never gets a reply longer than itself: no amplification.
"""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from murderd.localfleet import Daemon, free_port, write_config
from murderd.tracker import announce, udp
from murderd.tracker import registry as reg

PROTOCOL_ID = struct.pack("!Q", 0x41727101980)
KNOWN = bytes(range(20))
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SETTINGS = {
    "interval": 15,
    "min_interval": 5,
    "numwant_default": 50,
    "numwant_max": 200,
    "trusted_networks": ["127.0.0.0/8"],
}


def _announce_body(draw_ints, info_hash: bytes) -> bytes:
    return struct.pack("!20s20s", info_hash, os.urandom(20)) + draw_ints


# A datagram: a header with a good, forged or magic connection id and any action, then
# either random bytes or announce fields at their edges.
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
UINT32 = st.integers(min_value=0, max_value=2**32 - 1)
FIELDS = st.tuples(
    INT64, INT64, INT64, UINT32, UINT32, UINT32, st.integers(-(2**31), 2**31 - 1)
).map(lambda f: struct.pack("!qqqIIIi", *f))
PORT = st.integers(min_value=0, max_value=65535).map(lambda p: struct.pack("!H", p))
TAIL = st.one_of(
    st.binary(max_size=300),
    st.tuples(st.sampled_from([KNOWN, bytes(20)]), st.binary(min_size=20, max_size=20), FIELDS)
    .map(lambda t: t[0] + t[1] + t[2])
    .flatmap(lambda body: PORT.map(lambda p: body + p))
    .flatmap(lambda body: st.binary(max_size=40).map(lambda extra: body + extra)),
    st.lists(st.sampled_from([KNOWN, bytes(20)]), max_size=80).map(b"".join),
)
ACTION = st.one_of(st.sampled_from([0, 1, 2, 3]), UINT32)
CID = st.sampled_from(["good", "magic", "random"])


def _check_reply(datagram: bytes, reply: bytes | None, connected: bool) -> None:
    if reply is None:
        return
    assert len(reply) >= 8
    action = struct.unpack_from("!I", reply)[0]
    assert action in (0, 1, 2, 3)
    assert reply[4:8] == datagram[12:16]
    if not connected:
        assert len(reply) <= len(datagram), (datagram, reply)
    if action == 3:
        reply[8:].decode()


@pytest.fixture(scope="module")
def protocol():
    registry = reg.Registry(allowlist=True)
    registry.add_known(KNOWN, "fuzz.bin", 1000, "test")
    core = announce.Tracker(registry, SETTINGS, CollectorRegistry())
    return udp.TrackerUDP(core, CollectorRegistry())


@settings(
    max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cid=CID, action=ACTION, tid=st.binary(min_size=4, max_size=4), tail=TAIL)
def test_handle_never_raises_and_replies_are_well_formed(protocol, cid, action, tid, tail):
    host = "127.0.0.1"
    now = 1_800_000_000.0
    good = protocol.connection_id(host, int(now // udp.CONNECTION_WINDOW))
    head = {"good": good, "magic": PROTOCOL_ID, "random": os.urandom(8)}[cid]
    datagram = head + struct.pack("!I", action) + tid + tail
    for data in (datagram, datagram[: len(datagram) // 2]):
        _check_reply(data, protocol.handle(data, host, now), cid == "good")


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzzed-udp-tracker")
    port = free_port()
    values = {
        "listen": f"127.0.0.1:{port}",
        "torrents_dir": str(tmp / "torrents"),
        "state_dir": str(tmp / "state"),
        "allowlist": False,
        "max_deploys": 50,
        "max_peers_per_deploy": 100,
    }
    config = write_config(tmp, {"tracker": values, "log": {"level": "info"}})
    daemon = Daemon("tracker", config, tmp).start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    daemon.sock_udp = sock
    sock.send(PROTOCOL_ID + struct.pack("!II", 0, 1))
    daemon.cid = sock.recv(100)[8:16]
    yield daemon
    sock.close()
    daemon.close()
    log = daemon.log_text()
    assert "Traceback" not in log, log[-3000:]


@FUZZ
@given(cid=CID, action=ACTION, tid=st.binary(min_size=4, max_size=4), tail=TAIL)
def test_daemon_survives_fuzzed_datagrams(tracker, cid, action, tid, tail):
    head = {"good": tracker.cid, "magic": PROTOCOL_ID, "random": os.urandom(8)}[cid]
    datagram = head + struct.pack("!I", action) + tid + tail
    sock = tracker.sock_udp
    sock.send(datagram)
    # A connect with its own transaction id: its reply comes after any reply to the above.
    probe = b"\xfe\xed" + os.urandom(2)
    while probe == tid:
        probe = b"\xfe\xed" + os.urandom(2)
    sock.send(PROTOCOL_ID + struct.pack("!I", 0) + probe)
    for _ in range(4):
        reply = sock.recv(65536)
        if reply[4:8] == probe:
            assert reply[:4] == b"\x00\x00\x00\x00"
            break
        _check_reply(datagram, reply, cid == "good")
    else:
        raise AssertionError("the tracker stopped answering")
    assert tracker.proc.poll() is None

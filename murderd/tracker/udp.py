"""The tracker's UDP interface: BEP 15 connect, announce, scrape and error, on the event loop.

One datagram in, one out, no connection per announce: what makes UDP several times cheaper
than HTTP per announce.  The rules (allowlist, trusted ``ip`` claims, numwant, peer
selection) are the HTTP tracker's, from ``announce.Tracker``; only the encoding is here.

Connection ids are stateless and cannot be forged: 8 bytes of keyed BLAKE2b over the
source address and a 60 s time window.  An id is accepted for its own window and the two
after it (2 to 3 minutes; BEP 15 asks for 2).  Not over the source port: libtorrent keeps
one connection id per tracker address for the whole process, whichever socket announces.
The key is kept in state_dir by the daemon, so a restarted tracker still accepts the ids
it gave out (libtorrent would otherwise retry with a refused id for up to a minute).

What is answered and what is dropped:

- a connect whose protocol id is not BEP 15's magic, any unknown action, and any announce
  or scrape shorter than its fixed part: dropped (counted; logged at debug, at most one
  line a second).  Nothing that may be noise or a spoofed source gets a reply.
- an announce or scrape with a bad or expired connection id: an error reply, ``bad
  connection id`` (shorter than the request, so no amplification).
- a well-formed request the tracker refuses (unknown deploy, bad event, port 0, too many
  hashes): an error reply with the reason, as HTTP gives a ``failure reason``.

An IPv4 source gets 6-byte peers (IPv4 ones); an IPv6 source 18-byte peers (IPv6 ones),
the common practice (opentracker's): BEP 15's reply has no room for both.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import errno
import hashlib
import hmac
import logging
import os
import socket
import struct
import sys
import time

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily

from . import announce as announce_rules
from . import registry as reg

log = logging.getLogger(__name__)

PROTOCOL_ID = struct.pack("!Q", 0x41727101980)
ACTION_CONNECT = 0
ACTION_ANNOUNCE = 1
ACTION_SCRAPE = 2
ACTION_ERROR = 3
ACTION_NAMES = {ACTION_CONNECT: "connect", ACTION_ANNOUNCE: "announce", ACTION_SCRAPE: "scrape"}
CONNECTION_WINDOW = 60.0  # seconds
CONNECTION_WINDOWS = 3  # an id's own window and the two after it
MAX_SCRAPE_HASHES = 74  # BEP 15: what fits a datagram
SECRET_BYTES = 32
READ_BATCH = 64  # datagrams taken per event loop wakeup
ID_CACHE_SIZE = 65536  # hosts whose current connection id is remembered
RECV_SIZE = 4096  # larger datagrams arrive truncated (a scrape of 74 hashes is 1496 bytes)
LOG_EVERY = 1.0  # seconds between debug lines about refused datagrams
# BEP 15's event numbers (0 none, 1 completed, 2 started, 3 stopped) -> the registry's.
EVENTS = (reg.EVENT_NONE, reg.EVENT_COMPLETED, reg.EVENT_STARTED, reg.EVENT_STOPPED)

_HEADER = struct.Struct("!8sI4s")  # connection id, action, transaction id
# info_hash, peer_id, downloaded, left, uploaded, event, ip, key, num_want, port
_ANNOUNCE = struct.Struct("!20s20sqqqIIIiH")
ANNOUNCE_SIZE = _HEADER.size + _ANNOUNCE.size  # 98; BEP 41 options may follow, ignored
_ANNOUNCE_REPLY = struct.Struct("!I4sIII")  # action, transaction id, interval, leechers, seeders
_REPLY_HEAD = struct.Struct("!I4s")  # action, transaction id
_SCRAPE_ENTRY = struct.Struct("!III")  # seeders, completed, leechers
_WINDOW = struct.Struct("!Q")
_UINT32 = struct.Struct("!I")
# Bound once: the announce path's lookups.
_header = _HEADER.unpack_from
_announce = _ANNOUNCE.unpack_from
_announce_reply = _ANNOUNCE_REPLY.pack
_compare_digest = hmac.compare_digest
_monotonic = time.monotonic
_inet_ntoa = socket.inet_ntoa
normalize_ip = announce_rules.normalize_ip

SEND_SLOT = 4096  # bytes of reply batched by sendmmsg; a longer reply goes out on its own
_NAME = 28  # sizeof(struct sockaddr_in6), room for either family
_MMSG = 64  # sizeof(struct mmsghdr) on 64-bit Linux: 8 words
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


def _mmsg_calls():
    """libc's recvmmsg and sendmmsg (64-bit Linux), or None: then recvfrom and sendto."""
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    args = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    recvmmsg.argtypes = [*args, ctypes.c_void_p]
    sendmmsg.argtypes = args
    recvmmsg.restype = sendmmsg.restype = ctypes.c_int
    return recvmmsg, sendmmsg


class _Batch:
    """Buffers for one recvmmsg and one sendmmsg of up to READ_BATCH datagrams.

    Plain bytearrays seen as 64-bit words: struct mmsghdr is 8 words (msg_name,
    msg_namelen, msg_iov, msg_iovlen, msg_control, msg_controllen, msg_flags, msg_len),
    struct iovec 2 (base, len).  A reply goes to the address its datagram came from, read
    from the receive side's msg_name buffer as it is.
    """

    def __init__(self, count: int):
        self.count = count
        self.data = bytearray(count * RECV_SIZE)
        self.names = bytearray(count * _NAME)
        self.out = bytearray(count * SEND_SLOT)
        self.recv_msgs = bytearray(count * _MMSG)
        self.send_msgs = bytearray(count * _MMSG)
        recv_iovs = bytearray(count * 16)
        send_iovs = bytearray(count * 16)
        self._keep = (recv_iovs, send_iovs)
        address = self.address
        self.data_at, self.names_at = address(self.data), address(self.names)
        self.recv_at, self.send_at = address(self.recv_msgs), address(self.send_msgs)
        self.recv_words = memoryview(self.recv_msgs).cast("Q")
        self.send_words = memoryview(self.send_msgs).cast("Q")
        self.send_iov_words = memoryview(send_iovs).cast("Q")
        recv_iov_words = memoryview(recv_iovs).cast("Q")
        out_at, recv_iovs_at, send_iovs_at = (
            address(self.out),
            address(recv_iovs),
            address(send_iovs),
        )
        for i in range(count):
            recv_iov_words[2 * i] = self.data_at + i * RECV_SIZE
            recv_iov_words[2 * i + 1] = RECV_SIZE
            self.send_iov_words[2 * i] = out_at + i * SEND_SLOT
            m = 8 * i
            self.recv_words[m] = self.names_at + i * _NAME
            self.recv_words[m + 1] = _NAME
            self.recv_words[m + 2] = recv_iovs_at + 16 * i
            self.recv_words[m + 3] = 1
            self.send_words[m + 2] = send_iovs_at + 16 * i
            self.send_words[m + 3] = 1

    @staticmethod
    def address(buffer: bytearray) -> int:
        return ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))


class Refused(ValueError):
    """A well-formed request the tracker will not serve; str() is the error reply's text."""


class _Counts:
    """Datagrams by action and result, as Prometheus counters read at scrape time.

    A plain dict on the hot path (a prometheus_client Counter takes a lock per increment),
    and a plain int for the commonest of them, answered announces (no tuple key to hash).
    """

    def __init__(self, udp: TrackerUDP):
        self.udp = udp

    def describe(self):
        return []

    def collect(self):
        family = CounterMetricFamily(
            "murderd_tracker_udp_requests",
            "UDP tracker datagrams by action and result",
            labels=["action", "result"],
        )
        counts = self.udp.counts.copy()
        if self.udp.announced:
            counts[("announce", "ok")] += self.udp.announced
        for (action, result), value in sorted(counts.items()):
            family.add_metric([action, result], value)
        yield family


class TrackerUDP:
    """The BEP 15 protocol over one datagram socket and the shared announce rules."""

    def __init__(
        self,
        core: announce_rules.Tracker,
        metrics: CollectorRegistry | None = None,
        secret: bytes | None = None,
    ):
        self.core = core
        self.secret = secret or os.urandom(SECRET_BYTES)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.counts: collections.Counter = collections.Counter()
        self.announces = 0
        self.announced = 0  # announces answered: counts[("announce", "ok")], kept apart
        self._ids: dict[str, tuple[int, bytes]] = {}  # host -> (window, its id)
        self._log_next = 0.0
        self._log_skipped = 0
        if metrics is not None:
            metrics.register(_Counts(self))

    # -- connection ids -------------------------------------------------------------------------

    def connection_id(self, host: str, window: int) -> bytes:
        message = _WINDOW.pack(window) + host.encode()
        return hashlib.blake2b(message, digest_size=8, key=self.secret).digest()

    def current_connection_id(self, host: str, window: int) -> bytes:
        """connection_id() for the current window, remembered per host (the hot path)."""
        cached = self._ids.get(host)
        if cached is None or cached[0] != window:
            if len(self._ids) >= ID_CACHE_SIZE:
                self._ids.clear()
            cached = self._ids[host] = (window, self.connection_id(host, window))
        return cached[1]

    def valid_connection_id(self, given: bytes, host: str, now: float) -> bool:
        window = int(now // CONNECTION_WINDOW)
        if hmac.compare_digest(given, self.current_connection_id(host, window)):
            return True
        for age in range(1, CONNECTION_WINDOWS):
            if hmac.compare_digest(given, self.connection_id(host, window - age)):
                return True
        return False

    # -- the socket ---------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        return self._sock is not None

    def open(self, sock: socket.socket) -> None:
        """Serve sock (bound, non-blocking) from the running event loop."""
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        calls = _mmsg_calls()
        if calls is not None:
            self._recvmmsg, self._sendmmsg = calls
            self._batch = _Batch(READ_BATCH)
            self._addrs: dict[bytes, tuple[str, int]] = {}  # sockaddr -> (host, port)
            self._loop.add_reader(sock.fileno(), self._readable_mmsg)
        else:
            self._loop.add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _readable(self) -> None:
        """Take up to READ_BATCH datagrams: one event loop wakeup for a burst of them.

        Not asyncio's datagram transport: it reads one datagram per loop iteration (half
        the CPU of an announce went there) and queues replies without bound when the socket
        cannot take them.  Here a reply the socket cannot take at once is dropped, as any
        datagram may be.

        The replies go out after the batch is read: a reply sent at once wakes its asker,
        which then preempts the tracker on a busy machine, and the next datagram finds the
        caches cold.  Sent together, a burst costs far less CPU per announce (20 -> 16 µs).
        """
        sock = self._sock
        replies = []
        for _ in range(READ_BATCH):
            try:
                data, addr = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. an ICMP error for an earlier reply
                self._note("any", "socket_error", "-", str(exc))
                break
            reply = self.datagram_received(data, addr)
            if reply is not None:
                replies.append((reply, addr))
        sendto = sock.sendto
        for reply, addr in replies:
            self._send(sendto, reply, addr)

    def _send(self, sendto, reply: bytes, addr) -> None:
        try:
            sendto(reply, addr)
        except (BlockingIOError, InterruptedError):
            self.counts[("reply", "dropped")] += 1
        except OSError as exc:
            self._note("reply", "socket_error", addr[0], str(exc))

    def _readable_mmsg(self) -> None:
        """_readable() with one recvmmsg and one sendmmsg per batch (Linux).

        Two system calls a burst instead of two a datagram, and no exception to end each
        burst: on loopback about 1 µs less CPU per announce.
        """
        sock = self._sock
        batch = self._batch
        fd = sock.fileno()
        count = self._recvmmsg(fd, batch.recv_at, batch.count, 0, None)
        if count <= 0:
            if count < 0:
                err = ctypes.get_errno()
                if err not in _AGAIN:  # e.g. an ICMP error for an earlier reply
                    self._note("any", "socket_error", "-", str(OSError(err, os.strerror(err))))
            return
        words, send_words, send_iov_words = batch.recv_words, batch.send_words, batch.send_iov_words
        data, names, out = batch.data, batch.names, batch.out
        addrs = self._addrs
        received = self.datagram_received
        sent_to = []
        for i in range(count):
            m = 8 * i
            size = words[m + 7] & 0xFFFFFFFF
            name_size = words[m + 1] & 0xFFFFFFFF
            words[m + 1] = _NAME  # the kernel wrote the address's size there
            at = i * RECV_SIZE
            name = bytes(names[i * _NAME : i * _NAME + name_size])
            addr = addrs.get(name)
            if addr is None:
                addr = self._address(name)
                if addr is None:
                    continue
            reply = received(bytes(data[at : at + size]), addr)
            if reply is None:
                continue
            length = len(reply)
            if length > SEND_SLOT:
                self._send(sock.sendto, reply, addr)
                continue
            k = len(sent_to)
            at = k * SEND_SLOT
            out[at : at + length] = reply
            send_iov_words[2 * k + 1] = length
            send_words[8 * k] = batch.names_at + i * _NAME
            send_words[8 * k + 1] = name_size
            sent_to.append(addr)
        done = 0
        while done < len(sent_to):
            sent = self._sendmmsg(fd, batch.send_at + done * _MMSG, len(sent_to) - done, 0)
            if sent > 0:
                done += sent
                continue
            err = ctypes.get_errno()  # the reply at done failed: drop it, go on
            if err in _AGAIN:
                self.counts[("reply", "dropped")] += 1
            else:
                self._note(
                    "reply", "socket_error", sent_to[done][0], str(OSError(err, os.strerror(err)))
                )
            done += 1

    def _address(self, name: bytes) -> tuple[str, int] | None:
        """(host, port) for a struct sockaddr as the kernel wrote it; remembered."""
        family = int.from_bytes(name[:2], sys.byteorder)
        try:
            if family == socket.AF_INET:
                host = socket.inet_ntop(socket.AF_INET, name[4:8])
            elif family == socket.AF_INET6:
                host = socket.inet_ntop(socket.AF_INET6, name[8:24])
            else:
                return None
        except (OSError, ValueError):
            return None
        if len(self._addrs) >= ID_CACHE_SIZE:
            self._addrs.clear()
        addr = self._addrs[name] = (host, int.from_bytes(name[2:4], "big"))
        return addr

    def datagram_received(self, data: bytes, addr) -> bytes | None:
        try:
            return self.handle(data, addr[0], time.time())
        except Exception:  # a bug: keep serving, say so (rate-limited)
            self.counts[("any", "internal_error")] += 1
            now = time.monotonic()
            if now >= self._log_next:
                self._log_next = now + LOG_EVERY
                log.exception("udp: error handling a datagram from %s", addr[0])
            return None

    # -- the protocol ---------------------------------------------------------------------------

    def handle(self, data: bytes, host: str, now: float) -> bytes | None:
        """The reply to one datagram, or None to drop it.  Never raises for any input.

        now is wall-clock time (connection ids outlive a restart); the registry's times
        are monotonic.
        """
        size = len(data)
        if size < 16:  # _HEADER.size
            self._note("unknown", "malformed", host, f"{size}-byte datagram")
            return None
        given, action, tid = _header(data)
        if "%" in host:  # an IPv6 scope id (fe80::1%eth0): not part of the address
            host = host.split("%", 1)[0]
        if action == ACTION_ANNOUNCE:
            if size < ANNOUNCE_SIZE:
                self._note("announce", "malformed", host, f"{size}-byte announce")
                return None
            # The common case first: this window's id, remembered for the host.
            cached = self._ids.get(host)
            if (
                cached is None
                or cached[0] != int(now // CONNECTION_WINDOW)
                or not _compare_digest(given, cached[1])
            ) and not self.valid_connection_id(given, host, now):
                self._note("announce", "bad_connection_id", host, "bad or expired connection id")
                return self.error(tid, "bad connection id")
            try:
                return self.announce(data, tid, host, _monotonic())
            except Refused as exc:
                self._note("announce", "malformed", host, str(exc))
                self.core.announce_malformed.value += 1
                return self.error(tid, str(exc))
        if action == ACTION_SCRAPE:
            if size < _HEADER.size + 20:
                self._note("scrape", "malformed", host, f"{size}-byte scrape")
                return None
        elif action == ACTION_CONNECT:
            if given != PROTOCOL_ID:
                self._note("connect", "malformed", host, "not BEP 15's protocol id")
                return None
            self.counts[("connect", "ok")] += 1
            window = int(now // CONNECTION_WINDOW)
            return _REPLY_HEAD.pack(ACTION_CONNECT, tid) + self.current_connection_id(host, window)
        else:
            self._note("unknown", "malformed", host, f"action {action}")
            return None
        if not self.valid_connection_id(given, host, now):
            self._note("scrape", "bad_connection_id", host, "bad or expired connection id")
            return self.error(tid, "bad connection id")
        try:
            return self.scrape(data, tid, time.monotonic())
        except Refused as exc:
            self._note("scrape", "malformed", host, str(exc))
            self.core.scrape_malformed.inc()
            return self.error(tid, str(exc))

    def announce(self, data: bytes, tid: bytes, host: str, now: float) -> bytes:
        core = self.core
        core.announces += 1
        self.announces += 1
        (
            info_hash,
            peer_id,
            downloaded,
            left,
            uploaded,
            event,
            claimed,
            _key,
            numwant,
            port,
        ) = _announce(data, 16)
        if event >= 4:  # len(EVENTS)
            raise Refused(f"unknown event {event}")
        if port == 0:
            raise Refused("port 0 is outside 1-65535")
        if downloaded < 0 or left < 0 or uploaded < 0:
            raise Refused("downloaded, left and uploaded must not be negative")
        source = normalize_ip(host)
        # core.numwant(), inlined
        numwant = core.numwant_default if numwant < 0 else min(numwant, core.numwant_max)
        try:
            ip = core.peer_ip(source, _inet_ntoa(data[84:88])) if claimed else source
            answer = core.announce_packed(
                info_hash, peer_id, ip, port, uploaded, downloaded, left, EVENTS[event],
                numwant, now, ":" in source,
            )  # fmt: skip
        except ValueError as exc:
            raise Refused(str(exc)) from None
        if answer is None:
            self.counts[("announce", "unknown_deploy")] += 1
            return self.error(tid, "unknown deploy " + core.registry.canonical(info_hash).hex())
        self.announced += 1
        deploy, peers = answer  # the asker's family only
        pools = deploy.pools
        return (
            _announce_reply(ACTION_ANNOUNCE, tid, core.interval, len(pools[1]), len(pools[0]))
            + peers
        )  # leechers, seeders

    def scrape(self, data: bytes, tid: bytes, now: float) -> bytes:
        size = len(data) - _HEADER.size
        if size % 20:
            raise Refused("scrape length is not a whole number of info-hashes")
        if size > 20 * MAX_SCRAPE_HASHES:
            raise Refused(f"more than {MAX_SCRAPE_HASHES} info-hashes")
        hashes = [data[i : i + 20] for i in range(_HEADER.size, len(data), 20)]
        found = self.core.scrape(hashes, now)
        if not any(deploy is not None for _, deploy in found):
            self.counts[("scrape", "unknown_deploy")] += 1
            self.core.scrape_unknown.inc()
            return self.error(tid, "unknown deploy " + ", ".join(h.hex() for h in hashes[:3]))
        self.counts[("scrape", "ok")] += 1
        self.core.scrape_ok.inc()
        entries = [
            _SCRAPE_ENTRY.pack(d.seeders, d.completed, d.leechers) if d else bytes(12)
            for _, d in found
        ]
        return _REPLY_HEAD.pack(ACTION_SCRAPE, tid) + b"".join(entries)

    @staticmethod
    def error(tid: bytes, message: str) -> bytes:
        return _REPLY_HEAD.pack(ACTION_ERROR, tid) + message.encode()

    def _note(self, action: str, result: str, host: str, reason: str) -> None:
        """Count a refused datagram; one debug line a second at most (anyone can send them)."""
        self.counts[(action, result)] += 1
        if not log.isEnabledFor(logging.DEBUG):
            return
        now = time.monotonic()
        if now < self._log_next:
            self._log_skipped += 1
            return
        skipped, self._log_skipped = self._log_skipped, 0
        self._log_next = now + LOG_EVERY
        log.debug(
            "udp %s from %s refused: %s%s",
            action,
            host,
            reason,
            f" ({skipped} more since the last line)" if skipped else "",
        )


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound datagram socket for host, port; [::] is dual-stack (IPv4 clients too).

    OSError is the caller's to report (it knows which config key this is).
    """
    if host == "localhost":
        host = "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        try:  # room for a burst of announces (the kernel caps it at net.core.rmem_max)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        except OSError:
            pass
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock

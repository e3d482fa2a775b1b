"""The tracker's listening socket: plain announces served directly, everything else by aiohttp.

A BitTorrent client opens a connection, sends one ``GET /announce?...`` with
``Connection: close`` and reads the reply.  Served through aiohttp, each such connection costs
an asyncio transport, a task, a parser, request and response objects and their headers, about
two thirds of the tracker's CPU time under load (py-spy).  This module accepts connections
itself and answers a request that is *plainly* such an announce with the same bytes aiohttp
would send (status line, headers, body from ``TrackerHTTP.announce_body``), straight from the
socket.  Anything else -- another endpoint or method, keep-alive, a body, a request not
complete in the first read, any byte outside a conservative subset of HTTP -- goes to
aiohttp's own protocol with the bytes read so far, so every other answer (400s, limits,
timeouts, keep-alive) is aiohttp's.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import re
import socket
import struct
import termios
import time
from email.utils import formatdate
from typing import Callable

from aiohttp.http import SERVER_SOFTWARE

log = logging.getLogger(__name__)

ACCEPT_BATCH = 128  # connections accepted per readiness event (asyncio's backlog loop does 100)
MAX_HEAD = 4096  # a longer request head goes to aiohttp
MAX_HEADERS = 32
_NONBLOCK = struct.pack("i", 1)  # FIONBIO's argument: a C int
FIRST_READ_WAIT = 1.0  # a connection silent this long after accept goes to aiohttp as it is
ACCEPT_PAUSE = 1.0  # after EMFILE/ENFILE/ENOBUFS/ENOMEM, as asyncio does

# "GET /announce?<query> HTTP/1.x": the query in characters clients percent-encode into
# (no '#', no spaces, no controls, nothing yarl would normalise differently).
_REQUEST_LINE = re.compile(rb"GET /announce\?([A-Za-z0-9%&=._~+\-*!$'(),;:@/?]*) HTTP/1\.([01])")
_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z\-]+):[ \t]*([\x20-\x7e]*?)[ \t]*")
# Headers that change how aiohttp reads or answers the request.
_DELEGATED = frozenset(
    (b"content-length", b"transfer-encoding", b"upgrade", b"expect", b"te", b"trailer")
)
_STATUS = {0: b"HTTP/1.0 200 OK\r\n", 1: b"HTTP/1.1 200 OK\r\n"}
_TRAILER = {0: b"\r\n\r\n", 1: b"\r\nConnection: close\r\n\r\n"}
_SERVER = ("\r\nServer: " + SERVER_SOFTWARE).encode()


class _Date:
    """The Date header's value, formatted once a second (as aiohttp does)."""

    __slots__ = ("second", "value")

    def __init__(self) -> None:
        self.second = -1
        self.value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.value = formatdate(now, usegmt=True).encode()
        return self.value


def plain_announce(head: bytes) -> tuple[str, int] | None:
    """(raw query, HTTP minor version) when head is a request the fast path may answer.

    head is everything the client sent, ending with the blank line.  None means: let
    aiohttp handle it.  The fast path takes only what aiohttp would accept and answer the
    same way: GET /announce with a query, HTTP/1.1 with one Host header and
    ``Connection: close``, or HTTP/1.0 without keep-alive; no body, no upgrade.
    """
    lines = head[:-4].split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None or len(lines) > MAX_HEADERS + 1:
        return None
    minor = int(match.group(2))
    hosts = 0
    connection = None
    for line in lines[1:]:
        header = _HEADER.fullmatch(line)
        if header is None:
            return None
        name = header.group(1).lower()
        if name in _DELEGATED:
            return None
        if name == b"host":
            hosts += 1
        elif name == b"connection":
            if connection is not None:
                return None
            connection = header.group(2).lower()
    if minor == 1:
        if hosts != 1 or connection != b"close":
            return None
    elif hosts > 1 or connection not in (None, b"close"):
        return None
    return match.group(1).decode("ascii"), minor


class _Replay(asyncio.Protocol):
    """Hands a connection to aiohttp's protocol, first replaying the bytes already read."""

    def __init__(self, inner: asyncio.Protocol, data: bytes):
        self.inner = inner
        self.data = data

    def connection_made(self, transport) -> None:
        transport.set_protocol(self.inner)
        self.inner.connection_made(transport)
        if self.data:
            self.inner.data_received(self.data)


class _Finish(asyncio.Protocol):
    """Sends the rest of a reply the socket did not take at once, then closes."""

    def __init__(self, rest: bytes):
        self.rest = rest

    def connection_made(self, transport) -> None:
        transport.write(self.rest)
        transport.close()


class AnnounceServer:
    """Accepts on sock; answers plain announces, passes other connections to fallback().

    body(raw_query, source) makes an announce's bencoded reply; fallback() makes aiohttp's
    protocol for one connection (the web.Server of an AppRunner).
    """

    def __init__(
        self,
        sock: socket.socket,
        body: Callable[[str, str], bytes],
        fallback: Callable[[], asyncio.Protocol],
    ):
        self.sock = sock
        self.body = body
        self.fallback = fallback
        self.loop: asyncio.AbstractEventLoop | None = None
        self.date = _Date()
        self.waiting: dict[int, tuple[float, str]] = {}  # fd -> (accepted at, source)
        self.handovers: set[asyncio.Task] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._resume: asyncio.TimerHandle | None = None
        self.served = 0
        self.delegated = 0

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._accept)

    async def stop(self) -> None:
        """Stop accepting; connections not yet served are closed, handed-over ones finish."""
        loop = self.loop
        if loop is None:
            return
        self.loop = None
        loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for handle in (self._sweep, self._resume):
            if handle is not None:
                handle.cancel()
        for fd in list(self.waiting):
            loop.remove_reader(fd)
            os.close(fd)
        self.waiting.clear()
        if self.handovers:
            await asyncio.wait(list(self.handovers), timeout=5)

    # -- accepting -------------------------------------------------------------------------

    def _accept(self) -> None:
        # Connections are plain file descriptors until one goes to aiohttp: a socket object
        # costs a getsockname() and more Python per connection than the rest of the path.
        for _ in range(ACCEPT_BATCH):
            try:
                fd, address = self.sock._accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("tracker cannot accept connections (%s); pausing 1 s", exc)
                    self.loop.remove_reader(self.sock.fileno())
                    self._resume = self.loop.call_later(ACCEPT_PAUSE, self._resume_accepting)
                    return
                raise
            try:
                fcntl.ioctl(fd, termios.FIONBIO, _NONBLOCK)
            except OSError:
                os.close(fd)
                continue
            self._first_read(fd, address[0] if isinstance(address, tuple) else "")

    def _resume_accepting(self) -> None:
        self._resume = None
        if self.loop is not None:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _first_read(self, fd: int, source: str) -> None:
        try:
            data = os.read(fd, MAX_HEAD + 1)
        except (BlockingIOError, InterruptedError):
            self.waiting[fd] = (time.monotonic(), source)
            self.loop.add_reader(fd, self._readable, fd)
            if self._sweep is None:
                self._sweep = self.loop.call_later(FIRST_READ_WAIT, self._sweep_waiting)
            return
        except OSError:
            os.close(fd)
            return
        self._serve(fd, source, data)

    def _readable(self, fd: int) -> None:
        _, source = self.waiting.pop(fd)
        self.loop.remove_reader(fd)
        try:
            data = os.read(fd, MAX_HEAD + 1)
        except (BlockingIOError, InterruptedError):
            self._delegate(fd, b"")
            return
        except OSError:
            os.close(fd)
            return
        self._serve(fd, source, data)

    def _sweep_waiting(self) -> None:
        """Connections that sent nothing for FIRST_READ_WAIT go to aiohttp (its timeouts)."""
        self._sweep = None
        cutoff = time.monotonic() - FIRST_READ_WAIT
        for fd, (since, _) in list(self.waiting.items()):
            if since <= cutoff:
                del self.waiting[fd]
                self.loop.remove_reader(fd)
                self._delegate(fd, b"")
        if self.waiting:
            self._sweep = self.loop.call_later(FIRST_READ_WAIT, self._sweep_waiting)

    # -- serving ---------------------------------------------------------------------------

    def _serve(self, fd: int, source: str, data: bytes) -> None:
        if not data:
            os.close(fd)  # closed before sending anything: nothing to answer
            return
        plain = plain_announce(data) if data.endswith(b"\r\n\r\n") else None
        if plain is None or not source:
            self._delegate(fd, data)
            return
        raw_query, minor = plain
        try:
            body = self.body(raw_query, source)
        except Exception:
            log.exception("tracker: announce from %s failed", source)
            os.close(fd)
            return
        reply = b"".join(
            (
                _STATUS[minor],
                b"Content-Type: text/plain\r\nContent-Length: ",
                str(len(body)).encode(),
                b"\r\nDate: ",
                self.date.get(),
                _SERVER,
                _TRAILER[minor],
                body,
            )
        )
        self.served += 1
        try:
            sent = os.write(fd, reply)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            os.close(fd)  # the client went away
            return
        if sent == len(reply):
            os.close(fd)
        else:
            self._hand_over(fd, _Finish(reply[sent:]))

    def _delegate(self, fd: int, data: bytes) -> None:
        self.delegated += 1
        self._hand_over(fd, _Replay(self.fallback(), data))

    def _hand_over(self, fd: int, protocol: asyncio.Protocol) -> None:
        if self.loop is None:
            os.close(fd)
            return
        try:
            conn = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            return
        conn.setblocking(False)
        task = self.loop.create_task(self.loop.connect_accepted_socket(lambda: protocol, conn))
        self.handovers.add(task)
        task.add_done_callback(self._handed_over)

    def _handed_over(self, task: asyncio.Task) -> None:
        self.handovers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("tracker: handing a connection over failed: %s", task.exception())

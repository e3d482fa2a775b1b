"""A follower's own slice straight from the seeder over HTTP (slices.py).

Over BitTorrent a follower asks the seeder for its slice, and, whenever its queue to the
seeder has room and its own pieces are all asked for, for pieces other peers already have:
libtorrent fills a connection's free request slots with any wanted piece the remote has,
and the seeder has them all.  The seeder then sent 1.2-1.3 x the file (bench/, session 4)
and a deploy took that much longer than its link allows; libtorrent's Python bindings have
no per-connection control of requests.

So a seeder that deals slices also serves single pieces (GET <pieces>/<index>, the
"pieces" URL of an index.json item), and a follower with an address of its own takes its
slice that way (Fetch): each piece goes to libtorrent with add_piece(), which hashes it
like a downloaded one (a bad piece is a hash failure and is fetched again), and the peer
keeps the seeder's BitTorrent connection away (an ip_filter rule on the seeder's address;
trackers are exempt) while it fetches.  What the seeder sends a follower is then its
slice, once; the other pieces come from the other peers.  The seeder's Dealer counts a
piece out once it is served.

Which piece comes next the seeder says (GET <pieces>/next?peer=<id>, the index in the
answer's PIECE_HEADER; slices.Dealer.take): the first piece nobody has yet (in file order,
whoever asks first), or once a follower's own pieces are all out, the last piece of the
slice with the most left.  A follower takes them in streams (GET <pieces>/stream?peer=<id>,
Fetch._stream): the seeder deals each piece as the one before has all but left its socket
and sends it after a FRAME, so no request's round trip stands between two pieces; an
answer ends after STREAM_PIECES pieces (the follower asks again) or with an END frame (none
left).  Should a stream fail, the follower asks for one piece at a time (GET next).

Asked by index, the slices ended unevenly: the last 0.5 s before "out" the seeder sent the
last pieces of one or two slices, each at its owner's share of its download link (1/8 at
N=8), and its link was mostly idle (bench/, --timeline).

Once every piece has left the seeder (the Dealer's "out", heard through the index.json long
poll) its link is free while the peers still pass the last pieces round: each follower
lets the seeder back in over BitTorrent for the tail (peer.py, _all_out), and what it asked
for over HTTP still comes (Fetch.drain).

A follower sharing its address with the seeder (one host, as in `make demo`: blocking the
address would block every peer) keeps to BitTorrent (may_block).  When fetching fails for
FAIL_SECONDS the follower unblocks the seeder and takes any piece from anyone, as without
slices.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import struct
import time
from collections import deque
from typing import Callable
from urllib.parse import urlsplit

import aiohttp

from . import follow
from .lt import bound_addresses

log = logging.getLogger(__name__)

# Pieces in flight from the seeder per deploy.  One: each piece then arrives as fast as the
# peer's share of the seeder's link allows, and is passed on to the other peers sooner
# (bench/, N=8, medians of 3: 6.87 and 6.82 s against 7.16 and 7.29 s with 2).
CONCURRENCY = 1
NEXT = "next"  # GET <pieces>/next?peer=<id>: the seeder deals the follower its next piece
PIECE_HEADER = "X-Murderd-Piece"  # ...and says which one it is
# GET <pieces>/stream?peer=<id>: every piece the seeder deals the follower, in one answer,
# each after a FRAME: the piece's index and length (two big-endian 32-bit numbers).
STREAM = "stream"
FRAME = struct.Struct(">II")
END = 0xFFFFFFFF  # the index of the frame (of no piece) that says none is left to deal
# Pieces in one stream answer at most; the follower then asks again.  A front that buffers
# whole answers (public_url) then takes at most this many ahead for one follower.
STREAM_PIECES = 16
# What the seeder's side of a stream holds before it deals the next piece: the kernel's
# send buffer (Linux doubles the figure for its bookkeeping) and asyncio's own above it.
STREAM_SNDBUF = 64 * 1024
STREAM_WRITE_HIGH = 32 * 1024
FAIL_SECONDS = 2.0  # no piece fetched for this long while some fail: back to BitTorrent
RETRY_FIRST = 0.1  # seconds before the first retry of a failed fetch (then doubled)
REFETCH_SECONDS = 5.0  # a piece handed to libtorrent and still not had: fetch it again
IDLE_WAIT = 0.2  # nothing to fetch: look again after this long (or when the slice grows)


# --- the seeder's side ----------------------------------------------------------------


def read_piece(info, root: str, index: int) -> bytes:
    """Piece index of the torrent info (a libtorrent torrent_info) seeded from root."""
    files = info.files()
    out = bytearray()
    for part in info.map_block(index, 0, info.piece_size(index)):
        if files.file_flags(part.file_index) & files.flag_pad_file:
            out += bytes(part.size)
            continue
        path = os.path.join(root, files.file_path(part.file_index))
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, part.size, part.offset)
        finally:
            os.close(fd)
        if len(data) != part.size:
            raise OSError(f"{path} is shorter than the torrent says")
        out += data
    return bytes(out)


def frame(index: int, data: bytes) -> bytes:
    """One piece of a stream: FRAME, then the piece."""
    return FRAME.pack(index, len(data)) + data


def small_send_buffer(transport) -> None:
    """Keep little of a stream in its socket: a piece is dealt when it is about to go,
    not seconds ahead of it behind the pieces before (the follower's share of the seeder's
    link is about 1/n of it)."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)
        except OSError:
            pass
    transport.set_write_buffer_limits(high=STREAM_WRITE_HIGH)


# --- the follower's side --------------------------------------------------------------


def may_block(seeder_ip: str, listen_interfaces: str) -> bool:
    """Can a peer listening on listen_interfaces block seeder_ip, sparing the other peers?

    Not when the seeder has one of the peer's own addresses; not when the peer listens on
    every address (or a device) and the seeder is on loopback: a fleet on one host shares it.
    """
    try:
        seeder = ipaddress.ip_address(seeder_ip)
    except ValueError:
        return False
    own = bound_addresses(listen_interfaces)
    if not own:
        return not seeder.is_loopback
    return seeder_ip not in own and str(seeder) not in own


def literal(url: str) -> str | None:
    """url's host when it is an address (not a name)."""
    try:
        return str(ipaddress.ip_address(urlsplit(url).hostname or ""))
    except ValueError:
        return None


async def resolve(url: str) -> str | None:
    """The address of url's host (a name resolved once); None when it has none."""
    host = urlsplit(url).hostname
    if not host:
        return None
    if literal(url):
        return literal(url)
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return None
    return found[0][4][0] if found else None


class Fetch:
    """One deploy's slice fetched from the seeder: run() until the gate no longer wants it.

    The seeder deals each piece when asked (GET <pieces>/next, slices.Dealer.take): the
    first piece nobody has yet, whoever asks first, so that every follower keeps fetching
    until no piece is left and the seeder's link stays full to the end.  A seeder that
    answers next with 404 (an older one) gets asked for the own pieces by index instead.  A
    piece handed to libtorrent and still not had after REFETCH_SECONDS is fetched again by
    index.

    missing(): the own pieces not had yet, in the order to fetch them (the gate's list).
    have(p): has libtorrent got piece p (hashed and written)?
    add(p, data): hand a fetched piece to libtorrent.
    """

    def __init__(
        self,
        url: str,
        missing: Callable[[], list[int] | None],
        have: Callable[[int], bool],
        add: Callable[[int, bytes], None],
        size: Callable[[int], int],
        count: int,
    ):
        self.url = url.rstrip("/") + "/"
        self.count = count  # the torrent's pieces
        self.missing = missing
        self.have = have
        self.add = add
        self.size = size
        self.bytes = 0  # payload fetched
        self.pieces = 0
        self.added_at: dict[int, float] = {}  # piece -> when handed to libtorrent
        self.flight: set[int] = set()
        self.more = asyncio.Event()  # the slice grew (the seeder moved pieces here)
        self.failed = ""  # why it gave up ("" while it works or once done)
        self.draining = False  # no new pieces: the ones on their way still come (drain())
        self.last_ok = time.monotonic()
        self.taking = True  # the seeder deals pieces (NEXT); False: own pieces by index
        self.streaming = True  # ...in one answer (STREAM) until that fails or ends
        self.dealt_all = False  # the seeder has no piece left to deal
        self.taken: deque[tuple[float, int]] = deque()  # (when added, piece), oldest first

    def _next(self, now: float) -> int | str | None:
        """A piece to fetch by index, NEXT to be dealt one, or None (nothing now)."""
        if self.taking:
            again = self._refetch(now)
            if again is not None:
                return again
            return None if self.dealt_all or self.streaming else NEXT
        for p in self.missing() or ():
            if p in self.flight or now - self.added_at.get(p, -REFETCH_SECONDS) < REFETCH_SECONDS:
                continue
            if not self.have(p):
                return p
        return None

    def _refetch(self, now: float) -> int | None:
        """The oldest dealt piece libtorrent still lacks REFETCH_SECONDS after it got it."""
        while self.taken:
            added, piece = self.taken[0]
            if self.have(piece):
                self.taken.popleft()
            elif now - added >= REFETCH_SECONDS:
                self.taken.popleft()
                return piece
            else:
                return None
        return None

    def drain(self) -> None:
        """Start no more fetches; run() returns once the pieces on their way are in."""
        self.draining = True
        self.more.set()

    async def run(self, client: aiohttp.ClientSession, ident: str, timeout: float) -> None:
        """Fetch the missing pieces as they come, until cancelled or fetching fails."""
        workers = [
            asyncio.ensure_future(self._worker(client, ident, timeout)) for _ in range(CONCURRENCY)
        ]
        if self.taking and self.streaming:
            workers.append(asyncio.ensure_future(self._stream(client, ident, timeout)))
        else:
            self.streaming = False
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()

    async def _worker(self, client: aiohttp.ClientSession, ident: str, timeout: float) -> None:
        backoff = RETRY_FIRST
        while not self.failed and not self.draining:
            now = time.monotonic()
            piece = self._next(now)
            if piece is None:
                self.more.clear()
                try:
                    await asyncio.wait_for(self.more.wait(), IDLE_WAIT)
                except asyncio.TimeoutError:
                    pass
                self.last_ok = max(self.last_ok, time.monotonic() - IDLE_WAIT)
                continue
            asked = piece
            self.flight.add(asked)
            try:
                if asked == NEXT:
                    piece, data = await self._take(client, ident, timeout)
                    if piece is None:
                        continue
                else:
                    data = await self._get(client, asked, ident, timeout)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                if time.monotonic() - self.last_ok >= FAIL_SECONDS:
                    self.failed = f"piece {asked}: {exc or type(exc).__name__}"
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, FAIL_SECONDS)
                continue
            finally:
                self.flight.discard(asked)
            backoff = RETRY_FIRST
            self._got(piece, data)

    def _got(self, piece: int, data: bytes) -> None:
        self.last_ok = time.monotonic()
        self.bytes += len(data)
        self.pieces += 1
        self.added_at[piece] = self.last_ok
        if self.taking:
            self.taken.append((self.last_ok, piece))
        self.add(piece, data)

    async def _stream(self, client: aiohttp.ClientSession, ident: str, timeout: float) -> None:
        """Take the dealt pieces in one answer (STREAM) until the seeder has none left.

        Asked for one by one (NEXT), each piece cost a request's round trip through the
        follower's busy upload and the seeder's queue, during which the follower's share of
        the seeder's link stood idle: with 128 KiB pieces, 15-20 % of the time (bench/,
        session 8).  Should the stream fail, the workers ask one by one again.
        """
        url = f"{self.url}{STREAM}?peer={ident}"
        limits = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        try:
            while not self.failed and not self.dealt_all:
                async with client.get(url, timeout=limits) as response:
                    if response.status != 200:
                        log.info("%s: answered HTTP %d: pieces one by one", url, response.status)
                        return
                    await self._frames(response)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            log.info("%s: %s: pieces one by one", url, exc or type(exc).__name__)
        except asyncio.IncompleteReadError:
            log.info("%s: the stream ends inside a piece: pieces one by one", url)
        finally:
            self.streaming = False
            self.more.set()

    async def _frames(self, response: aiohttp.ClientResponse) -> None:
        """The pieces of one stream answer, up to END (none left) or its end (ask again)."""
        while not self.failed:
            try:
                head = await response.content.readexactly(FRAME.size)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise ValueError("the stream ends inside a frame") from None
                return  # STREAM_PIECES in this answer: ask again
            piece, length = FRAME.unpack(head)
            if piece == END:
                self.dealt_all = True
                return
            if piece >= self.count or length != self.size(piece):
                raise ValueError(f"a frame of piece {piece}, {length} bytes")
            self._got(piece, await response.content.readexactly(length))

    async def _take(
        self, client: aiohttp.ClientSession, ident: str, timeout: float
    ) -> tuple[int | None, bytes]:
        """The piece the seeder deals: (index, data); (None, b"") when none is dealt."""
        url = f"{self.url}{NEXT}?peer={ident}"
        async with client.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status == 204:
                self.dealt_all = True
                return None, b""
            if response.status == 404:
                log.info("%s: the seeder does not deal pieces: own pieces by index", url)
                self.taking = False
                return None, b""
            response.raise_for_status()
            raw = response.headers.get(PIECE_HEADER)
            if raw is None:  # (a proxy in between that drops it?)
                log.warning("%s: no %s in the answer: own pieces by index", url, PIECE_HEADER)
                self.taking = False
                return None, b""
            if not (raw.isascii() and raw.isdigit()):
                raise ValueError(f"{url}: no piece index in the answer ({PIECE_HEADER})")
            piece = int(raw)
            if piece >= self.count:
                raise ValueError(f"{url}: piece {piece} of a torrent of {self.count}")
            want = self.size(piece)
            data = await follow.read_capped(response, url, want)
        if len(data) != want:
            raise ValueError(f"{url}: {len(data)} bytes, not piece {piece}'s {want}")
        return piece, data

    async def _get(
        self, client: aiohttp.ClientSession, piece: int, ident: str, timeout: float
    ) -> bytes:
        url = f"{self.url}{piece}?peer={ident}"
        want = self.size(piece)
        data = await follow.fetch(client, url, timeout, want)  # ValueError past want bytes
        if len(data) != want:
            raise ValueError(f"{url}: {len(data)} bytes, not the piece's {want}")
        return data

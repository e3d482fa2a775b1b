"""piecehttp.py and the parts of slices.py and lt.py behind a slice taken over HTTP.

Pieces are read from real torrents made by murderd.torrent, and Fetch talks real HTTP to a
small aiohttp server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import aiohttp
import pytest
from aiohttp import web
from deploykit import write_tree

from murderd import piecehttp, slices, torrent
from murderd.localfleet import free_port, wait_for
from murderd.lt import bound_addresses, lan_settings, lt

PIECE = 16384

# --- may_block, literal, bound_addresses -------------------------------------------------


@pytest.mark.parametrize(
    "seeder, listening, blockable",
    [
        # A fleet on one host, every daemon on 127.0.0.1: blocking would block every peer.
        ("127.0.0.1", "127.0.0.1:6881", False),
        # A peer on a loopback address of its own (LocalFleet(peer_addresses=True)).
        ("127.0.0.1", "127.0.0.12:6881", True),
        ("127.0.0.1", "127.0.0.12:6881s", True),  # an SSL listen port ("s") too
        # Listening on every address (or a device): a loopback seeder is on this host.
        ("127.0.0.1", "0.0.0.0:6881", False),
        ("127.0.0.1", "[::]:6881", False),
        ("127.0.0.1", "0.0.0.0:6881,[::]:6881", False),
        ("127.0.0.1", "eth0:6881", False),
        ("::1", "[::]:6881", False),
        ("127.0.0.1", "", False),
        # ...and any other seeder address is another host's.
        ("10.0.0.1", "0.0.0.0:6881", True),
        ("10.0.0.1", "eth0:6881", True),
        ("10.0.0.1", "10.0.0.2:6881,eth0:6881", True),
        ("10.0.0.1", "", True),
        # Specific addresses: blockable unless the seeder has one of them.
        ("10.0.0.1", "10.0.0.2:6881", True),
        ("10.0.0.1", "10.0.0.2:6881,10.0.0.1:6881", False),
        ("::1", "[::1]:6881", False),
        ("2001:db8::1", "[2001:db8::2]:6881", True),
        ("2001:db8::1", "[2001:DB8::1]:6881", False),  # one address, spelt two ways
        ("2001:DB8::1", "[2001:db8::1]:6881", False),
        ("2001:db8::1", "127.0.0.1:6881", True),
        # Not an address (a name not resolved): never blocked.
        ("seeder.example", "10.0.0.2:6881", False),
        ("", "10.0.0.2:6881", False),
    ],
)
def test_may_block(seeder, listening, blockable):
    assert piecehttp.may_block(seeder, listening) is blockable


@pytest.mark.parametrize(
    "url, address",
    [
        ("http://127.0.0.1:8080/pieces/ab/", "127.0.0.1"),
        ("http://10.1.2.3/pieces/ab/", "10.1.2.3"),
        ("http://[::1]:8080/pieces/ab/", "::1"),
        ("https://[2001:DB8::1]/pieces/", "2001:db8::1"),
        ("http://seeder.example:8080/pieces/ab/", None),
        ("http://localhost/pieces/", None),
        ("http://127.1/pieces/", None),  # inet_aton spelling: a name to resolve, not literal
        ("", None),
        ("not a url", None),
    ],
)
def test_literal(url, address):
    assert piecehttp.literal(url) == address


@pytest.mark.parametrize(
    "listening, bound",
    [
        ("127.0.0.12:6881", ["127.0.0.12"]),
        (" 127.0.0.12:6881 , 10.0.0.1:6882", ["127.0.0.12", "10.0.0.1"]),
        ("127.0.0.1:6881,[::1]:6881", ["127.0.0.1", "::1"]),
        ("[2001:DB8::1]:6881", ["2001:db8::1"]),
        ("0.0.0.0:6881", []),
        ("[::]:6881", []),
        ("eth0:6881", []),
        ("127.0.0.1:6881,eth0:6881", []),  # one device: not only specific addresses
        ("10.0.0.1:6881,0.0.0.0:6882", []),
        ("", []),
    ],
)
def test_bound_addresses(listening, bound):
    assert bound_addresses(listening) == bound


def test_lan_settings_connect_out_from_the_listen_addresses():
    one = lan_settings("127.0.0.12:6881")
    assert one["outgoing_interfaces"] == "127.0.0.12"
    assert one["apply_ip_filter_to_trackers"] is False
    two = lan_settings("127.0.0.12:6881,[::1]:6882", seeder=True)
    assert two["outgoing_interfaces"] == "127.0.0.12,::1"
    for wildcard in ("0.0.0.0:6881", "eth0:6881", "127.0.0.12:6881,eth0:6881"):
        assert lan_settings(wildcard).get("outgoing_interfaces", "") == ""
    # libtorrent takes it as given.
    session = lt.session(lan_settings(f"127.0.0.12:{free_port('127.0.0.12')}"))
    assert session.get_settings()["outgoing_interfaces"] == "127.0.0.12"
    assert session.get_settings()["apply_ip_filter_to_trackers"] is False
    del session


# --- read_piece -------------------------------------------------------------------------


def _layout(info, root) -> bytes:
    """The torrent's byte stream as the files on disk give it (pad files as zeros)."""
    files = info.files()
    out = bytearray()
    for i in range(files.num_files()):
        if files.file_flags(i) & files.flag_pad_file:
            out += bytes(files.file_size(i))
        else:
            out += (root / files.file_path(i)).read_bytes()
    return bytes(out)


# Sizes chosen so that v1 pieces span files: piece 2 holds the end of a.bin, all of b.bin
# and the start of c.bin.
APP = {"app/a.bin": 40000, "app/b.bin": 1, "app/c.bin": 70000, "app/sub/d.bin": 2 * PIECE + 500}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torrent_info.files() on 2.1
@pytest.mark.parametrize("fmt", torrent.FORMATS)
def test_read_piece_of_a_multi_file_torrent(tmp_path, fmt):
    src = tmp_path / "src"
    contents = write_tree(src, APP)
    made = torrent.make_torrent(src / "app", [], piece_size=PIECE, fmt=fmt)
    info = torrent.parse(made.data).info
    stream = _layout(info, src)
    if fmt == "v1":
        # No pad files: the stream is the files back to back.
        assert stream == b"".join(contents[rel] for rel in sorted(contents))
        spans = info.map_block(2, 0, PIECE)
        assert len({p.file_index for p in spans}) == 3, "piece 2 spans a, b and c"
    pieces = [piecehttp.read_piece(info, str(src), i) for i in range(info.num_pieces())]
    for i, data in enumerate(pieces):
        assert len(data) == info.piece_size(i)
        assert data == stream[i * PIECE : i * PIECE + info.piece_size(i)], f"piece {i}"
        if fmt != "v2":  # v1 piece hashes (a hybrid's cover its pad files)
            want = info.hash_for_piece(i)  # bytes on 2.1, a sha1_hash on 2.0
            want = want if isinstance(want, bytes) else want.to_bytes()
            assert hashlib.sha1(data).digest() == want, f"piece {i}"
    assert b"".join(pieces) == stream
    if fmt == "v1":
        assert len(pieces[-1]) == (sum(APP.values()) % PIECE)  # short, not padded


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_read_piece_of_a_single_file_torrent(tmp_path):
    data = write_tree(tmp_path, {"web-1.0.bin": 5 * PIECE + 123})["web-1.0.bin"]
    made = torrent.make_torrent(tmp_path / "web-1.0.bin", [], piece_size=PIECE)
    info = torrent.parse(made.data).info
    got = [piecehttp.read_piece(info, str(tmp_path), i) for i in range(info.num_pieces())]
    assert [len(p) for p in got] == [PIECE] * 5 + [123]
    assert b"".join(got) == data


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_read_piece_of_a_file_cut_short_is_an_error(tmp_path):
    write_tree(tmp_path, {"web-1.0.bin": 3 * PIECE})
    made = torrent.make_torrent(tmp_path / "web-1.0.bin", [], piece_size=PIECE)
    info = torrent.parse(made.data).info
    os.truncate(tmp_path / "web-1.0.bin", 2 * PIECE + 10)
    assert len(piecehttp.read_piece(info, str(tmp_path), 1)) == PIECE
    with pytest.raises(OSError, match="shorter than the torrent says"):
        piecehttp.read_piece(info, str(tmp_path), 2)
    os.unlink(tmp_path / "web-1.0.bin")
    with pytest.raises(FileNotFoundError):
        piecehttp.read_piece(info, str(tmp_path), 0)


# --- the dealer and the priorities with the seeder away ------------------------------------


def test_dealer_counts_a_piece_served_over_http_as_out():
    dealer = slices.Dealer({"a": 0, "b": 1}, 6)
    dealer.sent(3)
    assert dealer.pending == [0, 1, 2, 4, 5] and dealer.left == 5
    dealer.sent(3)  # served twice (a refetch): still out once
    dealer.sent(99)  # past the end: nothing
    assert dealer.left == 5
    # Out by HTTP and seen in a bitfield: both count once.
    dealer.saw([True, False, False, True, False, False])
    assert dealer.pending == [1, 2, 4, 5]
    for p in (5, 1, 2, 4):
        dealer.sent(p)
    assert dealer.done and dealer.pending == []
    dealer.sent(0)  # nothing left: still fine
    assert dealer.done


@pytest.mark.parametrize("how", ["sent", "saw"])
def test_every_follower_hears_when_every_piece_is_out(how):
    """The last piece out (served, or seen in a bitfield) changes every follower's part
    (Part.out), so that each one's long poll is answered: the seeder is free for the tail."""
    dealer = slices.Dealer({"a": 0, "b": 1, "c": 2}, 6)
    for p in range(5):
        dealer.sent(p)
    assert not dealer.done
    assert [dealer.part(f).out for f in "abc"] == [False] * 3
    before = [dealer.version(f) for f in "abc"]
    if how == "sent":
        dealer.sent(5)
    else:
        dealer.saw([False] * 5 + [True])
    assert dealer.done
    assert [dealer.part(f).out for f in "abc"] == [True] * 3
    assert [dealer.version(f) for f in "abc"] == [v + 1 for v in before]
    dealer.sent(5)  # again: no further change
    dealer.saw([True] * 6)
    assert [dealer.version(f) for f in "abc"] == [v + 1 for v in before]
    assert slices.parse_slice({"slice": [2, 3], "out": True}) == dealer.part("c")


def test_dealer_rates_follow_pieces_served_over_http():
    """A follower whose slice comes over HTTP is as fast as its pieces go out, and is not
    taken for the slowest: its remainder is not moved to others."""
    dealer = slices.Dealer({"fast": 0, "slow": 1}, 20)
    dealer.rebalance(0.0)
    for p in range(0, 20, 2):  # all of slice 0 served in 1 s; slice 1: one piece
        dealer.sent(p)
    dealer.sent(1)
    changed = dealer.rebalance(1.0)
    assert dealer.rates[0] > dealer.rates[1]
    assert changed == {0, 1}  # the fast one, with nothing left, takes half of the slow one
    # Slice 1 has 9 pieces left (3, 5, ..., 19): the back 4 move.
    assert dealer.part("fast").added == (13, 15, 17, 19)
    assert dealer.part("slow").dropped == (13, 15, 17, 19)


def test_priorities_with_the_seeder_kept_away():
    # 6 pieces; own {0, 3}, both missing (3 is the back half).  Availability counts
    # connected peers: with the seeder connected (seeds=1) a piece only one peer has may
    # be the seeder's alone; with the seeder kept away (seeds=0) that one is another peer.
    availability = [0, 1, 2, 1, 0, 3]
    own, missing = {0, 3}, [0, 3]
    with_seeder = slices.priorities(availability, own, missing)
    assert with_seeder == slices.priorities(availability, own, missing, seeds=1)
    assert with_seeder == [
        slices.OWN,
        slices.HELD,
        slices.OTHERS,
        slices.OWN_BACK,
        slices.HELD,
        slices.OTHERS,
    ]
    assert slices.priorities(availability, own, missing, seeds=0) == [
        slices.OWN,
        slices.OTHERS,  # one peer has it, and it is not the seeder
        slices.OTHERS,
        slices.OWN_BACK,
        slices.HELD,  # nobody has it
        slices.OTHERS,
    ]


def test_gate_fetching_never_releases(tmp_path):
    """Over HTTP the seeder is away: the gate never releases held pieces to take from it."""
    write_tree(tmp_path / "src", {"f.bin": 12 * PIECE})
    made = torrent.make_torrent(tmp_path / "src" / "f.bin", [], piece_size=PIECE)
    session = lt.session({"listen_interfaces": "127.0.0.1:0", "enable_dht": False})
    params = lt.add_torrent_params()
    params.ti = torrent.parse(made.data).info
    params.save_path = str(tmp_path / "staging")
    handle = session.add_torrent(params)
    # add_piece() before the torrent is ready (its files checked) is dropped silently.
    downloading = lt.torrent_status.states.downloading
    wait_for(lambda: handle.status().state == downloading, 10, what="the torrent to be ready")
    gate = slices.Gate(slices.Part(1, 4), now=0.0)
    assert gate.update(handle, 0, 0.0)
    assert gate.may_release  # over BitTorrent it would, once its own slice is in
    gate.fetching(object())
    assert not gate.may_release and gate.fetch is not None
    gate.reslice(slices.Part(1, 4, added=(2,)))  # the seeder moved a piece here
    assert gate.own == {1, 2, 5, 9} and not gate.may_release
    # Its own slice all in (add_piece, as the fetch does): still no release, however long.
    for p in sorted(gate.own):
        handle.add_piece(p, (tmp_path / "src" / "f.bin").read_bytes()[p * PIECE :][:PIECE], 0)
    wait_for(lambda: all(handle.have_piece(p) for p in gate.own), 10, what="the pieces")
    assert gate.update(handle, 4 * PIECE, 0.1)
    assert gate.update(handle, 4 * PIECE, 0.1 + 3 * slices.RELEASE_SECONDS)
    assert gate.missing == [] and gate.ended == ""
    want = [slices.OWN if p in gate.own else slices.HELD for p in range(12)]
    assert list(handle.get_piece_priorities()) == want
    del session


# --- Fetch against a real HTTP server ------------------------------------------------------


class PieceServer:
    """An aiohttp server on 127.0.0.1 serving pieces of data, with a mode for failures."""

    def __init__(self, data: bytes, piece: int, delay: float = 0.02):
        self.data = data
        self.piece = piece
        self.delay = delay
        self.mode = "ok"  # ok, 503, short, long, bad-index
        self.deal: list[int] | None = None  # what GET next deals, in order (None: 404)
        self.stream: list[int] | None = None  # what GET stream sends, in order (None: 404)
        self.stream_mode = "ok"  # ok, bad-frame (a length that is not the piece's), cut
        self.stream_pieces = piecehttp.STREAM_PIECES  # pieces in one stream answer at most
        self.streams = 0  # GET stream asked
        self.nexts = 0  # GET next asked
        self.requests: list[int] = []  # pieces asked for, in the order asked
        self.peers: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = request.match_info["index"]
        if raw == piecehttp.STREAM:
            return await self.handle_stream(request)
        if raw == piecehttp.NEXT:
            if self.deal is None:  # an older seeder: "next" is no piece
                raise web.HTTPNotFound(text="no such piece\n")
            self.nexts += 1
            if not self.deal:
                return web.Response(status=204)
            index = self.deal.pop(0)
        else:
            index = int(raw)
        self.requests.append(index)
        self.peers.add(request.query.get("peer", ""))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)  # a piece takes a while to send
            if self.mode == "503":
                raise web.HTTPServiceUnavailable(text="cannot read the piece\n")
            body = self.data[index * self.piece : (index + 1) * self.piece]
            if self.mode == "short":
                body = body[:-1]
            elif self.mode == "long":
                body += b"x"
            headers = {piecehttp.PIECE_HEADER: str(index) if self.mode != "bad-index" else "７"}
            if self.mode == "no-index":  # (a proxy that drops it)
                headers = {}
            return web.Response(body=body, headers=headers)
        finally:
            self.in_flight -= 1

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        if self.stream is None:  # an older seeder: "stream" is no piece
            raise web.HTTPNotFound(text="no such piece\n")
        self.peers.add(request.query.get("peer", ""))
        self.streams += 1
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(self.stream_pieces):
            if not self.stream:
                await response.write(piecehttp.FRAME.pack(piecehttp.END, 0))
                break
            index = self.stream.pop(0)
            self.requests.append(index)
            await asyncio.sleep(self.delay)
            body = self.data[index * self.piece : (index + 1) * self.piece]
            if self.stream_mode == "cut":
                await response.write(piecehttp.frame(index, body)[:-1])
                return response  # the connection ends inside the piece
            frame = piecehttp.frame(index, body)
            if self.stream_mode == "bad-frame" and not self.stream:  # the last one
                frame = piecehttp.FRAME.pack(index, len(body) + 1) + body
            await response.write(frame)
        await response.write_eof()
        return response

    async def __aenter__(self) -> PieceServer:
        app = web.Application()
        app.router.add_get("/pieces/abc/{index}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/pieces/abc"  # Fetch adds the slash
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


class Libtorrent:
    """What Fetch hands pieces to: remembers them; have() once added (unless dropped)."""

    def __init__(self, total: int, order: list[int], piece: int, size: int):
        self.total = total
        self.order = list(order)  # the gate's missing list, in its order
        self.piece = piece
        self.size_of_all = size
        self.added: list[tuple[int, bytes]] = []
        self.had: set[int] = set()
        self.drop_first: set[int] = set()  # pieces whose first copy "fails its hash check"

    def missing(self) -> list[int]:
        return [p for p in self.order if p not in self.had]

    def have(self, p: int) -> bool:
        return p in self.had

    def add(self, p: int, data: bytes) -> None:
        self.added.append((p, data))
        if p in self.drop_first:
            self.drop_first.discard(p)
            return
        self.had.add(p)

    def size(self, p: int) -> int:
        return min(self.piece, self.size_of_all - p * self.piece)


async def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def _fetch(server: PieceServer, lt_: Libtorrent) -> piecehttp.Fetch:
    return piecehttp.Fetch(
        server.url,
        missing=lt_.missing,
        have=lt_.have,
        add=lt_.add,
        size=lt_.size,
        count=lt_.total,
    )


PIECES = 10
SIZE = PIECES * PIECE - 1000  # the last piece is short


def test_fetch_takes_the_missing_pieces_in_order():
    data = os.urandom(SIZE)
    order = [7, 1, 4, 9, 0, 3]  # the own slice's missing pieces, in the gate's order

    async def main():
        async with PieceServer(data, PIECE) as server:
            target = Libtorrent(PIECES, order, PIECE, SIZE)
            fetch = _fetch(server, target)
            async with aiohttp.ClientSession() as client:
                task = asyncio.ensure_future(fetch.run(client, "me-1", 10))
                try:
                    await wait_until(lambda: target.had == set(order), 20, "every piece")
                    # The slice grows (the seeder moved pieces here): fetched too.
                    target.order += [2, 8]
                    fetch.more.set()
                    await wait_until(lambda: {2, 8} <= target.had, 20, "the moved pieces")
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            return server, target, fetch

    server, target, fetch = asyncio.run(main())
    assert server.requests == order + [2, 8]  # in order, each once
    assert [p for p, _ in target.added] == server.requests
    for p, got in target.added:
        assert got == data[p * PIECE : (p + 1) * PIECE], f"piece {p}"
    assert server.max_in_flight == piecehttp.CONCURRENCY
    assert server.peers == {"me-1"}
    assert fetch.pieces == 8 and fetch.bytes == sum(len(d) for _, d in target.added)
    assert fetch.bytes == 8 * PIECE - 1000  # piece 9 (the short last one) included
    assert fetch.failed == ""


def test_fetch_drained_brings_in_what_is_on_its_way_and_asks_for_nothing_more():
    """drain() (every piece is out: the seeder's BitTorrent is back for the tail): the pieces
    asked for still come and go to libtorrent; no new one is asked for; run() returns."""
    data = os.urandom(SIZE)

    async def main():
        async with PieceServer(data, PIECE, delay=0.3) as server:
            target = Libtorrent(PIECES, list(range(PIECES)), PIECE, SIZE)
            fetch = _fetch(server, target)
            async with aiohttp.ClientSession() as client:
                task = asyncio.ensure_future(fetch.run(client, "me-1", 10))
                try:
                    await wait_until(lambda: server.in_flight > 0, 10, "a piece asked for")
                    asked = list(server.requests)
                    fetch.drain()
                    await asyncio.wait_for(task, 10)
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            return server, target, fetch, asked

    server, target, fetch, asked = asyncio.run(main())
    assert asked and server.requests == asked, (asked, server.requests)
    assert sorted(p for p, _ in target.added) == sorted(asked)
    for p, got in target.added:
        assert got == data[p * PIECE : (p + 1) * PIECE], f"piece {p}"
    assert fetch.failed == "" and len(target.had) < PIECES


def test_fetch_fetches_again_a_piece_that_libtorrent_did_not_take():
    """add_piece() of a piece that fails its hash check: fetched again after REFETCH_SECONDS."""
    data = os.urandom(SIZE)

    async def main():
        async with PieceServer(data, PIECE) as server:
            target = Libtorrent(PIECES, [2, 5], PIECE, SIZE)
            target.drop_first = {5}
            fetch = _fetch(server, target)
            async with aiohttp.ClientSession() as client:
                task = asyncio.ensure_future(fetch.run(client, "me-1", 10))
                try:
                    await wait_until(lambda: 2 in target.had, 10, "piece 2")
                    started = time.monotonic()
                    await wait_until(
                        lambda: 5 in target.had, piecehttp.REFETCH_SECONDS + 10, "piece 5"
                    )
                    waited = time.monotonic() - started
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            return server, waited

    server, waited = asyncio.run(main())
    assert server.requests == [2, 5, 5]
    assert waited >= piecehttp.REFETCH_SECONDS - 0.5


@pytest.mark.parametrize(
    "mode, reason",
    [
        ("503", "answered HTTP 503"),
        ("short", f"{PIECE - 1} bytes, not the piece's {PIECE}"),
        ("long", f"over the cap of {PIECE}"),
        ("refused", ""),
    ],
)
def test_fetch_gives_up_after_fail_seconds(mode, reason):
    data = os.urandom(SIZE)

    async def main():
        async with PieceServer(data, PIECE) as server:
            server.mode = mode
            target = Libtorrent(PIECES, [0, 1, 2], PIECE, SIZE)
            async with aiohttp.ClientSession() as client:
                if mode == "refused":
                    await server.runner.cleanup()  # nobody listens on the port any more
                started = time.monotonic()
                fetch = _fetch(server, target)
                await asyncio.wait_for(fetch.run(client, "me-1", 10), piecehttp.FAIL_SECONDS + 10)
                took = time.monotonic() - started
                if mode == "refused":
                    server.runner = web.AppRunner(web.Application())
                    await server.runner.setup()
            return server, target, fetch, took

    server, target, fetch, took = asyncio.run(main())
    assert fetch.failed.startswith("piece ")
    assert reason in fetch.failed
    assert piecehttp.FAIL_SECONDS <= took < piecehttp.FAIL_SECONDS + 5
    assert target.added == [] and fetch.pieces == 0 and fetch.bytes == 0
    if mode != "refused":
        # Retried meanwhile (backing off), not asked once and dropped.
        assert len(server.requests) >= 3, server.requests
        assert len(server.requests) < 40, server.requests


def test_fetch_with_nothing_to_fetch_does_not_fail():
    """Idle (the slice all had, or not dealt yet) is not failing, however long it lasts."""
    data = os.urandom(SIZE)

    async def main():
        async with PieceServer(data, PIECE) as server:
            server.mode = "503"  # would fail at once if anything were asked
            target = Libtorrent(PIECES, [], PIECE, SIZE)
            fetch = _fetch(server, target)
            async with aiohttp.ClientSession() as client:
                task = asyncio.ensure_future(fetch.run(client, "me-1", 10))
                await asyncio.wait([task], timeout=piecehttp.FAIL_SECONDS + 1)
                done = task.done()
                # Now the server works, and pieces come: fetched at once.
                server.mode = "ok"
                target.order = [4]
                fetch.more.set()
                try:
                    await wait_until(lambda: 4 in target.had, 10, "piece 4")
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            return server, fetch, done

    server, fetch, done = asyncio.run(main())
    assert not done, "an idle fetch ended"
    assert fetch.failed == "" and server.requests == [4]


@pytest.mark.parametrize("how", ["next", "stream"])
def test_fetch_takes_the_pieces_the_seeder_deals_until_none_is_left(how):
    """A seeder that deals one piece per request (GET next: PIECE_HEADER says which, 204
    when none is left; GET stream: 404) or streams them (GET stream: a frame before each,
    END when none is left): each piece in its order, own slice or not; then the fetch
    waits, asking no more."""
    data = os.urandom(SIZE)

    async def main():
        async with PieceServer(data, PIECE) as server:
            if how == "stream":
                server.stream = [3, 0, 9, 6]  # 9: another slice's piece, the short last one
                server.stream_pieces = 3  # then the fetch asks again, and hears "none left"
                server.deal = [1]  # never asked for: the stream dealt every piece
            else:
                server.deal = [3, 0, 9, 6]
            target = Libtorrent(PIECES, [0, 3, 6], PIECE, SIZE)
            fetch = _fetch(server, target)
            async with aiohttp.ClientSession() as client:
                task = asyncio.ensure_future(fetch.run(client, "me-1", 10))
                try:
                    await wait_until(lambda: fetch.dealt_all, 20, "the seeder out of pieces")
                    await asyncio.sleep(3 * piecehttp.IDLE_WAIT)  # idle: asks nothing more
                    assert not task.done()
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            return server, target, fetch

    server, target, fetch = asyncio.run(main())
    assert server.requests == [3, 0, 9, 6]
    assert (server.nexts, server.streams) == ((0, 2) if how == "stream" else (5, 0))
    assert [p for p, _ in target.added] == [3, 0, 9, 6]
    for p, got in target.added:
        assert got == data[p * PIECE : (p + 1) * PIECE], f"piece {p}"
    assert fetch.taking and fetch.failed == "" and fetch.pieces == 4 and not fetch.streaming
    assert server.peers == {"me-1"}


@pytest.mark.parametrize("mode", ["bad-frame", "cut"])
def test_a_broken_stream_leaves_the_pieces_to_be_dealt_one_by_one(mode):
    """A frame that does not fit the torrent, or an answer that ends inside a piece: what
    came whole is kept, and the fetch asks for the rest one by one (GET next)."""
    data = os.urandom(SIZE)

    async def main():
        async with PieceServer(data, PIECE) as server:
            server.stream = [4, 5]  # 5 comes broken
            server.stream_mode = mode if mode == "bad-frame" else "ok"
            server.deal = [5, 7]
            target = Libtorrent(PIECES, [], PIECE, SIZE)
            fetch = _fetch(server, target)
            if mode == "cut":
                server.stream = [5]
                server.stream_mode = "cut"
                server.deal = [4, 5, 7]
            async with aiohttp.ClientSession() as client:
                task = asyncio.ensure_future(fetch.run(client, "me-1", 10))
                try:
                    await wait_until(lambda: {4, 5, 7} <= target.had, 20, "pieces 4, 5, 7")
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            return target, fetch

    target, fetch = asyncio.run(main())
    for p, got in target.added:
        assert got == data[p * PIECE : (p + 1) * PIECE], f"piece {p}"
    assert sorted(p for p, _ in target.added) == [4, 5, 7]  # nothing broken was added
    assert fetch.failed == "" and not fetch.streaming


@pytest.mark.parametrize("mode", ["old", "no-index"])
def test_fetch_from_a_seeder_that_does_not_deal_takes_the_own_pieces_by_index(mode):
    """An older seeder (next: 404), or a dealt piece without its index (a proxy dropped the
    header): the own pieces by index from then on."""
    data = os.urandom(SIZE)

    async def main():
        async with PieceServer(data, PIECE) as server:
            if mode == "no-index":
                server.mode = mode
                server.deal = [7]  # lost to this peer: it comes over BitTorrent after "out"
            target = Libtorrent(PIECES, [5, 2], PIECE, SIZE)
            fetch = _fetch(server, target)
            async with aiohttp.ClientSession() as client:
                task = asyncio.ensure_future(fetch.run(client, "me-1", 10))
                try:
                    await wait_until(lambda: target.had == {2, 5}, 20, "the own pieces")
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            return server, fetch

    server, fetch = asyncio.run(main())
    assert server.requests == ([7] if mode == "no-index" else []) + [5, 2]
    assert not fetch.taking


@pytest.mark.parametrize("dropped", [4, 0])  # (piece 0 is falsy)
def test_fetch_fetches_again_by_index_a_dealt_piece_libtorrent_did_not_take(dropped):
    data = os.urandom(SIZE)

    async def main():
        async with PieceServer(data, PIECE) as server:
            server.deal = [dropped, 1]
            target = Libtorrent(PIECES, [], PIECE, SIZE)
            target.drop_first = {dropped}
            fetch = _fetch(server, target)
            async with aiohttp.ClientSession() as client:
                task = asyncio.ensure_future(fetch.run(client, "me-1", 10))
                try:
                    await wait_until(
                        lambda: {1, dropped} <= target.had,
                        piecehttp.REFETCH_SECONDS + 10,
                        f"piece {dropped}",
                    )
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            return server

    server = asyncio.run(main())
    assert server.requests == [dropped, 1, dropped]


@pytest.mark.parametrize(
    "mode, deal, reason",
    [
        ("bad-index", [2], "no piece index in the answer"),
        ("ok", [PIECES], f"piece {PIECES} of a torrent of {PIECES}"),
        ("short", [2], f"{PIECE - 1} bytes, not piece 2's {PIECE}"),
    ],
)
def test_a_dealt_piece_that_is_not_one_is_refused(mode, deal, reason):
    data = os.urandom(SIZE + PIECE)  # room for a piece past the torrent's last

    async def main():
        async with PieceServer(data, PIECE) as server:
            server.mode = mode
            server.deal = deal * 100  # the seeder deals it again and again
            target = Libtorrent(PIECES, [], PIECE, SIZE)
            fetch = _fetch(server, target)
            async with aiohttp.ClientSession() as client:
                await asyncio.wait_for(fetch.run(client, "me-1", 10), piecehttp.FAIL_SECONDS + 10)
            return target, fetch

    target, fetch = asyncio.run(main())
    assert fetch.failed.startswith("piece next: ") and reason in fetch.failed, fetch.failed
    assert target.added == []

"""digest.Digest against a real libtorrent session: pieces arrive out of order (add_piece),
libtorrent's own alerts drive it (piece_finished -> pump, read_piece -> read), and the
SHA-256 of every file must match hashlib's of the original."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from deploykit import write_tree

from murderd import digest, torrent
from murderd.localfleet import wait_for
from murderd.lt import lan_settings, lt

PIECE = 16384
# v1 pieces span files; hybrid and v2 torrents pad each file to a piece boundary.
APP = {"app/a.bin": 40000, "app/b.bin": 1, "app/c.bin": 70000, "app/sub/d.bin": 2 * PIECE + 500}


class Swarm:
    """One torrent in a real session, fed piece by piece from the original files."""

    def __init__(self, tmp_path, src, made):
        settings = lan_settings("127.0.0.1:0")
        settings.update(enable_dht=False, enable_lsd=False)
        self.session = lt.session(settings)
        self.parsed = torrent.parse(made.data)
        params = lt.add_torrent_params()
        params.ti = self.parsed.info
        params.save_path = str(tmp_path / "staging")  # (self.staging)
        self.handle = self.session.add_torrent(params)
        # add_piece() before the torrent is ready (its files checked) is dropped silently.
        downloading = lt.torrent_status.states.downloading
        wait_for(lambda: self.handle.status().state == downloading, 10, what="the torrent ready")
        self.src = src
        self.pool = ThreadPoolExecutor(2)
        self.digest = None
        self.reads: dict[int, int] = {}  # piece -> read_piece answers seen
        self.staging = tmp_path / "staging"
        self.flushed = 0  # cache_flushed alerts seen
        # What libtorrent has, from its piece_finished alerts (as the peer keeps it).
        self.had = bytearray(self.parsed.info.num_pieces())

    def start(self) -> digest.Digest:
        paths = [f.path for f in self.parsed.files]
        self.digest = digest.Digest(
            self.handle, self.parsed.info, paths, self.pool, lambda p: self.had[p] == 1
        )
        return self.digest

    def piece(self, index: int) -> bytes:
        from murderd import piecehttp

        return piecehttp.read_piece(self.parsed.info, str(self.src), index)

    def dispatch(self) -> None:
        for alert in self.session.pop_alerts():
            if isinstance(alert, lt.piece_finished_alert):
                self.had[alert.piece_index] = 1
                self.digest.pump(alert.piece_index)
            elif isinstance(alert, lt.cache_flushed_alert):
                self.flushed += 1
            elif isinstance(alert, lt.read_piece_alert):
                self.reads[alert.piece] = self.reads.get(alert.piece, 0) + 1
                failed = alert.error.message() if alert.error.value() else ""
                self.digest.read(alert.piece, alert.buffer, failed)

    async def until(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        tick = time.monotonic()
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what} (digest: next "
                    f"{self.digest.next}, failed {self.digest.failed!r}, asked "
                    f"{sorted(self.digest.asked)}, read {self.reads})"
                )
            self.dispatch()
            if time.monotonic() - tick >= 0.5:  # the peer's tick loop pumps too (1 s)
                tick = time.monotonic()
                self.digest.pump()
            await asyncio.sleep(0.005)

    async def alerts(self, stop: asyncio.Event) -> None:
        """Alerts for as long as finish() runs (the peer's alert reader, in the test)."""
        while not stop.is_set():
            self.dispatch()
            await asyncio.sleep(0.005)

    async def finish(self, stall: float = 10.0):
        """What the peer does once every piece is in: flush to the files, then finish()."""
        stop = asyncio.Event()
        reader = asyncio.ensure_future(self.alerts(stop))
        try:
            flushed = self.flushed
            self.handle.flush_cache()
            await self.until(lambda: self.flushed > flushed, 10, "the cache flushed")
            return await self.digest.finish(stall, str(self.staging))
        finally:
            stop.set()
            await reader

    def close(self) -> None:
        self.pool.shutdown()
        del self.session


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torrent_info.files() on 2.1
@pytest.mark.parametrize("fmt", ["v1", "hybrid"])
def test_files_hashed_as_the_pieces_come_out_of_order(tmp_path, fmt):
    # The pieces come in through add_piece(); for v2 (and hybrid on libtorrent 2.0) pieces so
    # added never became "had" here, so those formats are not covered by this test.
    if fmt == "hybrid" and lt.__version__.startswith("2.0"):
        pytest.skip("libtorrent 2.0: add_piece() does not complete a hybrid torrent's pieces")
    src = tmp_path / "src"
    contents = write_tree(src, APP)
    made = torrent.make_torrent(src / "app", [], piece_size=PIECE, fmt=fmt)
    swarm = Swarm(tmp_path, src, made)
    total = swarm.parsed.info.num_pieces()
    order = list(range(total))
    random.Random(7).shuffle(order)

    async def main():
        digest_ = swarm.start()
        # Half of the pieces, in a random order: fed as far as they run on from piece 0.
        for p in order[: total // 2]:
            swarm.handle.add_piece(p, swarm.piece(p), 0)
        had = set(order[: total // 2])
        prefix = next(p for p in range(total + 1) if p not in had)
        await swarm.until(lambda: digest_.next == prefix, 20, f"pieces 0..{prefix - 1} fed")
        assert digest_.next == prefix and not digest_.failed
        for p in order[total // 2 :]:
            swarm.handle.add_piece(p, swarm.piece(p), 0)
        await swarm.until(lambda: all(swarm.handle.have_piece(p) for p in order), 20, "all")
        return await swarm.finish(), digest_, prefix

    try:
        sums, digest_, prefix = asyncio.run(main())
    finally:
        swarm.close()
    # Each piece read back at most once (the first ones as they came, the rest from the
    # files at the end), and nothing kept once hashed (memory: a 2 GiB deploy).
    assert set(range(prefix)) <= set(swarm.reads) and set(swarm.reads.values()) == {1}
    assert not digest_.got and not digest_.asked and digest_.fed == total
    want = {f"app/{rel[4:]}": hashlib.sha256(data).hexdigest() for rel, data in contents.items()}
    assert sums == want
    # The torrent records the same: what the peer compares them with.
    assert {f.path: f.sha256 for f in swarm.parsed.files} == want


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_read_error_gives_up_so_the_files_are_hashed_instead(tmp_path):
    src = tmp_path / "src"
    write_tree(src, {"web.bin": 6 * PIECE + 7})
    made = torrent.make_torrent(src / "web.bin", [], piece_size=PIECE)
    swarm = Swarm(tmp_path, src, made)

    async def main():
        digest_ = swarm.start()
        for p in range(3):
            swarm.handle.add_piece(p, swarm.piece(p), 0)
        await swarm.until(lambda: digest_.next == 3, 20, "pieces 0..2 fed")
        swarm.handle.add_piece(3, swarm.piece(3), 0)
        await swarm.until(lambda: 3 in digest_.asked or digest_.next > 3, 20, "piece 3 asked")
        # libtorrent answers the read of piece 3 with an error (as for a failed disk read);
        # its real answer, coming after, is ignored.
        digest_.read(3, b"", "Input/output error")
        for p in range(4, 7):
            swarm.handle.add_piece(p, swarm.piece(p), 0)
        return await swarm.finish(), digest_

    try:
        got, digest_ = asyncio.run(main())
    finally:
        swarm.close()
    if digest_.next > 3:
        pytest.skip("piece 3 was read and fed before the test could fail its read")
    assert got is None and digest_.failed == "piece 3: Input/output error"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_piece_not_in_at_the_end_is_a_failure_not_a_hang(tmp_path):
    src = tmp_path / "src"
    write_tree(src, {"web.bin": 4 * PIECE})
    made = torrent.make_torrent(src / "web.bin", [], piece_size=PIECE)
    swarm = Swarm(tmp_path, src, made)

    async def main():
        digest_ = swarm.start()
        for p in (0, 1, 3):
            swarm.handle.add_piece(p, swarm.piece(p), 0)
        await swarm.until(lambda: digest_.next == 2, 20, "pieces 0..1 fed")
        return await swarm.finish(stall=30), digest_.failed

    try:
        got, why = asyncio.run(main())
    finally:
        swarm.close()
    assert got is None and why == "piece 2 is not in"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_end_is_hashed_from_the_staged_files_as_they_are(tmp_path):
    """finish() reads what is left from the staged files (what will be placed): a byte changed
    there after the pieces came in is caught; the pieces fed before are not read again."""
    src = tmp_path / "src"
    contents = write_tree(src, {"web.bin": 8 * PIECE + 99})
    made = torrent.make_torrent(src / "web.bin", [], piece_size=PIECE)
    swarm = Swarm(tmp_path, src, made)
    total = swarm.parsed.info.num_pieces()

    async def main():
        digest_ = swarm.start()
        for p in range(3):
            swarm.handle.add_piece(p, swarm.piece(p), 0)
        await swarm.until(lambda: digest_.fed == 3, 20, "pieces 0..2 fed")
        # The rest comes while the peer is busy: its alerts wait (no piece is read back).
        for p in range(3, total):
            swarm.handle.add_piece(p, swarm.piece(p), 0)
        deadline = time.monotonic() + 20
        while not all(swarm.handle.have_piece(p) for p in range(total)):
            assert time.monotonic() < deadline, "timed out waiting for every piece"
            swarm.session.pop_alerts()
            await asyncio.sleep(0.01)
        swarm.handle.flush_cache()
        flushed = False
        while not flushed:
            assert time.monotonic() < deadline, "timed out waiting for the flush"
            alerts = swarm.session.pop_alerts()
            flushed = any(isinstance(a, lt.cache_flushed_alert) for a in alerts)
            await asyncio.sleep(0.01)
        first = digest_.next
        # A bit flips on the disk in the last piece, after libtorrent checked it.
        with open(swarm.staging / "web.bin", "r+b") as f:
            f.seek(8 * PIECE + 50)
            byte = f.read(1)
            f.seek(8 * PIECE + 50)
            f.write(bytes([byte[0] ^ 1]))
        return await swarm.finish(), first

    try:
        sums, first = asyncio.run(main())
    finally:
        swarm.close()
    assert first < total  # the end was left to finish()
    assert all(p < first for p in swarm.reads), (first, swarm.reads)
    original = hashlib.sha256(contents["web.bin"]).hexdigest()
    assert sums is not None and sums["web.bin"] != original
    flipped = bytearray(contents["web.bin"])
    flipped[8 * PIECE + 50] ^= 1
    assert sums["web.bin"] == hashlib.sha256(bytes(flipped)).hexdigest()

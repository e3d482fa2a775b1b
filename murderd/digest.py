"""The SHA-256 of a deploy's files, taken while it downloads (peer.py).

A peer checks every finished deploy end to end against the SHA-256 the seeder recorded in
the torrent.  Read from the staged files after the download, that is one more pass over the
whole deploy, and the last step before placing it: 0.1-0.3 s of a 7 s deploy of 64 MiB to
8 hosts on the benchmark's 2 cores (every peer finishing at once), about 0.5 s per GiB on a
host of its own.  So the peer feeds each piece to its file's hasher as soon as libtorrent
has it (hashed against the torrent and accepted) and every piece before it is fed: the
piece is read back through libtorrent (read_piece: the bytes as stored, from its cache or
the file), a few pieces ahead, and hashed in a worker thread, in file order.  At the end
(every piece in and written) the rest is read from the staged files, from the first piece
not fed yet on: piece by piece through libtorrent, the last pieces in (rarest first leaves
some early pieces to the end: 70-95 of 256 pieces were left) took 0.2-0.3 s of a 6.5 s
deploy (bench/, N=8); read straight from the files, a few milliseconds.  A read error, or
pieces that do not map onto the torrent's files, and the peer hashes the staged files
instead, as it did before.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from concurrent.futures import Executor
from typing import Callable

READ_AHEAD_BYTES = 2 << 20  # read back ahead of the hashing (at least one piece): memory


class Digest:
    """The running SHA-256 of one deploy's files (torrent.TorrentFile paths).

    pump() asks libtorrent for the next pieces it has (on each piece_finished_alert, and
    after each feed); read(piece, data, error) takes each read_piece_alert; the hashing runs
    in pool, one piece after the other.  have(piece) says whether libtorrent has a piece:
    the peer keeps that from its alerts (PeerDeploy.had), as asking the handle
    (have_piece) waits on libtorrent's network thread, 7-40 ms each on a busy host.
    """

    def __init__(self, handle, info, paths: list[str], pool: Executor, have: Callable[[int], bool]):
        self.handle = handle  # libtorrent torrent_handle
        self.have = have
        self.info = info  # its torrent_info
        self.files = info.files()
        self.total = info.num_pieces()
        self.hashers = {path: hashlib.sha256() for path in paths}
        self.pool = pool
        self.next = 0  # the first piece not taken for hashing yet
        self.fed = 0  # pieces hashed (0 .. fed - 1)
        self.asked: set[int] = set()  # read_piece asked, no answer yet
        self.got: dict[int, bytes] = {}  # read, waiting for the pieces before it
        self.ahead = max(1, READ_AHEAD_BYTES // max(1, info.piece_length()))
        self.failed = ""  # why it gave up (the staged files are hashed instead)
        self.feeding: asyncio.Task | None = None
        self.progress = asyncio.Event()  # set when a piece is read or fed, or it fails

    def pump(self, finished: int | None = None) -> None:
        """Ask libtorrent for the pieces it has from the next one to feed on (a few).

        finished: the piece that just came in (a piece_finished_alert); one past the few
        to read next changes nothing: most pieces come out of order.
        """
        handle = self.handle
        if finished is not None and not self.next <= finished < self.next + self.ahead:
            return
        if self.failed or not handle.is_valid():
            return
        for piece in range(self.next, min(self.total, self.next + self.ahead)):
            if piece in self.asked or piece in self.got:
                continue
            if not self.have(piece):
                return
            handle.read_piece(piece)
            self.asked.add(piece)

    def read(self, piece: int, data: bytes, error: str = "") -> None:
        """libtorrent's answer to read_piece (a read_piece_alert)."""
        if piece not in self.asked or piece < self.next:
            return  # not ours (someone else asked), or from before a failure
        self.asked.discard(piece)
        if error:
            self.fail(f"piece {piece}: {error}")
            return
        self.got[piece] = data
        self.progress.set()
        if self.next in self.got and (self.feeding is None or self.feeding.done()):
            self.feeding = asyncio.get_running_loop().create_task(self._feed())

    def fail(self, why: str) -> None:
        if not self.failed:
            self.failed = why
            self.got.clear()
            self.asked.clear()
        self.progress.set()

    async def _feed(self) -> None:
        loop = asyncio.get_running_loop()
        while self.next in self.got and not self.failed:
            first, run = self.next, []
            while first + len(run) in self.got:
                run.append(self.got.pop(first + len(run)))
            self.next = first + len(run)  # taken: pump() asks from here on
            self.pump()
            try:
                await loop.run_in_executor(self.pool, self._update, first, run)
            except Exception as exc:  # a piece that does not map onto the files
                self.fail(f"piece {first}: {exc!r}")
                return
            self.fed = self.next
            self.progress.set()

    def _update(self, first: int, run: list[bytes]) -> None:
        """Hash pieces first, first + 1 ... (in a worker thread)."""
        for piece, data in enumerate(run, first):
            if len(data) != self.info.piece_size(piece):
                raise ValueError(f"{len(data)} bytes read, not {self.info.piece_size(piece)}")
            view, at = memoryview(data), 0
            for part in self.info.map_block(piece, 0, len(data)):
                if not self.files.file_flags(part.file_index) & self.files.flag_pad_file:
                    path = self.files.file_path(part.file_index)
                    self.hashers[path].update(view[at : at + part.size])
                at += part.size

    async def finish(self, stall: float, root: str) -> dict[str, str] | None:
        """Hash what is left (every piece is in, and written to the files under root):
        {path: sha256 hex}, or None if it failed (or a feed under way took stall seconds)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + stall
        # A feed under way ends first (and one a read answer starts meanwhile, in turn).
        while self.feeding is not None and not self.feeding.done() and not self.failed:
            try:
                await asyncio.wait_for(asyncio.shield(self.feeding), deadline - loop.time())
            except asyncio.TimeoutError:
                self.fail(f"hashing the pieces read back took over {stall:g} s")
            except asyncio.CancelledError:
                if self.feeding.cancelled():
                    break  # close(): failed already
                raise
        if self.failed:
            return None
        first = self.next
        handle = self.handle
        pieces = handle.status(handle.query_pieces).pieces  # one call, not one per piece
        if len(pieces) != self.total:
            pieces = [handle.have_piece(p) for p in range(self.total)]
        lacking = next((p for p in range(first, self.total) if not pieces[p]), None)
        if lacking is not None:
            self.fail(f"piece {lacking} is not in")
            return None
        self.next = self.total  # read answers still to come are dropped (read())
        self.got.clear()
        self.asked.clear()
        try:
            await loop.run_in_executor(self.pool, self._rest, first, root)
        except (OSError, ValueError) as exc:
            self.fail(f"reading the staged files from piece {first}: {exc}")
            return None
        self.fed = self.total
        return {path: h.hexdigest() for path, h in self.hashers.items()}

    def _rest(self, first: int, root: str) -> None:
        """Hash the files under root from piece first on (in a worker thread)."""
        if first >= self.total:
            return
        start = self.info.map_block(first, 0, 1)[0]
        files = self.files
        for index in range(start.file_index, files.num_files()):
            if files.file_flags(index) & files.flag_pad_file:
                continue
            path = files.file_path(index)
            offset = start.offset if index == start.file_index else 0
            left = files.file_size(index) - offset
            with open(os.path.join(root, path), "rb") as f:
                f.seek(offset)
                while left > 0:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        raise ValueError(f"{path} is shorter than the torrent says")
                    self.hashers[path].update(chunk)
                    left -= len(chunk)

    def close(self) -> None:
        """The deploy is gone or restarted: stop (a feed under way ends by itself)."""
        self.fail("closed")
        if self.feeding is not None:
            self.feeding.cancel()

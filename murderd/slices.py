"""Seeder slices: each following peer takes its own share of a new deploy from the seeder.

Left to libtorrent, peers ask the seeder for the same pieces: a piece in flight from the
seeder is invisible to the others, and libtorrent spreads a piece's blocks over every
connection that has it, the seeder's included.  The seeder then uploads the file 1.7 times
over, and a deploy takes that much longer than its link allows (bench/, README).

So the seeder, when it publishes a deploy, deals the pieces out among the peers following its
index.json at that moment: peer i of n gets the pieces p with p % n == i (its slice).  A
peer ("the gate", every GATE_EVERY seconds) asks for its slice first and, outside it, only
for pieces another peer already has: a piece only a seed has (availability 1) is left to its
slice's owner.  What a peer gets from the seeder is then its slice, and the rest comes from
the other peers.

The last pieces of a slice whose owner lags (its download link is shared by the seeder's
flow and every other peer's, so the seeder's share can fall below 1/n) are taken by the
peers that are done with their own slices: RELEASE_SECONDS after its own slice is complete
a peer no longer holds pieces back (bench, N=8, medians of 3 runs, interleaved: never
released 8.9 and 8.9 s, 0.5 s 8.2 and 8.2 s; 1.5 s 8.3 and 8.7 s against 0.5 s 7.9 and
8.2 s; released by a drop in the download rate instead 8.4 and 8.4 s against 8.1 and
8.0 s).  Nothing waits on a slice owner that is gone: when no payload arrived for
STALL_SECONDS the peer drops the gate and asks for every piece from anyone, as without
slices.  A peer with no slice (it was not following when the deploy was published, the
seeder is not a murder-seeder, or a restart lost the assignment) never gates.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

GATE_EVERY = 0.1  # seconds between gate updates of a downloading deploy
STALL_SECONDS = 2.0  # no payload for this long: stop gating
RELEASE_SECONDS = 0.5  # own slice complete this long: take held pieces from the seeder too
# Above this many slices, no release: stealers would be many, each asking the seeder for
# the same held pieces (measured up to 16; a peer with an empty slice never releases).
RELEASE_MAX_SLICES = 64
RECENT_SECONDS = 10.0  # a follower answered this recently still counts as following
MAX_FOLLOWERS = 100_000  # distinct follower ids remembered (the rest get no slice)
MAX_SLICES = 1_000_000
OWN = 7  # piece priorities: own slice first; others when another peer has them
OTHERS = 1
HELD = 0  # only a seed has it, and it is another peer's slice: wait for that peer
_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def follower_id(raw: str | None) -> str | None:
    """A follower's ?peer= value, if it is one (anything else: no slice, still answered)."""
    return raw if raw is not None and _ID.fullmatch(raw) else None


def parse_slice(raw) -> tuple[int, int] | None:
    """[index, count] from an index.json item, or None for anything else."""
    if not isinstance(raw, list) or len(raw) != 2:
        return None
    index, count = raw
    if type(index) is not int or type(count) is not int:
        return None
    if not 2 <= count <= MAX_SLICES or not 0 <= index < count:
        return None
    return index, count


class Followers:
    """Who follows the seeder's index.json now: a long poll open, or answered just now."""

    def __init__(self):
        self.waiting: dict[str, int] = {}  # id -> open requests
        self.recent: dict[str, float] = {}  # id -> when last answered (monotonic)

    def enter(self, follower: str) -> None:
        if follower not in self.waiting and len(self.waiting) >= MAX_FOLLOWERS:
            return
        self.waiting[follower] = self.waiting.get(follower, 0) + 1

    def leave(self, follower: str, now: float) -> None:
        count = self.waiting.get(follower, 0) - 1
        if count > 0:
            self.waiting[follower] = count
        else:
            self.waiting.pop(follower, None)
        if len(self.recent) >= MAX_FOLLOWERS:
            self.recent = {f: t for f, t in self.recent.items() if now - t < RECENT_SECONDS}
        if len(self.recent) < MAX_FOLLOWERS:
            self.recent[follower] = now

    def live(self, now: float) -> list[str]:
        recent = [f for f, t in self.recent.items() if now - t < RECENT_SECONDS]
        return sorted(set(self.waiting).union(recent))

    def assign(self, now: float) -> dict[str, int]:
        """Slice numbers for a deploy published now: {follower: index}; {} below 2 followers."""
        live = self.live(now)
        return {f: i for i, f in enumerate(live)} if len(live) >= 2 else {}


def priorities(availability: list[int], index: int, count: int) -> list[int]:
    """Piece priorities for slice index of count, given each piece's availability."""
    return [
        OWN if p % count == index else (OTHERS if seen >= 2 else HELD)
        for p, seen in enumerate(availability)
    ]


class Gate:
    """One deploy's gate on a peer: update() every GATE_EVERY s while it downloads."""

    def __init__(self, index: int, count: int, now: float):
        self.index = index
        self.count = count
        self.payload = -1
        self.progress_at = now
        self.last: list[int] = []
        self.missing: list[int] | None = None  # own pieces not had yet
        self.own_done_at: float | None = None
        self.may_release = False
        self.ended = ""  # why the gate is off: "stalled" or "released"

    def pause(self, now: float) -> None:
        """Not downloading now (stalled, checking): the stall clock starts over later."""
        self.progress_at = now

    def update(self, handle, payload: int, now: float) -> bool:
        """Set the priorities; False when the gate is off (self.ended says why)."""
        if payload != self.payload:
            self.payload = payload
            self.progress_at = now
        availability = handle.piece_availability()
        if not availability:  # not ready yet (checking its files)
            return True
        if self.missing is None:
            self.missing = list(range(self.index, len(availability), self.count))
            self.may_release = bool(self.missing) and self.count <= RELEASE_MAX_SLICES
        if self.missing:
            self.missing = [p for p in self.missing if not handle.have_piece(p)]
            if not self.missing:
                self.own_done_at = now
        if now - self.progress_at >= STALL_SECONDS:
            self.ended = "stalled"
        elif (
            self.may_release
            and self.own_done_at is not None
            and now - self.own_done_at >= RELEASE_SECONDS
        ):
            self.ended = "released"
        if self.ended:
            handle.prioritize_pieces([4] * len(availability))  # libtorrent's default
            return False
        wanted = priorities(availability, self.index, self.count)
        if wanted != self.last:
            handle.prioritize_pieces(wanted)
            self.last = wanted
        return True

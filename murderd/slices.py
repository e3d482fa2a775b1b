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

The seeder's upload is not shared evenly between the owners (an owner's download link
carries the seeder's flow and every other peer's, so the seeder's share of it can fall well
below 1/n): some slices are in after 3 s, others after 8.  So the seeder rebalances
(Dealer): every REBALANCE_EVERY s it reads which pieces some peer has (the peers'
bitfields), and a follower about to run out of pieces nobody has (HUNGRY_SECONDS) gets the
back half of what is left of the slowest slice.  The change reaches both followers through
their index.json long polls ("slice_add", "slice_drop"); each piece keeps one owner, and the
owner asks for the back half of its slice last (OWN_BACK), so what moves is mostly not asked
for yet.  bench/ N=8, medians of 3: 8.27 and 8.43 s without; 7.66 with; 7.18 and 7.21 with
request_queue_time 0 as well (7.84 and 7.55 with 1, interleaved; 0 since reverted, lt.py).  The
seeder's upload went from 1.40 to about 1.2 x F.

A follower that takes its slice over HTTP (piecehttp.py) asks the seeder for its next
piece instead (Dealer.take): the first piece nobody has yet, whoever's slice it was, so that
the pieces leave the seeder in file order and the slices end together.

The last pieces are taken by the peers that are done with their own slices (and got
nothing more): RELEASE_SECONDS after its own slice is complete a peer no longer holds
pieces back (bench, N=8, medians of 3 runs, interleaved: never
released 8.9 and 8.9 s, 0.5 s 8.2 and 8.2 s; 1.5 s 8.3 and 8.7 s against 0.5 s 7.9 and
8.2 s; released by a drop in the download rate instead 8.4 and 8.4 s against 8.1 and
8.0 s).  Once every piece has left the seeder (Dealer.done) every follower hears it
(Part.out, "out" in index.json) and drops its gate at once: the seeder's link has nothing
else to carry, so the last pieces may come from it too.  Nothing waits on a slice owner
that is gone: when no payload arrived for
STALL_SECONDS the peer drops the gate and asks for every piece from anyone, as without
slices.  A peer with no slice (it was not following when the deploy was published, the
seeder is not a murder-seeder, or a restart lost the assignment) never gates.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import re
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

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
MAX_MOVED = 1_000_000  # pieces in one slice_add or slice_drop list
REBALANCE_EVERY = 0.2  # seconds between the seeder's looks at who has which piece
REBALANCE_COST = 10  # ...and at least this many times as long as the last look took
REBALANCE_FOR = 600.0  # seconds after publication the seeder stops looking (peers gone)
# Above this many slices the seeder does not rebalance (each look reads every peer's bitfield).
REBALANCE_MAX_SLICES = RELEASE_MAX_SLICES
STEAL_MAX_SLICES = 256  # ...nor lets a follower take from others' slices (a scan of them all)
# A follower is hungry when its pieces nobody has yet would take less than this at its recent
# rate: most are then asked of the seeder already (a peer's queue to the seeder holds whole
# pieces), and once all are, libtorrent fills that queue with pieces other peers have, which
# the seeder then sends a second time.  bench/ N=8, medians of 3: moving only when nothing
# was left 8.32 s; 1.5 s 7.26, 2 s 7.37, 3 s 7.34 (with request_queue_time 0).
HUNGRY_SECONDS = 2.0
RATE_WEIGHT = 0.5  # weight of the latest look in a follower's smoothed rate (pieces/s)
OWN = 7  # piece priorities: own slice first (its front half; the back half OWN_BACK), others
OWN_BACK = 6  # when another peer has them.  The back half is what the seeder moves away.
OTHERS = 1
HELD = 0  # only a seed has it, and it is another peer's slice: wait for that peer
_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def follower_id(raw: str | None) -> str | None:
    """A follower's ?peer= value, if it is one (anything else: no slice, still answered)."""
    return raw if raw is not None and _ID.fullmatch(raw) else None


class Part(NamedTuple):
    """A peer's slice of a deploy: pieces p % count == index, plus added, minus dropped.

    out: every piece has left the seeder once (index.json's "out"): its link is free for
    the tail, and the peers take any piece from anyone, the seeder included.
    """

    index: int
    count: int
    added: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()
    out: bool = False

    def pieces(self, total: int) -> set[int]:
        own = set(range(self.index, total, self.count)).union(self.added)
        return {p for p in own.difference(self.dropped) if 0 <= p < total}


def _piece_list(raw) -> tuple[int, ...] | None:
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_MOVED:
        return None
    if not all(type(p) is int and p >= 0 for p in raw):
        return None
    return tuple(raw)


def parse_slice(item: dict) -> Part | None:
    """The Part in an index.json item ("slice": [index, count], "slice_add", "slice_drop")."""
    raw = item.get("slice")
    if not isinstance(raw, list) or len(raw) != 2:
        return None
    index, count = raw
    if type(index) is not int or type(count) is not int:
        return None
    if not 2 <= count <= MAX_SLICES or not 0 <= index < count:
        return None
    added, dropped = _piece_list(item.get("slice_add")), _piece_list(item.get("slice_drop"))
    if added is None or dropped is None:
        return None
    return Part(index, count, added, dropped, item.get("out") is True)


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


class Dealer:
    """The seeder's side of one deploy's slices: which follower owns which piece now.

    Piece p starts with follower p % count.  rebalance() looks at which pieces some peer
    already has: a follower about to run out of its pieces nobody has (HUNGRY_SECONDS) takes
    the back half of what is left of the slowest slice.  Each piece then still
    has exactly one owner asking the seeder for it, and the seeder's upload goes to pieces
    nobody has, while the owners' TCP shares of it differ (bench/, README).
    """

    def __init__(
        self,
        members: dict[str, int],
        total: int,
        now: float = 0.0,
        on_out: Callable[[], None] | None = None,
    ):
        self.members = members  # follower id -> its index
        self.on_out = on_out  # called once, when every piece is out
        self.dealt_at = now
        self.count = len(members)
        self.owner = [p % self.count for p in range(total)] if self.count else []
        self.total = total
        self.pending = list(range(total))  # the pieces no peer has (yet), in order
        self.is_pending = bytearray(b"\x01") * total
        # Each follower's pieces in the order take() hands them out; entries that moved or
        # went out meanwhile are skipped when they come up.
        self.queues = [deque(range(i, total, self.count)) for i in range(self.count)]
        self.takers: set[int] = set()  # followers that take their pieces (take())
        self.steals = 0
        self.versions = [0] * self.count  # bumped when a follower's part changes
        self.moves = 0
        self.before: list[int] | None = None  # each follower's remaining at the last look
        self.looked = 0.0
        self.rates = [0.0] * self.count  # pieces/s out of each follower's remaining

    @property
    def left(self) -> int:
        return len(self.pending)

    @property
    def done(self) -> bool:
        return not self.pending

    def part(self, follower: str) -> Part | None:
        index = self.members.get(follower)
        if index is None:
            return None
        added = [p for p, o in enumerate(self.owner) if o == index and p % self.count != index]
        dropped = [p for p in range(index, len(self.owner), self.count) if self.owner[p] != index]
        return Part(index, self.count, tuple(added), tuple(dropped), self.done)

    def version(self, follower: str) -> int:
        index = self.members.get(follower)
        return 0 if index is None else self.versions[index]

    def saw(self, bitfield) -> None:
        """A peer's bitfield (a list of bools, as libtorrent's peer_info.pieces)."""
        if len(bitfield) != self.total or not self.pending:
            return
        if any(bitfield[p] for p in self.pending):
            for p in self.pending:
                if bitfield[p]:
                    self.is_pending[p] = 0
            self.pending = [p for p in self.pending if not bitfield[p]]
            self._out()

    def sent(self, piece: int) -> None:
        """The seeder served piece over HTTP (piecehttp.py): it is out."""
        at = bisect.bisect_left(self.pending, piece)
        if at < len(self.pending) and self.pending[at] == piece:
            del self.pending[at]
            self.is_pending[piece] = 0
            self._out()

    def take(self, follower: str) -> int | None:
        """The next piece for follower to fetch over HTTP (it is out from now on), or None.

        The first piece nobody has yet of any follower that takes its pieces too: whoever
        asks first gets it, so the pieces leave the seeder in file order and a follower
        that fetches faster gets more of them (bench/, session 8, N=16: 8.94 s against
        9.17 with each follower's own pieces first).  A follower that has not asked yet
        keeps its slice (it may be on BitTorrent only).  When no such piece is near the
        front, its own pieces, then the last piece of the slice with the most left (a
        steal: the follower that finishes first keeps the seeder's link busy, and the
        slices end together).  A follower that never takes hears of a steal through its
        part's version; a taker needs not.
        """
        index = self.members.get(follower)
        if index is None or not self.pending:
            return None
        self.takers.add(index)
        # Among any count pieces in a row one was this follower's, unless moved: a short look.
        for p in itertools.islice(self.pending, 2 * self.count + 2):
            if self.owner[p] in self.takers:
                self.owner[p] = index
                self.sent(p)
                return p
        queue = self.queues[index]
        while queue:
            p = queue.popleft()
            if self.is_pending[p] and self.owner[p] == index:
                self.sent(p)
                return p
        if self.count > STEAL_MAX_SLICES:
            return None
        for _ in range(self.count):
            victim = max(range(self.count), key=lambda i: len(self.queues[i]))
            queue = self.queues[victim]
            while queue:
                p = queue.pop()
                if self.is_pending[p] and self.owner[p] == victim:
                    self.owner[p] = index
                    self.steals += 1
                    if victim not in self.takers:
                        self.versions[victim] += 1
                    self.sent(p)
                    return p
        return None

    def _out(self) -> None:
        """A piece went out.  The last: every follower's part changes (Part.out), so each
        hears, and on_out is called (pending never fills again, so this happens once)."""
        if not self.pending:
            self.versions = [v + 1 for v in self.versions]
            if self.on_out is not None:
                self.on_out()

    def rebalance(self, now: float) -> set[int]:
        """Give hungry followers the back half of the slowest slice's remainder.

        Hungry: nothing left, or less than HUNGRY_SECONDS of it at the follower's rate.
        Slowest: the most seconds left at its rate.  Returns the indexes whose parts changed.
        """
        remaining: list[list[int]] = [[] for _ in range(self.count)]
        for p in self.pending:
            remaining[self.owner[p]].append(p)
        if self.before is not None and now > self.looked:
            for i, r in enumerate(remaining):
                rate = max(0, self.before[i] - len(r)) / (now - self.looked)
                self.rates[i] += RATE_WEIGHT * (rate - self.rates[i])
        self.looked = now

        def seconds(i: int) -> float:
            return len(remaining[i]) / max(self.rates[i], 1e-3)

        changed: set[int] = set()
        for hungry in [i for i in range(self.count) if seconds(i) < HUNGRY_SECONDS]:
            slowest = max(range(self.count), key=seconds)
            left = remaining[slowest]
            if len(left) < 2 or seconds(slowest) < seconds(hungry) + HUNGRY_SECONDS:
                break
            moving = left[len(left) - len(left) // 2 :]
            remaining[slowest] = left[: len(left) - len(left) // 2]
            remaining[hungry] += moving
            for p in moving:
                self.owner[p] = hungry
            self.queues[hungry].extend(moving)
            self.moves += 1
            changed.update((hungry, slowest))
        for i in changed:
            self.versions[i] += 1
        self.before = [len(r) for r in remaining]
        return changed


def priorities(
    availability: list[int], own: set[int], missing: list[int], seeds: int = 1
) -> list[int]:
    """Piece priorities for a peer owning the pieces own, given each piece's availability.

    missing: the own pieces it does not have, in order; the back half of them gets OWN_BACK,
    so that the pieces the seeder moves to another peer are the ones not asked for yet.
    seeds: how many of the connected peers are seeds with every piece (the seeder; 0 while
    the slice comes over HTTP and the seeder is kept away): a piece only they have is HELD.
    """
    back = set(missing[len(missing) - len(missing) // 2 :])
    return [
        (OWN_BACK if p in back else OWN) if p in own else (OTHERS if seen > seeds else HELD)
        for p, seen in enumerate(availability)
    ]


class Gate:
    """One deploy's gate on a peer: update() every GATE_EVERY s while it downloads."""

    def __init__(self, part: Part, now: float):
        self.part = part
        self.own: set[int] | None = None  # the pieces of part, once the piece count is known
        self.total = 0
        self.payload = -1
        self.progress_at = now
        self.last: list[int] = []
        self.missing: list[int] | None = None  # own pieces not had yet
        self.own_done_at: float | None = None
        self.may_release = False
        self.ended = ""  # why the gate is off: "stalled" or "released"
        self.fetch = None  # the slice over HTTP (piecehttp.Fetch), when it comes that way

    def first(self, total: int) -> list[int]:
        """Priorities to add the torrent with: libtorrent asks for pieces before update()
        can run (the torrent is not ready yet), and would ask the seeder for any of them."""
        return priorities([0] * total, self.part.pieces(total), [])

    def reslice(self, part: Part) -> None:
        """The seeder moved pieces to or from this peer (Dealer.rebalance)."""
        self.part = part
        if self.own is not None:
            self._own()

    def _own(self) -> None:
        self.own = self.part.pieces(self.total)
        self.missing = sorted(self.own)  # update() drops the ones it has
        self.own_done_at = None
        # Over HTTP the seeder is away: nothing to take from it over BitTorrent.
        self.may_release = (
            bool(self.own) and self.part.count <= RELEASE_MAX_SLICES and self.fetch is None
        )

    def fetching(self, fetch) -> None:
        """The slice comes over HTTP from now on (piecehttp.Fetch), the seeder kept away."""
        self.fetch = fetch
        self.may_release = False

    def pause(self, now: float) -> None:
        """Not downloading now (stalled, checking): the stall clock starts over later."""
        self.progress_at = now

    def update(self, handle, payload: int, now: float, pieces=None, availability=None) -> bool:
        """Set the priorities; False when the gate is off (self.ended says why).

        pieces: which pieces the peer has (a sequence of truth values, PeerDeploy.had), and
        availability: libtorrent's piece_availability(), when the caller has them; asked
        of the handle otherwise (each call waits on libtorrent's network thread).
        """
        if payload != self.payload:
            self.payload = payload
            self.progress_at = now
        if availability is None:
            availability = handle.piece_availability()
        if not availability:  # not ready yet (checking its files)
            return True
        if self.own is None:
            self.total = len(availability)
            self._own()
        if self.missing:
            if pieces is not None and len(pieces) == self.total:
                self.missing = [p for p in self.missing if not pieces[p]]
            else:
                self.missing = [p for p in self.missing if not handle.have_piece(p)]
        if not self.missing and self.own_done_at is None:
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
        wanted = priorities(availability, self.own, self.missing, 0 if self.fetch else 1)
        if wanted != self.last:
            handle.prioritize_pieces(wanted)
            self.last = wanted
        return True

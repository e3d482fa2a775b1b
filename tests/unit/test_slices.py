"""slices.py's pure parts: who counts as following, how slices are dealt, the priorities."""

from __future__ import annotations

import os

import pytest

from murderd import slices
from murderd.localfleet import wait_for


def test_followers_waiting_and_recent():
    followers = slices.Followers()
    followers.enter("b")
    followers.enter("a")
    followers.enter("a")  # two open requests from one follower count once
    assert followers.live(100.0) == ["a", "b"]
    followers.leave("a", 100.0)
    assert followers.live(100.0) == ["a", "b"]  # still one open request
    followers.leave("a", 101.0)
    followers.leave("b", 102.0)
    # Answered recently: still following (it is between two long polls).
    assert followers.live(105.0) == ["a", "b"]
    assert followers.live(101.0 + slices.RECENT_SECONDS + 0.5) == ["b"]
    assert followers.live(102.0 + slices.RECENT_SECONDS + 0.5) == []


def test_assign_deals_one_slice_each_and_none_to_a_lone_follower():
    followers = slices.Followers()
    followers.enter("x")
    assert followers.assign(1.0) == {}  # one follower: nothing to share
    for name in ("c", "a"):
        followers.enter(name)
    dealt = followers.assign(1.0)
    assert sorted(dealt.values()) == [0, 1, 2]
    assert set(dealt) == {"a", "c", "x"}


@pytest.mark.parametrize(
    "raw, want",
    [
        ([0, 2], (0, 2)),
        ([7, 8], (7, 8)),
        ({"slice": [1, 3], "slice_add": [5, 8], "slice_drop": [4]}, (1, 3, (5, 8), (4,))),
        ({"slice": [1, 3], "out": True}, (1, 3, True)),
        ({"slice": [1, 3], "out": 1}, (1, 3)),  # out only when it says true
        ({"slice": [1, 3], "slice_add": [-1]}, None),
        ({"slice": [1, 3], "slice_add": ["5"]}, None),
        ({"slice": [1, 3], "slice_drop": 4}, None),
        ({"slice": [1, 3], "slice_add": [True]}, None),
        ([2, 2], None),
        ([-1, 4], None),
        ([0, 1], None),
        ([0, slices.MAX_SLICES + 1], None),
        ([True, 2], None),
        ([0.0, 2], None),
        ("0/2", None),
        ([0, 2, 3], None),
        (None, None),
    ],
)
def test_parse_slice(raw, want):
    item = raw if isinstance(raw, dict) else {"slice": raw}
    part = slices.parse_slice(item)
    assert (None if part is None else tuple(x for x in part if x != () and x is not False)) == want


def test_part_pieces_with_moves():
    part = slices.Part(1, 3, added=(0, 9, 99), dropped=(4,))
    assert part.pieces(10) == {0, 1, 7, 9}  # 99 is past the end: ignored


@pytest.mark.parametrize(
    "raw, ok",
    [("a1b2c3", True), ("host:6881", True), ("", False), ("a b", False), ("x" * 65, False)],
)
def test_follower_id(raw, ok):
    assert (slices.follower_id(raw) == raw) is ok


def test_priorities_own_slice_first_others_only_once_a_peer_has_them():
    # 8 pieces, slice 1 of 3 owns pieces 1, 4, 7, and misses all three: the back one of
    # them (what the seeder would move away) comes last.  Availability counts the seeder.
    availability = [1, 1, 2, 3, 1, 1, 0, 1]
    own = slices.Part(1, 3).pieces(8)
    assert slices.priorities(availability, own, [1, 4, 7]) == [
        slices.HELD,
        slices.OWN,
        slices.OTHERS,
        slices.OTHERS,
        slices.OWN,
        slices.HELD,
        slices.HELD,
        slices.OWN_BACK,
    ]


def _dealer(followers: int, pieces: int) -> slices.Dealer:
    return slices.Dealer({f"f{i}": i for i in range(followers)}, pieces)


def _had(dealer: slices.Dealer, pieces) -> None:
    bits = [False] * dealer.total
    for p in pieces:
        bits[p] = True
    dealer.saw(bits)


def test_dealer_moves_the_back_half_of_the_slowest_slice_to_a_hungry_follower():
    dealer = _dealer(4, 40)  # slice i: pieces i, i+4, ... (10 each)
    assert dealer.rebalance(0.0) == set()  # nobody has anything: nobody is hungry...
    # ...once rates are known.  In 1 s: slice 0 got all 10 pieces out, slice 1 two,
    # slices 2 and 3 five each.
    _had(dealer, [p for p in range(40) if p % 4 == 0] + [1, 5] + [2, 6, 10, 14, 18])
    _had(dealer, [3, 7, 11, 15, 19])
    changed = dealer.rebalance(1.0)
    assert changed == {0, 1}  # slice 1 has the most seconds left (8 pieces at 2/s)
    left_of_1 = [9, 13, 17, 21, 25, 29, 33, 37]
    assert dealer.part("f0").added == tuple(left_of_1[4:])
    assert dealer.part("f1").dropped == tuple(left_of_1[4:])
    assert dealer.part("f1").pieces(40) == {1, 5, 9, 13, 17, 21}
    assert dealer.version("f0") == dealer.version("f1") == 1
    assert dealer.version("f2") == 0 and dealer.part("nobody") is None
    assert dealer.moves == 1 and not dealer.done


def test_dealer_leaves_slices_that_will_be_done_soon_alone_and_ends_when_all_is_out():
    dealer = _dealer(2, 8)
    dealer.rebalance(0.0)
    _had(dealer, [0, 2, 4, 6, 1])  # slice 0 all out; slice 1 at 1 piece/s, 3 left: 3 s
    assert dealer.rebalance(1.0) == {0, 1}
    _had(dealer, [3, 5])
    assert dealer.rebalance(2.0) == set()  # one piece left: nothing to split
    _had(dealer, [7])
    assert dealer.done and dealer.left == 0


def test_take_deals_the_first_piece_nobody_has_to_whichever_taker_asks():
    dealer = _dealer(3, 12)  # slices: 0 3 6 9 | 1 4 7 10 | 2 5 8 11
    assert dealer.take("f0") == 0 and dealer.take("f1") == 1
    # 2 is f2's, which has not asked yet (it may be on BitTorrent only): it keeps it.
    assert dealer.take("f0") == 3
    assert dealer.take("f2") == 2
    # Now every follower takes: the next piece goes to whoever asks, whoever's slice it was.
    assert [dealer.take("f1") for _ in range(3)] == [4, 5, 6]
    assert dealer.owner[5] == dealer.owner[6] == 1
    assert dealer.steals == 0 and all(dealer.version(f) == 0 for f in ("f0", "f1", "f2"))
    assert [dealer.take("f0") for _ in range(5)] == [7, 8, 9, 10, 11]
    assert dealer.done and dealer.left == 0
    assert dealer.take("f0") is None and dealer.take("f2") is None


def test_take_steals_from_the_back_of_the_biggest_slice_of_a_follower_that_never_takes():
    dealer = _dealer(3, 12)  # slices: 0 3 6 9 | 1 4 7 10 | 2 5 8 11
    assert [dealer.take("f0") for _ in range(4)] == [0, 3, 6, 9]
    # f1 and f2 never ask: f0's own are out, so it takes from the back of the slice with
    # the most left (4 each: the first, f1's), then of f2's, which has the most now.
    assert [dealer.take("f0"), dealer.take("f0")] == [10, 11]
    assert dealer.steals == 2 and dealer.owner[11] == dealer.owner[10] == 0
    assert dealer.version("f1") == dealer.version("f2") == 1


def test_the_dealer_says_once_when_every_piece_is_out_whichever_way_they_went():
    outs = []
    dealer = slices.Dealer({"f0": 0, "f1": 1}, 6, on_out=lambda: outs.append(dealer.left))
    _had(dealer, [0, 1])  # seen in a peer's bitfield
    dealer.sent(3)  # served by index
    assert dealer.take("f0") == 2 and dealer.take("f1") == 4
    assert outs == [] and not dealer.done
    assert dealer.take("f0") == 5  # the last one: out, once
    assert outs == [0] and dealer.done
    dealer.sent(4)
    _had(dealer, range(6))
    assert dealer.take("f1") is None
    assert outs == [0]


def test_take_counts_out_what_a_peer_has_and_skips_moved_pieces():
    dealer = _dealer(2, 8)  # 0 2 4 6 | 1 3 5 7
    _had(dealer, [0, 2])  # another peer has them (BitTorrent): not dealt again
    assert dealer.take("f0") == 4
    dealer.sent(6)  # served by index (an older peer)
    assert dealer.take("nobody") is None  # not following: deals nothing
    assert dealer.take("f0") == 7  # f0's own are out: the back of f1's slice
    assert dealer.owner[7] == 0
    assert [dealer.take("f1") for _ in range(4)] == [1, 3, 5, None]
    assert dealer.done


def test_a_steal_from_a_follower_that_does_not_take_bumps_its_version():
    """A follower on BitTorrent only (no take()) must hear that a piece left its slice; one
    that takes its pieces needs no news (the seeder hands it what it owns)."""
    dealer = _dealer(3, 9)  # 0 3 6 | 1 4 7 | 2 5 8
    assert [dealer.take("f0") for _ in range(3)] == [0, 3, 6]
    assert dealer.take("f1") == 1  # f1 takes; f2 never does
    before = [dealer.version(f) for f in ("f0", "f1", "f2")]
    assert [dealer.take("f0"), dealer.take("f0")] == [4, 7]  # a taker's: no news
    assert [dealer.version(f) for f in ("f0", "f1", "f2")] == before
    assert dealer.take("f0") == 8  # only f2's are left: the back of its slice
    assert dealer.version("f2") == before[2] + 1
    assert dealer.part("f2").dropped == (8,) and dealer.part("f0").added == (4, 7, 8)
    assert [dealer.version(f) for f in ("f0", "f1")] == before[:2]


def test_take_gets_the_pieces_a_rebalance_moved_here():
    dealer = _dealer(2, 8)  # 0 2 4 6 | 1 3 5 7
    dealer.rebalance(0.0)
    _had(dealer, [0, 2, 4, 6, 1])  # slice 0 out; slice 1: 3 left at 1 piece/s
    assert dealer.rebalance(1.0) == {0, 1}
    moved = dealer.part("f0").added
    assert moved and set(moved) <= {3, 5, 7}
    assert [dealer.take("f0") for _ in moved] == list(moved)


def test_dealer_takes_a_ghosts_slice_apart():
    """A follower that never fetches anything: the others end up owning all of its slice."""
    dealer = _dealer(3, 30)
    now = 0.0
    dealer.rebalance(now)
    for _ in range(20):
        now += 1.0
        had = [p for p, o in enumerate(dealer.owner) if o != 2]
        _had(dealer, had)
        dealer.rebalance(now)
    assert sum(1 for o in dealer.owner if o == 2) <= 1
    assert dealer.version("f2") > 0


def _torrent_handle(tmp_path, pieces: int):
    """A real libtorrent session downloading a fresh torrent (no peers: availability 0)."""
    from murderd import torrent
    from murderd.lt import lt

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f.bin").write_bytes(os.urandom(pieces * 16384))
    made = torrent.make_torrent(tmp_path / "src" / "f.bin", [], piece_size=16384)
    session = lt.session({"listen_interfaces": "127.0.0.1:0", "enable_dht": False})
    params = lt.add_torrent_params()
    params.ti = torrent.parse(made.data).info
    params.save_path = str(tmp_path / "staging")
    return session, session.add_torrent(params)


def wait_ready(handle):
    wait_for(lambda: len(handle.piece_availability()) > 0, 10, what="the torrent to be ready")


def test_gate_holds_other_slices_then_lifts_on_a_stall(tmp_path):
    session, handle = _torrent_handle(tmp_path, 12)
    wait_ready(handle)
    gate = slices.Gate(slices.Part(1, 4), now=100.0)
    assert gate.update(handle, 0, 100.0)
    want = [slices.OWN if p in (1, 5) else slices.HELD for p in range(12)]
    want[9] = slices.OWN_BACK
    assert list(handle.get_piece_priorities()) == want
    assert gate.may_release
    # Data keeps arriving: still gating.
    assert gate.update(handle, 5000, 100.0 + slices.STALL_SECONDS)
    # None for STALL_SECONDS: the gate lifts, every piece back to libtorrent's default.
    assert not gate.update(handle, 5000, 100.1 + 2 * slices.STALL_SECONDS)
    assert gate.ended == "stalled"
    assert list(handle.get_piece_priorities()) == [4] * 12
    del session


def test_gate_takes_what_the_peer_has_from_the_pieces_it_is_given(tmp_path):
    """The peer passes libtorrent's status().pieces: the own pieces had drop out of the
    missing list from it (not asked of libtorrent one by one); without it, they are."""
    session, handle = _torrent_handle(tmp_path, 12)
    wait_ready(handle)
    gate = slices.Gate(slices.Part(1, 4), now=100.0)
    assert gate.update(handle, 0, 100.0, [False] * 12)
    assert gate.missing == [1, 5, 9]
    had = [p == 5 for p in range(12)]  # piece 5 in, as libtorrent's status says
    assert gate.update(handle, 0, 100.0, had)
    assert gate.missing == [1, 9]
    assert gate.update(handle, 0, 100.0, [True] * 3)  # not this torrent's: asked instead
    assert gate.missing == [1, 9]  # (libtorrent has none of them)
    del session


def test_an_empty_slice_takes_everything_from_peers(tmp_path):
    """More followers than pieces: slice 20 of 30 owns nothing, asks the seeder for nothing,
    and never releases (only a stall lifts its gate)."""
    session, handle = _torrent_handle(tmp_path, 12)
    wait_ready(handle)
    gate = slices.Gate(slices.Part(20, 30), now=0.0)
    assert gate.update(handle, 0, 0.0)
    assert list(handle.get_piece_priorities()) == [slices.HELD] * 12
    assert not gate.may_release
    assert gate.update(handle, 1, 1.0 + slices.RELEASE_SECONDS)
    del session


def test_gate_reslice_takes_moved_pieces(tmp_path):
    """The seeder moves pieces 5 and 9 away and gives piece 2: the gate asks for 1 and 2."""
    session, handle = _torrent_handle(tmp_path, 12)
    wait_ready(handle)
    gate = slices.Gate(slices.Part(1, 4), now=0.0)
    assert gate.update(handle, 0, 0.0)
    gate.reslice(slices.Part(1, 4, added=(2,), dropped=(5, 9)))
    assert gate.update(handle, 0, 0.1)
    want = [slices.HELD] * 12
    want[1], want[2] = slices.OWN, slices.OWN_BACK
    assert list(handle.get_piece_priorities()) == want
    assert gate.own == {1, 2} and gate.own_done_at is None
    del session


def test_gate_first_priorities_hold_everything_but_the_own_slice():
    """What the torrent is added with, before libtorrent can report availability."""
    gate = slices.Gate(slices.Part(0, 3, added=(1,)), now=0.0)
    assert gate.first(6) == [slices.OWN, slices.OWN, slices.HELD, slices.OWN] + [slices.HELD] * 2

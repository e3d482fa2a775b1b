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
    assert slices.parse_slice(raw) == want


@pytest.mark.parametrize(
    "raw, ok",
    [("a1b2c3", True), ("host:6881", True), ("", False), ("a b", False), ("x" * 65, False)],
)
def test_follower_id(raw, ok):
    assert (slices.follower_id(raw) == raw) is ok


def test_priorities_own_slice_first_others_only_once_a_peer_has_them():
    # 8 pieces, slice 1 of 3 owns pieces 1, 4, 7.  Availability counts the seeder.
    availability = [1, 1, 2, 3, 1, 1, 0, 1]
    assert slices.priorities(availability, 1, 3) == [
        slices.HELD,
        slices.OWN,
        slices.OTHERS,
        slices.OTHERS,
        slices.OWN,
        slices.HELD,
        slices.HELD,
        slices.OWN,
    ]


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
    gate = slices.Gate(1, 4, now=100.0)
    assert gate.update(handle, 0, 100.0)
    want = [slices.OWN if p % 4 == 1 else slices.HELD for p in range(12)]
    assert list(handle.get_piece_priorities()) == want
    assert gate.may_release
    # Data keeps arriving: still gating.
    assert gate.update(handle, 5000, 100.0 + slices.STALL_SECONDS)
    # None for STALL_SECONDS: the gate lifts, every piece back to libtorrent's default.
    assert not gate.update(handle, 5000, 100.1 + 2 * slices.STALL_SECONDS)
    assert gate.ended == "stalled"
    assert list(handle.get_piece_priorities()) == [4] * 12
    del session


def test_an_empty_slice_takes_everything_from_peers(tmp_path):
    """More followers than pieces: slice 20 of 30 owns nothing, asks the seeder for nothing,
    and never releases (only a stall lifts its gate)."""
    session, handle = _torrent_handle(tmp_path, 12)
    wait_ready(handle)
    gate = slices.Gate(20, 30, now=0.0)
    assert gate.update(handle, 0, 0.0)
    assert list(handle.get_piece_priorities()) == [slices.HELD] * 12
    assert not gate.may_release
    assert gate.update(handle, 1, 1.0 + slices.RELEASE_SECONDS)
    del session

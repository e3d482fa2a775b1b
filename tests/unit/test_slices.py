"""slices.py's pure parts: who counts as following, how slices are dealt, the priorities."""

from __future__ import annotations

import pytest

from murderd import slices


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

"""The tracker's registry: peer selection rules, expiry, eviction caps, the catalogue."""

from __future__ import annotations

import os
import random
from urllib.parse import parse_qsl, quote_from_bytes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from murderd.tracker import registry as reg
from murderd.tracker.http import Malformed, parse_query

HASH = bytes(range(20))
OTHER_HASH = bytes(range(1, 21))


def pid(n: int) -> bytes:
    return b"-TS0001-" + n.to_bytes(12, "big")


def make(**settings) -> reg.Registry:
    settings.setdefault("allowlist", False)
    settings.setdefault("peer_timeout", 30)
    return reg.Registry(**settings)


def announce(r, n, ip="10.0.0.1", port=None, left=100, event=reg.EVENT_NONE, now=0.0, h=HASH):
    deploy = r.deploy(h, now)
    peer = r.announce(deploy, pid(n), ip, port or 6000 + n, 0, 0, left, event, now)
    return deploy, peer


def test_allowlist_refuses_unknown_and_serves_known():
    r = reg.Registry(allowlist=True)
    assert r.deploy(HASH, 0.0) is None
    r.add_known(HASH, "app.tar", 1000, "/t/app.torrent")
    deploy = r.deploy(HASH, 0.0)
    assert deploy is not None and deploy.name == "app.tar" and deploy.size == 1000


def test_allowlist_off_creates_deploy_named_by_hex():
    r = make()
    deploy = r.deploy(HASH, 0.0)
    assert deploy.name == HASH.hex()
    assert deploy.size == 0


def test_never_returns_the_asker_and_numwant_caps():
    r = make()
    for n in range(10):
        announce(r, n)
    deploy, me = announce(r, 3)
    chosen = r.select(deploy, me, 50)
    assert me not in chosen
    assert len(chosen) == 9
    assert len(set(map(id, chosen))) == 9
    assert len(r.select(deploy, me, 4)) == 4
    assert r.select(deploy, me, 0) == []


def test_seed_gets_only_leechers_leecher_gets_everyone():
    r = make()
    for n in range(5):
        announce(r, n, left=0)  # seeds
    for n in range(5, 12):
        announce(r, n, left=10)  # leechers
    deploy, seed = announce(r, 0, left=0)
    chosen = r.select(deploy, seed, 50)
    assert chosen and all(p.left > 0 for p in chosen)
    assert len(chosen) == 7
    deploy, leecher = announce(r, 5, left=10)
    chosen = r.select(deploy, leecher, 50)
    assert len(chosen) == 11
    assert {p.left == 0 for p in chosen} == {True, False}


def test_same_subnet_first_then_others():
    r = make(subnet_prefix_v4=24)
    for n in range(3):
        announce(r, n, ip=f"10.1.1.{n + 10}")
    for n in range(3, 40):
        announce(r, n, ip=f"10.2.{n}.5")
    deploy, me = announce(r, 100, ip="10.1.1.99")
    for _ in range(20):
        chosen = r.select(deploy, me, 10)
        assert len(chosen) == 10
        assert {p.ip for p in chosen[:3]} == {"10.1.1.10", "10.1.1.11", "10.1.1.12"}
        assert all(p.ip.startswith("10.2.") for p in chosen[3:])


def test_large_subnet_is_sampled_not_exhausted():
    r = make(subnet_prefix_v4=8)
    for n in range(500):
        announce(r, n, ip=f"10.{n // 250}.{n % 250}.1")
    announce(r, 900, ip="11.0.0.1")
    deploy, me = announce(r, 1000, ip="10.9.9.9")
    seen = set()
    for _ in range(30):
        chosen = r.select(deploy, me, 50)
        assert len(chosen) == 50
        assert all(p.ip.startswith("10.") for p in chosen)
        seen.update(p.peer_id for p in chosen)
    assert len(seen) > 200  # different askers see different parts of the swarm


def test_ipv6_peers_have_18_byte_compact_entries():
    r = make()
    _, p4 = announce(r, 1, ip="192.0.2.7", port=6881)
    _, p6 = announce(r, 2, ip="2001:db8::1", port=6882)
    assert p4.compact == bytes([192, 0, 2, 7]) + (6881).to_bytes(2, "big") and not p4.v6
    assert len(p6.compact) == 18 and p6.v6
    assert p6.compact[-2:] == (6882).to_bytes(2, "big")


def test_bad_ip_is_a_value_error():
    r = make()
    with pytest.raises(ValueError):
        announce(r, 1, ip="not-an-ip")


def test_stopped_removes_the_peer():
    r = make()
    announce(r, 1)
    deploy, _ = announce(r, 2, left=0)
    assert (deploy.seeders, deploy.leechers) == (1, 1)
    deploy, gone = announce(r, 1, event=reg.EVENT_STOPPED)
    assert gone is None
    assert (deploy.seeders, deploy.leechers) == (1, 0)
    assert pid(1) not in deploy.peers


def test_completion_moves_a_peer_and_counts_once():
    r = make()
    deploy, peer = announce(r, 1, left=50)
    announce(r, 2, left=50)
    assert deploy.leechers == 2
    announce(r, 1, left=0, event=reg.EVENT_COMPLETED)
    announce(r, 1, left=0, event=reg.EVENT_COMPLETED)  # a repeat does not count again
    assert (deploy.seeders, deploy.leechers, deploy.completed) == (1, 1, 1)
    deploy, other = announce(r, 2, left=50)
    assert [p.peer_id for p in r.select(deploy, other, 10)] == [pid(1)]


def test_finishing_without_completed_event_counts():
    r = make()
    deploy, _ = announce(r, 1, left=50)
    announce(r, 1, left=0, event=reg.EVENT_STOPPED)  # aria2c --seed-time=0 does this
    announce(r, 2, left=50)
    announce(r, 2, left=0)  # a regular announce with left=0
    announce(r, 3, left=0, event=reg.EVENT_STOPPED)  # unknown peer: nothing to count
    announce(r, 4, left=0)  # a seed from the start did not download
    assert deploy.completed == 2


def test_peer_changing_address_moves_subnet():
    r = make()
    deploy, peer = announce(r, 1, ip="10.0.0.1")
    old_net = peer.subnet
    announce(r, 1, ip="10.9.0.1", port=7000)
    assert peer.ip == "10.9.0.1" and peer.port == 7000
    assert old_net not in deploy.nets
    assert peer.compact[-2:] == (7000).to_bytes(2, "big")


def test_peers_expire_after_timeout_oldest_first():
    r = make(peer_timeout=10)
    announce(r, 1, now=0.0)
    announce(r, 2, now=5.0)
    deploy, _ = announce(r, 3, now=9.0)
    assert r.expire(12.0) == 1  # peer 1 silent for 12 s
    assert list(deploy.peers) == [pid(2), pid(3)]
    announce(r, 2, now=14.0)  # announcing again keeps it
    assert r.expire(19.5) == 1  # peer 3 (last seen 9.0) is gone, peer 2 stays
    assert list(deploy.peers) == [pid(2)]
    assert r.expired_peers == 2


def test_announce_expires_its_own_swarm():
    r = make(peer_timeout=10)
    announce(r, 1, now=0.0)
    deploy, me = announce(r, 2, now=20.0)
    assert list(deploy.peers) == [pid(2)]
    assert r.select(deploy, me, 10) == []


def test_empty_unknown_swarms_are_forgotten_known_ones_kept():
    r = make(peer_timeout=10)
    r.add_known(OTHER_HASH, "known", 5, "/t/k.torrent")
    announce(r, 1, now=0.0, h=HASH)
    announce(r, 2, now=0.0, h=OTHER_HASH)
    r.expire(50.0)
    assert HASH not in r.deploys
    assert OTHER_HASH in r.deploys


def test_max_peers_per_deploy_evicts_least_recently_seen():
    r = make(max_peers_per_deploy=3)
    for n in range(3):
        announce(r, n, now=float(n))
    announce(r, 0, now=5.0)  # peer 0 is now the most recently seen
    deploy, _ = announce(r, 9, now=6.0)
    assert list(deploy.peers) == [pid(2), pid(0), pid(9)]
    assert r.evicted_peers == 1
    assert deploy.seeders + deploy.leechers == 3


def test_max_deploys_evicts_least_recently_seen():
    r = make(max_deploys=2)
    hashes = [bytes([n]) * 20 for n in range(3)]
    announce(r, 1, h=hashes[0], now=0.0)
    announce(r, 1, h=hashes[1], now=1.0)
    announce(r, 1, h=hashes[0], now=2.0)
    announce(r, 1, h=hashes[2], now=3.0)
    assert list(r.deploys) == [hashes[0], hashes[2]]
    assert r.evicted_deploys == 1


def test_pools_stay_consistent_under_churn():
    import random

    rng = random.Random(7)
    r = make(max_peers_per_deploy=50)
    now = 0.0
    for step in range(3000):
        now += 0.01
        n = rng.randrange(80)
        event = rng.choice([reg.EVENT_NONE] * 6 + [reg.EVENT_STOPPED, reg.EVENT_COMPLETED])
        ip = f"10.{rng.randrange(3)}.0.{n}"
        deploy, peer = announce(r, n, ip=ip, left=rng.choice([0, 10]), event=event, now=now)
        if step % 500 == 0:
            r.expire(now)
        for kind, pool in enumerate(deploy.pools):
            for i, p in enumerate(pool):
                assert p.i_all == i and (p.left == 0) == (kind == 0)
        for net, pools in deploy.nets.items():
            assert pools[0] or pools[1]
            for pool in pools:
                for i, p in enumerate(pool):
                    assert p.i_net == i and p.subnet == net
        assert deploy.seeders + deploy.leechers == len(deploy.peers) <= 50
        if peer is not None:
            chosen = r.select(deploy, peer, 20)
            assert peer not in chosen
            assert len(chosen) == len({id(p) for p in chosen})


def test_removing_known_drops_swarm_under_allowlist():
    r = reg.Registry(allowlist=True)
    r.add_known(HASH, "app", 10, "/t/a.torrent")
    r.add_known(HASH, "app", 10, reg.REGISTERED)
    announce(r, 1)
    assert not r.remove_known(HASH, "/t/a.torrent")  # still registered
    assert HASH in r.deploys
    assert r.remove_known(HASH, reg.REGISTERED)
    assert HASH not in r.deploys and HASH not in r.known


def test_turning_allowlist_on_drops_unknown_swarms():
    r = make()
    r.add_known(OTHER_HASH, "known", 5, "/t/k.torrent")
    announce(r, 1, h=HASH)
    announce(r, 1, h=OTHER_HASH)
    r.configure(allowlist=True)
    assert list(r.deploys) == [OTHER_HASH]


def test_registration_eviction_picks_least_recently_seen():
    r = reg.Registry(allowlist=True, max_deploys=2)
    a, b = bytes([1]) * 20, bytes([2]) * 20
    for h, at in ((a, 1.0), (b, 2.0)):
        r.add_known(h, h.hex(), 1, reg.REGISTERED).registered_at = at
    announce(r, 1, h=a, now=10.0)  # a is in use; b was never announced
    assert r.registration_to_evict().info_hash == b


def test_all_deploys_lists_known_without_swarm():
    r = make()
    r.add_known(OTHER_HASH, "zeta", 5, "/t/z.torrent")
    announce(r, 1, h=HASH)
    names = [d.name for d in r.all_deploys()]
    assert sorted(names) == names and set(names) == {"zeta", HASH.hex()}
    assert r.counts() == (2, 0, 1)


# -- the announce query parser ---------------------------------------------------------------


@given(
    st.lists(
        st.tuples(st.binary(max_size=24), st.binary(max_size=24)),
        max_size=12,
    ),
    st.sampled_from(["", "&", "&&"]),
)
def test_parse_query_matches_parse_qsl(pairs, trailer):
    raw = "&".join(f"{quote_from_bytes(k)}={quote_from_bytes(v)}" for k, v in pairs) + trailer
    expected = dict(parse_qsl(raw, keep_blank_values=True, encoding="latin-1"))
    assert parse_query(raw, 64) == expected


def test_parse_query_keeps_every_byte_value():
    every = bytes(range(256))
    raw = "info_hash=" + quote_from_bytes(every) + "&plus=a+b"
    query = parse_query(raw, 64)
    assert query["info_hash"].encode("latin-1") == every
    assert query["plus"] == "a b"


def test_parse_query_caps_fields():
    with pytest.raises(Malformed):
        parse_query("&".join(f"k{n}=1" for n in range(65)), 64)
    assert len(parse_query("&".join(f"k{n}=1" for n in range(64)), 64)) == 64


def test_random_info_hashes_survive():
    for _ in range(50):
        value = os.urandom(20)
        assert parse_query("x=" + quote_from_bytes(value), 4)["x"].encode("latin-1") == value


@given(
    st.lists(
        st.tuples(
            st.integers(0, 60),  # peer
            st.sampled_from(["10.0.0.1", "10.0.1.7", "10.9.0.3", "fd00::5"]),
            st.sampled_from([0, 100]),  # left: seed or leecher
            st.sampled_from([reg.EVENT_NONE, reg.EVENT_STOPPED]),
        ),
        min_size=1,
        max_size=200,
    ),
    st.integers(0, 2**32),
    st.integers(1, 80),
)
def test_compact_selection_is_the_selection_compacted(churn, seed, numwant):
    """select(compact=True) draws the same peers as select(), as their compact addresses:
    the parallel lists of compact addresses stay in step through joins, moves and stops."""

    r = make(max_peers_per_deploy=50)
    asker = None
    for n, ip, left, event in churn:
        deploy, peer = announce(r, n, ip=ip, port=7000 + n % 3, left=left, event=event)
        asker = peer or asker
    deploy = r.deploy(HASH, 0.0)
    for kind in (0, 1):
        assert deploy.cpools[kind] == [p.compact for p in deploy.pools[kind]]
    assert deploy.cnets.keys() == deploy.nets.keys()
    for subnet, net in deploy.nets.items():
        compacts = [[p.compact for p in pool] for pool in net]
        assert compacts == [list(c) for c in deploy.cnets[subnet]]
    if asker is None or asker.peer_id not in deploy.peers:
        return
    random.seed(seed)
    peers = r.select(deploy, asker, numwant)
    random.seed(seed)
    assert r.select(deploy, asker, numwant, compact=True) == [p.compact for p in peers]
    for v6 in (False, True):
        random.seed(seed)
        packed = r.select_packed(deploy, asker, numwant, v6)
        assert packed == b"".join(p.compact for p in peers if p.v6 == v6)


@given(
    st.lists(
        st.tuples(
            st.integers(0, 60),  # peer
            st.sampled_from(["10.0.0.1", "10.0.0.9", "10.0.1.7", "fd00::5", "fd00::7"]),
            st.sampled_from([0, 100]),  # left: seed or leecher
            st.sampled_from([reg.EVENT_NONE, reg.EVENT_STOPPED]),
        ),
        min_size=1,
        max_size=300,
    ),
)
def test_subnet_bytes_stay_the_compact_lists_joined(churn):
    """Each subnet's compact addresses end to end (what select_packed() slices) stay in
    step with its lists through joins, moves, stops and evictions."""
    r = make(max_peers_per_deploy=40)
    for n, ip, left, event in churn:
        announce(r, n, ip=ip, port=7000 + n % 3, left=left, event=event)
    deploy = r.deploy(HASH, 0.0)
    assert deploy.bnets.keys() == deploy.nets.keys()
    for subnet, net in deploy.nets.items():
        for pool, blob in zip(net, deploy.bnets[subnet]):
            assert bytes(blob) == b"".join(p.compact for p in pool)


@pytest.mark.parametrize("left", [0, 100])
def test_a_window_over_the_asker_leaves_it_out(left):
    """A large swarm in one subnet: each random window that covers the asker (found by its
    index, not by a search) still yields numwant distinct peers, never the asker."""
    r = make()
    for n in range(40):
        announce(r, n, left=100 if n % 3 else 0)
    deploy, me = announce(r, 7, left=left)
    for seed in range(200):
        random.seed(seed)
        chosen = r.select(deploy, me, 10)
        random.seed(seed)
        compact = r.select(deploy, me, 10, compact=True)
        assert me not in chosen and len(set(map(id, chosen))) == 10
        assert compact == [p.compact for p in chosen]
        random.seed(seed)
        assert r.select_packed(deploy, me, 10, False) == b"".join(compact)
        if left == 0:
            assert all(p.left != 0 for p in chosen)

"""The tracker's state: known deploys, their swarms, and which peers each announce gets.

Pure state, no I/O: the HTTP layer parses requests and calls in here; the daemon feeds the
catalogue of known deploys (torrents_dir, registrations).  Everything is bounded:
``max_deploys`` swarms and ``max_peers_per_deploy`` peers each, the least recently seen
evicted first; peers that stop announcing expire after ``peer_timeout``.

Times are ``time.monotonic()`` seconds, passed in by the caller (tests pass their own).

Peer selection is O(numwant), whatever the swarm size: each deploy keeps its seeds and
leechers in plain lists (swap-remove, each peer remembers its index) both deploy-wide and per
subnet, so peers are drawn by slicing without building a list per announce.
"""

from __future__ import annotations

import logging
import random
import socket
import sys
import time
from collections import OrderedDict

log = logging.getLogger(__name__)

# Announce events (the HTTP layer maps the query's event= to these).
EVENT_NONE = 0
EVENT_STARTED = 1
EVENT_COMPLETED = 2
EVENT_STOPPED = 3

_SEEDS = 0
_LEECHERS = 1
IP_CACHE_SIZE = 65536  # addresses whose packed form and subnet are remembered


class Known:
    """A deploy the tracker knows (a .torrent in torrents_dir and/or a registration)."""

    __slots__ = ("info_hash", "name", "size", "sources", "registered_at", "added_at")

    def __init__(self, info_hash: bytes, name: str, size: int):
        self.info_hash = info_hash
        self.name = name
        self.size = size
        self.sources: set = set()  # file paths, and REGISTERED for a POST /register
        self.registered_at = 0.0  # unix time of the registration, when registered
        self.added_at = time.time()  # unix time the tracker learned of it (for /stats' age)


REGISTERED = "registered"


class Peer:
    """One peer of one swarm; kept small because a tracker holds many of them."""

    __slots__ = (
        "peer_id",
        "ip",
        "port",
        "compact",
        "v6",
        "subnet",
        "uploaded",
        "downloaded",
        "left",
        "last_seen",
        "i_all",
        "i_net",
    )

    def __init__(self, peer_id: bytes, ip: str, port: int):
        self.peer_id = peer_id
        self.uploaded = 0
        self.downloaded = 0
        self.left = 0
        self.last_seen = 0.0
        self.i_all = -1  # index in the deploy's seeds or leechers list
        self.i_net = -1  # index in its subnet's seeds or leechers list
        self.ip = ip
        self.port = port
        self.compact = b""
        self.v6 = False
        self.subnet = None

    @property
    def seeding(self) -> bool:
        return self.left == 0


def _address(ip: str, port: int, prefix_v4: int, prefix_v6: int) -> tuple[bytes, bool, tuple]:
    """(compact bytes, is IPv6, subnet key) for an address; ValueError if it is not an IP."""
    v6 = ":" in ip
    try:
        packed = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, ip)
    except OSError:
        raise ValueError(f"{ip!r} is not an IP address") from None
    bits = 128 if v6 else 32
    prefix = prefix_v6 if v6 else prefix_v4
    subnet = (6 if v6 else 4, int.from_bytes(packed, "big") >> (bits - prefix))
    return packed + port.to_bytes(2, "big"), v6, subnet


class Deploy:
    """One swarm: its peers (least recently seen first) and the pools selection draws from."""

    __slots__ = (
        "info_hash",
        "known",
        "peers",
        "pools",
        "nets",
        "cpools",
        "cnets",
        "bnets",
        "completed",
        "last_seen",
    )

    def __init__(self, info_hash: bytes, known: Known | None):
        self.info_hash = info_hash
        self.known = known
        self.peers: OrderedDict[bytes, Peer] = OrderedDict()
        self.pools: tuple[list, list] = ([], [])  # seeds, leechers
        self.nets: dict[tuple, tuple[list, list]] = {}  # subnet -> (seeds, leechers)
        # The same lists holding each peer's compact address (same order, same indices):
        # a compact answer is then slices and one join, no step per peer in Python.
        self.cpools: tuple[list, list] = ([], [])
        self.cnets: dict[tuple, tuple[list, list]] = {}
        # And each subnet's compact addresses end to end (one family, so a fixed width):
        # the UDP answer from its subnet is then a slice or two of bytes.
        self.bnets: dict[tuple, tuple[bytearray, bytearray]] = {}
        self.completed = 0
        self.last_seen = 0.0

    @property
    def name(self) -> str:
        return self.known.name if self.known else self.info_hash.hex()

    @property
    def size(self) -> int:
        return self.known.size if self.known else 0

    @property
    def seeders(self) -> int:
        return len(self.pools[_SEEDS])

    @property
    def leechers(self) -> int:
        return len(self.pools[_LEECHERS])

    # -- pool bookkeeping (swap-remove keeps add/remove O(1)) ------------------------------

    def _add_to_pools(self, peer: Peer) -> None:
        kind = _SEEDS if peer.left == 0 else _LEECHERS
        pool = self.pools[kind]
        peer.i_all = len(pool)
        pool.append(peer)
        self.cpools[kind].append(peer.compact)
        net = self.nets.get(peer.subnet)
        if net is None:
            net = self.nets[peer.subnet] = ([], [])
            cnet = self.cnets[peer.subnet] = ([], [])
            bnet = self.bnets[peer.subnet] = (bytearray(), bytearray())
        else:
            # One subnet key object per subnet, not one per peer (88 bytes a peer).
            peer.subnet = (net[0] or net[1])[0].subnet
            cnet = self.cnets[peer.subnet]
            bnet = self.bnets[peer.subnet]
        pool = net[kind]
        peer.i_net = len(pool)
        pool.append(peer)
        cnet[kind].append(peer.compact)
        bnet[kind].extend(peer.compact)

    def _remove_from_pools(self, peer: Peer) -> None:
        kind = _SEEDS if peer.left == 0 else _LEECHERS
        pool, cpool = self.pools[kind], self.cpools[kind]
        last = pool.pop()
        last_compact = cpool.pop()
        if last is not peer:
            pool[peer.i_all] = last
            cpool[peer.i_all] = last_compact
            last.i_all = peer.i_all
        net = self.nets[peer.subnet]
        cnet = self.cnets[peer.subnet]
        pool, cpool, blob = net[kind], cnet[kind], self.bnets[peer.subnet][kind]
        last = pool.pop()
        last_compact = cpool.pop()
        width = len(last_compact)
        del blob[-width:]
        if last is not peer:
            pool[peer.i_net] = last
            cpool[peer.i_net] = last_compact
            at = peer.i_net * width
            blob[at : at + width] = last_compact
            last.i_net = peer.i_net
        if not net[0] and not net[1]:
            del self.nets[peer.subnet]
            del self.cnets[peer.subnet]
            del self.bnets[peer.subnet]

    def remove(self, peer: Peer) -> None:
        self._remove_from_pools(peer)
        del self.peers[peer.peer_id]


def _pick(
    lists: tuple,
    count: int,
    skip: Peer,
    skip_net,
    skipped: int,
    compacts: tuple | None = None,
    skip_at: int = -1,
) -> list:
    """Up to count peers drawn at random from the concatenation of lists.

    skip is a peer never to return (the asker); skip_net a subnet whose peers are not
    returned (they were all handed out already).  skipped bounds how many entries of lists
    are skipped, so a window of count + skipped entries always yields count peers.  With
    compacts (the lists' parallel lists of compact addresses) the chosen peers' compact
    addresses are returned instead of the peers.  Without skip_net, skip_at is where skip
    sits in the concatenation (-1: not there): the window is then the compacts alone,
    with no list of peers built and searched.
    """
    total = 0
    for items in lists:
        total += len(items)
    if total == 0 or count <= 0:
        return []
    if total <= count + skipped:
        out = []
        for items, parallel in zip(lists, compacts if compacts is not None else lists):
            for peer, value in zip(items, parallel):
                if peer is not skip and peer.subnet != skip_net:
                    out.append(value)
                    if len(out) == count:
                        return out
        return out
    # A window of consecutive entries from a random start (wrapping), as opentracker does:
    # list slices cost C time only, and each asker still sees a different random part.
    want = count + skipped
    start = position = random.randrange(total)
    if skip_net is None:
        source = compacts if compacts is not None else lists
        values: list = []
        while len(values) < want:
            offset = position
            which = 0
            while offset >= len(lists[which]):
                offset -= len(lists[which])
                which += 1
            end = offset + want - len(values)
            chunk = source[which][offset:end]
            values.extend(chunk)
            position = (position + len(chunk)) % total
        if skip_at >= 0:
            at = (skip_at - start) % total
            if at < want:
                del values[at]
        del values[count:]
        return values
    window: list[Peer] = []
    values = []
    while len(window) < want:
        offset = position
        which = 0
        while offset >= len(lists[which]):
            offset -= len(lists[which])
            which += 1
        items = lists[which]
        end = offset + want - len(window)
        chunk = items[offset:end]
        window.extend(chunk)
        if compacts is not None:
            values.extend(compacts[which][offset:end])
        position = (position + len(chunk)) % total
    if compacts is None:
        values = window
    out = [v for peer, v in zip(window, values) if peer is not skip and peer.subnet != skip_net]
    return out[:count]


def _window(blobs: tuple, width: int, start: int, want: int, total: int) -> bytearray:
    """want entries of width bytes from start on, wrapping, in the concatenation of blobs."""
    out = bytearray()
    position = start
    while want > 0:
        offset = position
        which = 0
        while offset >= len(blobs[which]) // width:
            offset -= len(blobs[which]) // width
            which += 1
        take = min(want, len(blobs[which]) // width - offset)
        out += blobs[which][offset * width : (offset + take) * width]
        want -= take
        position = (position + take) % total
    return out


class Registry:
    """Known deploys and their swarms, with the limits from [tracker]."""

    def __init__(
        self,
        *,
        allowlist: bool = True,
        peer_timeout: float = 45,
        max_peers_per_deploy: int = 10000,
        max_deploys: int = 10000,
        subnet_prefix_v4: int = 24,
        subnet_prefix_v6: int = 64,
    ):
        self.allowlist = allowlist
        self.peer_timeout = peer_timeout
        self.max_peers_per_deploy = max_peers_per_deploy
        self.max_deploys = max_deploys
        self.subnet_prefix_v4 = subnet_prefix_v4
        self.subnet_prefix_v6 = subnet_prefix_v6
        self.known: dict[bytes, Known] = {}
        # Truncated v2 hash -> v1 hash of hybrid deploys: both announces join one swarm.
        self.aliases: dict[bytes, bytes] = {}
        self.deploys: OrderedDict[bytes, Deploy] = OrderedDict()  # least recently seen first
        # ip -> (that str interned, its packed bytes, is IPv6, subnet key): a new peer's
        # address is then a dict lookup and a join (a fleet has few addresses).
        self._ips: dict[str, tuple[str, bytes, bool, tuple]] = {}
        self.evicted_peers = 0
        self.evicted_deploys = 0
        self.expired_peers = 0

    def configure(self, **settings) -> None:
        """Apply new limits live (a SIGHUP); shrinking a cap evicts at the next insertion."""
        for key, value in settings.items():
            if not hasattr(self, key) or key in ("known", "deploys", "_ips"):
                raise AttributeError(key)
            setattr(self, key, value)
        self._ips.clear()  # the subnet prefixes may have changed
        if self.allowlist:
            for info_hash in [h for h in self.deploys if h not in self.known]:
                log.info("allowlist on: dropping swarm of unknown deploy %s", info_hash.hex())
                del self.deploys[info_hash]

    # -- the catalogue of known deploys -------------------------------------------------------

    def canonical(self, info_hash: bytes) -> bytes:
        """The hash a swarm is kept under (a hybrid deploy's v2 announces join its v1 swarm)."""
        return self.aliases.get(info_hash, info_hash)

    def add_known(
        self, info_hash: bytes, name: str, size: int, source: str, alias: bytes | None = None
    ) -> Known:
        if alias is not None and alias != info_hash:
            self.aliases[alias] = info_hash
        known = self.known.get(info_hash)
        if known is None:
            known = self.known[info_hash] = Known(info_hash, name, size)
        else:
            known.name = name
            known.size = size
        known.sources.add(source)
        deploy = self.deploys.get(info_hash)
        if deploy is not None:
            deploy.known = known
        return known

    def remove_known(self, info_hash: bytes, source: str) -> bool:
        """Drop one source of a known deploy; True when the deploy is no longer known.

        With the allowlist on, a deploy nobody knows any more loses its swarm at once.
        """
        known = self.known.get(info_hash)
        if known is None or source not in known.sources:
            return False
        known.sources.discard(source)
        if known.sources:
            return False
        del self.known[info_hash]
        for alias in [a for a, target in self.aliases.items() if target == info_hash]:
            del self.aliases[alias]
        deploy = self.deploys.get(info_hash)
        if deploy is not None:
            if self.allowlist:
                del self.deploys[info_hash]
            else:
                deploy.known = None
        return True

    def registered(self) -> list[Known]:
        return [k for k in self.known.values() if REGISTERED in k.sources]

    def registration_to_evict(self) -> Known | None:
        """The registration to drop for a new one past max_deploys: the least recently seen."""
        registered = self.registered()
        if len(registered) < self.max_deploys:
            return None

        def last_seen(known: Known) -> float:
            deploy = self.deploys.get(known.info_hash)
            return deploy.last_seen if deploy is not None else float("-inf")

        return min(registered, key=lambda k: (last_seen(k), k.registered_at))

    # -- swarms --------------------------------------------------------------------------------

    def deploy(self, info_hash: bytes, now: float, create: bool = True) -> Deploy | None:
        """The swarm for an announce (marked seen), or None when the allowlist refuses it."""
        deploy = self.deploys.get(info_hash)
        if deploy is not None:
            self.deploys.move_to_end(info_hash)
            deploy.last_seen = now
            peers = deploy.peers
            # expire_deploy(), called only when the least recently seen peer is due
            if peers and next(iter(peers.values())).last_seen < now - self.peer_timeout:
                self.expire_deploy(deploy, now)
            return deploy
        known = self.known.get(info_hash)
        if (known is None and self.allowlist) or not create:
            return None
        while len(self.deploys) >= self.max_deploys:
            old_hash, old = self.deploys.popitem(last=False)
            self.evicted_deploys += 1
            log.info(
                "max_deploys (%d) reached: evicting deploy %s (%s, %d peers)",
                self.max_deploys,
                old.name,
                old_hash.hex(),
                len(old.peers),
            )
        deploy = self.deploys[info_hash] = Deploy(info_hash, known)
        deploy.last_seen = now
        log.debug("deploy %s (%s): first announce", deploy.name, info_hash.hex())
        return deploy

    def announce(
        self,
        deploy: Deploy,
        peer_id: bytes,
        ip: str,
        port: int,
        uploaded: int,
        downloaded: int,
        left: int,
        event: int,
        now: float,
    ) -> Peer | None:
        """Record an announce; the peer (None after a stop).  ValueError for a bad ip."""
        peers = deploy.peers
        peer = peers.get(peer_id)
        if event == EVENT_STOPPED:
            if peer is not None:
                if peer.left != 0 and left == 0:
                    deploy.completed += 1  # finished, then stopped without a "completed"
                deploy.remove(peer)
                log.debug("deploy %s: peer %s port %d stopped", deploy.name, peer.ip, peer.port)
            return None
        if peer is None:
            known_ip = self._ips.get(ip)
            if known_ip is None:
                known_ip = self._ip(ip)
            ip, packed, v6, subnet = known_ip  # one str per address, not per peer
            while len(peers) >= self.max_peers_per_deploy:
                _, old = peers.popitem(last=False)
                deploy._remove_from_pools(old)
                self.evicted_peers += 1
            peer = Peer(peer_id, ip, port)
            peer.compact, peer.v6, peer.subnet = packed + port.to_bytes(2, "big"), v6, subnet
            peer.left = left
            peers[peer_id] = peer
            deploy._add_to_pools(peer)
            if event == EVENT_COMPLETED:
                deploy.completed += 1
            if log.isEnabledFor(logging.DEBUG):  # deploy.name is not free
                log.debug(
                    "deploy %s: peer %s port %d joined (%s)",
                    deploy.name,
                    ip,
                    port,
                    "seeding" if left == 0 else "downloading",
                )
        else:
            peers.move_to_end(peer_id)
            if peer.ip != ip or peer.port != port or (peer.left == 0) != (left == 0):
                if peer.ip != ip or peer.port != port:
                    compact, v6, subnet = _address(
                        ip, port, self.subnet_prefix_v4, self.subnet_prefix_v6
                    )
                else:
                    compact, v6, subnet = peer.compact, peer.v6, peer.subnet
                was_leeching = peer.left != 0
                deploy._remove_from_pools(peer)
                peer.ip, peer.port = sys.intern(ip), port
                peer.compact, peer.v6, peer.subnet = compact, v6, subnet
                peer.left = left
                deploy._add_to_pools(peer)
                if was_leeching and left == 0:
                    # A leecher that now has everything finished, whether or not it says
                    # event=completed (aria2c with --seed-time=0 only sends "stopped").
                    deploy.completed += 1
            else:
                peer.left = left
        peer.uploaded = uploaded
        peer.downloaded = downloaded
        peer.last_seen = now
        return peer

    def _ip(self, ip: str) -> tuple[str, bytes, bool, tuple]:
        """_address() for ip, remembered (ValueError if it is not an IP address)."""
        compact, v6, subnet = _address(ip, 0, self.subnet_prefix_v4, self.subnet_prefix_v6)
        if len(self._ips) >= IP_CACHE_SIZE:
            self._ips.clear()
        known_ip = self._ips[ip] = (sys.intern(ip), compact[:-2], v6, subnet)
        return known_ip

    def select(self, deploy: Deploy, asker: Peer, numwant: int, compact: bool = False) -> list:
        """Peers for the asker: same subnet first, then random; a seed gets only leechers.

        compact: their compact addresses (bytes) instead of the peers.
        """
        if numwant <= 0:
            return []
        subnet = asker.subnet
        net = deploy.nets.get(subnet)
        cnet = deploy.cnets.get(subnet) if compact else None
        if asker.left == 0:
            local = (net[_LEECHERS],) if net else ()
            everyone = (deploy.pools[_LEECHERS],)
            clocal = (cnet[_LEECHERS],) if cnet else None
            ceveryone = (deploy.cpools[_LEECHERS],) if compact else None
        else:
            local = net if net else ()
            everyone = deploy.pools
            clocal = cnet
            ceveryone = deploy.cpools if compact else None
        if local:
            # Where the asker sits in local (its index, checked): found without a search.
            skip_at = -1
            at = asker.i_net
            in_net = 0
            for items in local:
                if skip_at < 0 and 0 <= at < len(items) and items[at] is asker:
                    skip_at = in_net + at
                in_net += len(items)
            chosen = _pick(local, numwant, asker, None, 1, clocal, skip_at)
            if len(chosen) >= numwant:
                return chosen
        else:
            chosen = []
            in_net = 0
        # The asker's subnet is exhausted (so small): fill from the other subnets.
        rest = _pick(everyone, numwant - len(chosen), asker, subnet, in_net + 1, ceveryone)
        chosen.extend(rest)
        return chosen

    def select_packed(self, deploy: Deploy, asker: Peer, numwant: int, v6: bool) -> bytes:
        """select(compact=True)'s peers of one family (IPv6: v6), end to end.

        The same peers as b"".join() of those of select(deploy, asker, numwant, True) that
        are of that family (the same draw from random too), with the asker's subnet (the
        commonest answer, often all of it) sliced from its bytes rather than listed.
        """
        if numwant <= 0:
            return b""
        subnet = asker.subnet
        net = deploy.nets.get(subnet)
        width = 18 if asker.v6 else 6
        if net:
            bnet = deploy.bnets[subnet]
            at = asker.i_net
            if asker.left == 0:
                local = net[_LEECHERS]
                blob = bnet[_LEECHERS]
                total = len(local)
                skip_at = at if 0 <= at < total and local[at] is asker else -1
                blobs = None
            else:
                seeds, leechers = net
                total = len(seeds) + len(leechers)
                if 0 <= at < len(seeds) and seeds[at] is asker:
                    skip_at = at
                elif 0 <= at < len(leechers) and leechers[at] is asker:
                    skip_at = len(seeds) + at
                else:
                    skip_at = -1
                if not seeds:
                    blob, blobs = bnet[_LEECHERS], None
                elif not leechers:
                    blob, blobs = bnet[_SEEDS], None
                else:
                    blob, blobs = None, bnet
            # _pick(local, numwant, asker, None, 1, ...), on bytes
            if total == 0:
                chosen = b""
            elif total <= numwant + 1:
                chosen = bytearray(blob) if blobs is None else blobs[0] + blobs[1]
                if skip_at >= 0:
                    del chosen[skip_at * width : (skip_at + 1) * width]
                del chosen[numwant * width :]
            else:
                want = numwant + 1
                start = random.randrange(total)
                end = start + want
                if blobs is None:
                    if end <= total:
                        chosen = blob[start * width : end * width]
                    else:
                        chosen = blob[start * width :] + blob[: (end - total) * width]
                else:
                    chosen = _window(blobs, width, start, want, total)
                if skip_at >= 0:
                    skip = (skip_at - start) % total
                    if skip < want:
                        del chosen[skip * width : (skip + 1) * width]
                del chosen[numwant * width :]
            got = len(chosen) // width
            if got >= numwant:
                return chosen if width == (18 if v6 else 6) else b""
        else:
            chosen = b""
            got = total = 0
        if width != (18 if v6 else 6):
            chosen = b""
        # The asker's subnet is exhausted (so small): fill from the other subnets.
        if asker.left == 0:
            everyone, ceveryone = (deploy.pools[_LEECHERS],), (deploy.cpools[_LEECHERS],)
        else:
            everyone, ceveryone = deploy.pools, deploy.cpools
        rest = _pick(everyone, numwant - got, asker, subnet, total + 1, ceveryone)
        peers = b"".join(rest)
        size = 18 if v6 else 6
        if len(peers) != size * len(rest):  # both families: keep the asker's
            peers = b"".join([c for c in rest if len(c) == size])
        return chosen + peers if chosen else peers

    def expire_deploy(self, deploy: Deploy, now: float) -> int:
        """Drop the deploy's peers silent for longer than peer_timeout (oldest first)."""
        cutoff = now - self.peer_timeout
        peers = deploy.peers
        dropped = 0
        while peers:
            peer = next(iter(peers.values()))
            if peer.last_seen >= cutoff:
                break
            deploy.remove(peer)
            dropped += 1
        if dropped:
            self.expired_peers += dropped
            log.debug("deploy %s: %d peers expired", deploy.name, dropped)
        return dropped

    def expire(self, now: float) -> int:
        """Expire silent peers everywhere; forget empty swarms of unknown deploys."""
        dropped = 0
        cutoff = now - self.peer_timeout
        for info_hash, deploy in list(self.deploys.items()):
            dropped += self.expire_deploy(deploy, now)
            if not deploy.peers and deploy.known is None and deploy.last_seen < cutoff:
                del self.deploys[info_hash]
        return dropped

    def counts(self) -> tuple[int, int, int]:
        """(deploys known or active, seeding peers, downloading peers)."""
        seeders = leechers = 0
        for deploy in self.deploys.values():
            seeders += len(deploy.pools[_SEEDS])
            leechers += len(deploy.pools[_LEECHERS])
        active_unknown = sum(1 for h in self.deploys if h not in self.known)
        return len(self.known) + active_unknown, seeders, leechers

    def all_deploys(self) -> list[Deploy]:
        """Every deploy known or active, by name; known ones with no swarm yet get a blank one.

        The blank swarms are not stored (they do not count against max_deploys).
        """
        out = list(self.deploys.values())
        out.extend(Deploy(h, k) for h, k in self.known.items() if h not in self.deploys)
        out.sort(key=lambda d: (d.name, d.info_hash))
        return out

    def find(self, info_hash: bytes) -> Deploy | None:
        """The deploy for a stats/scrape lookup (a blank one for a known deploy), or None."""
        deploy = self.deploys.get(info_hash)
        if deploy is not None:
            return deploy
        known = self.known.get(info_hash)
        return Deploy(info_hash, known) if known is not None else None

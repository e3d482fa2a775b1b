"""Announce and scrape semantics, shared by the HTTP and the UDP tracker.

The transports parse and encode; everything a tracker decides lives here, once: which
deploys are answered (the allowlist, a hybrid deploy's v2 alias), whose ``ip`` claim is
believed (trusted_networks), how many peers an announce gets (numwant_default, numwant_max)
and which ones (the registry's selection: same subnet first, seeds get leechers only).
The announce and scrape counters are shared too: both transports count into them.
"""

from __future__ import annotations

import ipaddress
import time

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily

from . import registry as reg


def normalize_ip(address: str) -> str:
    """An IPv4-mapped IPv6 source (dual-stack socket) as plain IPv4."""
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address


def in_networks(address: str | None, networks: list) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(normalize_ip(address).split("%", 1)[0])
    except ValueError:
        return False
    return any(ip in net for net in networks)


class Count:
    """One result's count: what a prometheus_client Counter child offers, without its lock.

    The announce path increments value directly (a Counter takes a lock per increment);
    everything runs on the event loop's thread.
    """

    __slots__ = ("value", "created")

    def __init__(self):
        self.value = 0
        self.created = time.time()

    def inc(self, amount: int = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class _ByResult:
    """Counts by result as one Prometheus counter family (name_total, name_created)."""

    def __init__(self, name: str, documentation: str, results: tuple):
        self.name = name
        self.documentation = documentation
        self.counts = {result: Count() for result in results}

    def describe(self):
        return [CounterMetricFamily(self.name, self.documentation, labels=["result"])]

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=["result"])
        for result, count in self.counts.items():
            family.add_metric([result], count.value, created=count.created)
        yield family


RESULTS = ("ok", "unknown_deploy", "malformed")


def _by_result(metrics: CollectorRegistry, what: str) -> list[Count]:
    """murderd_tracker_<what>_total by result, registered: its counts in RESULTS order."""
    family = _ByResult(
        f"murderd_tracker_{what}", f"{what.capitalize()} by result (HTTP and UDP)", RESULTS
    )
    metrics.register(family)
    return [family.counts[result] for result in RESULTS]


class Tracker:
    """The registry plus the [tracker] rules; configure() applies them live."""

    def __init__(self, registry: reg.Registry, settings: dict, metrics: CollectorRegistry):
        self.registry = registry
        self.announces = 0  # every announce handled, whatever the transport and result
        self.configure(settings)
        announces = _by_result(metrics, "announces")
        self.announce_ok, self.announce_unknown, self.announce_malformed = announces
        scrapes = _by_result(metrics, "scrapes")
        self.scrape_ok, self.scrape_unknown, self.scrape_malformed = scrapes

    def configure(self, settings: dict) -> None:
        """Take the live [tracker] keys (a config section dict)."""
        self.interval = settings["interval"]
        self.min_interval = settings["min_interval"]
        self.numwant_default = settings["numwant_default"]
        self.numwant_max = settings["numwant_max"]
        self.trusted_networks = [ipaddress.ip_network(n) for n in settings["trusted_networks"]]

    def peer_ip(self, source: str, claimed: str | None) -> str:
        """The address a peer is listed under: its source, or what it claims when trusted.

        ValueError when a trusted source claims something that is not an IP address.
        """
        ip = normalize_ip(source)
        if claimed and self.trusted_networks and in_networks(ip, self.trusted_networks):
            try:
                return normalize_ip(str(ipaddress.ip_address(claimed)))
            except ValueError:
                raise ValueError(f"ip {claimed[:64]!r} is not an IP address") from None
        return ip

    def numwant(self, asked: int | None) -> int:
        if asked is None or asked < 0:
            return self.numwant_default
        return min(asked, self.numwant_max)

    def announce(
        self,
        info_hash: bytes,
        peer_id: bytes,
        ip: str,
        port: int,
        uploaded: int,
        downloaded: int,
        left: int,
        event: int,
        numwant: int,
        now: float,
        compact: bool = False,
    ) -> tuple[reg.Deploy, list] | None:
        """Record an announce: (its swarm, the peers to hand out), or None for an unknown deploy.

        info_hash may be a hybrid deploy's v2 alias; numwant is already capped (numwant()).
        compact: the chosen peers as their compact addresses (bytes), not as Peers.
        ValueError for an address the registry cannot take.  Counts ok and unknown_deploy;
        the caller counts malformed requests, which never get here.
        """
        recorded = self._record(
            info_hash, peer_id, ip, port, uploaded, downloaded, left, event, now
        )  # fmt: skip
        if recorded is None:
            return None
        deploy, peer = recorded
        chosen = self.registry.select(deploy, peer, numwant, compact) if peer is not None else []
        return deploy, chosen

    def announce_packed(
        self,
        info_hash: bytes,
        peer_id: bytes,
        ip: str,
        port: int,
        uploaded: int,
        downloaded: int,
        left: int,
        event: int,
        numwant: int,
        now: float,
        v6: bool,
    ) -> tuple[reg.Deploy, bytes] | None:
        """announce(compact=True) with the chosen peers of one family (IPv6: v6) end to end.

        What a UDP answer holds (registry.select_packed()); the rest is announce()'s.
        """
        recorded = self._record(
            info_hash, peer_id, ip, port, uploaded, downloaded, left, event, now
        )  # fmt: skip
        if recorded is None:
            return None
        deploy, peer = recorded
        if peer is None:
            return deploy, b""
        return deploy, self.registry.select_packed(deploy, peer, numwant, v6)

    def _record(
        self,
        info_hash: bytes,
        peer_id: bytes,
        ip: str,
        port: int,
        uploaded: int,
        downloaded: int,
        left: int,
        event: int,
        now: float,
    ) -> tuple[reg.Deploy, reg.Peer | None] | None:
        """The announce in the registry: (its swarm, the peer, None after a stop), or None
        for an unknown deploy.  Counts ok and unknown_deploy."""
        registry = self.registry
        info_hash = registry.aliases.get(info_hash, info_hash)  # registry.canonical()
        deploy = registry.deploy(info_hash, now, create=event != reg.EVENT_STOPPED)
        if deploy is None:
            if event == reg.EVENT_STOPPED and (
                info_hash in registry.known or not registry.allowlist
            ):
                deploy = reg.Deploy(info_hash, registry.known.get(info_hash))
            else:
                self.announce_unknown.value += 1
                return None
        peer = registry.announce(deploy, peer_id, ip, port, uploaded, downloaded, left, event, now)
        self.announce_ok.value += 1
        return deploy, peer

    def scrape(self, hashes: list[bytes], now: float) -> list[tuple[bytes, reg.Deploy | None]]:
        """(asked hash, its swarm or None when unknown) for each hash, peers expired first.

        No hashes: every deploy.  The caller decides what an all-unknown scrape gets (and
        counts it with scrape_unknown).
        """
        registry = self.registry
        if not hashes:
            registry.expire(now)
            return [(deploy.info_hash, deploy) for deploy in registry.all_deploys()]
        out = []
        for info_hash in hashes:
            deploy = registry.find(registry.canonical(info_hash))
            if deploy is not None:
                registry.expire_deploy(deploy, now)
            out.append((info_hash, deploy))
        return out

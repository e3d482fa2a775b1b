"""Prometheus /metrics for the seeder and the peer (the tracker has its own, in tracker/http).

Each daemon has its own CollectorRegistry.  Bytes, active torrents, peers and hash failures
are libtorrent's session counters, read at scrape time (``post_session_stats`` and the
``session_stats_alert`` it answers with, delivered by the daemon's AlertPump); the deploy
outcomes (completed, failed, duration) are counted by the daemon as they happen.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import prometheus_client
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as prometheus_text
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import lt

log = logging.getLogger(__name__)

# Seconds: hashing a small file on a seeder up to a multi-GiB deploy across a slow fleet.
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
STATS_TIMEOUT = 2.0

# (metric suffix, help, libtorrent session counters summed)
_COUNTERS = (
    ("uploaded_bytes", "Payload bytes sent to peers", ("net.sent_payload_bytes",)),
    ("downloaded_bytes", "Payload bytes received from peers", ("net.recv_payload_bytes",)),
    ("hash_failures", "Pieces that failed their hash check", ("ses.num_piece_failed",)),
)
_GAUGES = (
    (
        "active_torrents",
        "Torrents in the libtorrent session (checking, downloading or seeding)",
        (
            "ses.num_checking_torrents",
            "ses.num_downloading_torrents",
            "ses.num_seeding_torrents",
            "ses.num_upload_only_torrents",
        ),
    ),
    ("peers_connected", "Connected BitTorrent peers", ("peer.num_peers_connected",)),
)


def disable_created_series() -> None:
    """*_created series only add noise to a daemon's /metrics (older clients lack the switch)."""
    if hasattr(prometheus_client, "disable_created_metrics"):
        prometheus_client.disable_created_metrics()


class _SessionCollector:
    """The last session counters libtorrent reported, as Prometheus families."""

    def __init__(self, owner: DaemonMetrics):
        self.owner = owner

    def describe(self):
        return []

    def collect(self):
        values = self.owner.session_values
        prefix = self.owner.prefix
        for suffix, text, keys in _COUNTERS:
            total = sum(values.get(k, 0) for k in keys)
            yield CounterMetricFamily(f"{prefix}_{suffix}", text, value=total)
        for suffix, text, keys in _GAUGES:
            total = sum(values.get(k, 0) for k in keys)
            yield GaugeMetricFamily(f"{prefix}_{suffix}", text, value=total)


class DaemonMetrics:
    """One daemon's metrics: ``murderd_<daemon>_*``.

    session_getter returns the daemon's libtorrent session (or None): no reference to the
    session is kept here, so the daemon's AlertPump stays its last owner at shutdown.
    """

    def __init__(self, daemon: str, session_getter: Callable[[], object]):
        disable_created_series()
        self.prefix = f"murderd_{daemon}"
        self.session_getter = session_getter
        self.session_values: dict = {}
        self._waiter: asyncio.Future | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_SessionCollector(self))
        self.completed = Counter(
            f"{self.prefix}_deploys_completed",
            "Deploys finished (seeder: published; peer: verified and placed)",
            registry=self.registry,
        )
        self.failed = Counter(
            f"{self.prefix}_deploys_failed",
            "Deploys that failed (seeder: could not be hashed; peer: download or checks failed)",
            registry=self.registry,
        )
        self.duration = Histogram(
            f"{self.prefix}_deploy_duration_seconds",
            "Seconds per finished deploy (seeder: hashing; peer: accepted to placed)",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )

    def deploy_completed(self, seconds: float) -> None:
        self.completed.inc()
        self.duration.observe(max(seconds, 0.0))

    def deploy_failed(self) -> None:
        self.failed.inc()

    def on_alert(self, alert) -> bool:
        """Take a session_stats_alert (True: it was one, the daemon can skip it)."""
        values = lt.session_stats_values(alert)
        if values is None:
            return False
        self.session_values = values
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        return True

    async def refresh(self, timeout: float = STATS_TIMEOUT) -> None:
        """Ask libtorrent for its counters and wait for them (concurrent scrapes share one)."""
        session = self.session_getter()
        if session is None:
            return
        if self._waiter is None or self._waiter.done():
            self._waiter = asyncio.get_running_loop().create_future()
            lt.post_session_stats(session)
        try:
            await asyncio.wait_for(asyncio.shield(self._waiter), timeout)
        except asyncio.TimeoutError:
            log.warning("libtorrent session stats not received in %ss: serving older ones", timeout)

    def text(self) -> bytes:
        return prometheus_text(self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        """The aiohttp handler for GET /metrics."""
        await self.refresh()
        response = web.Response(body=self.text())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

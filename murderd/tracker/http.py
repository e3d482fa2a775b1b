"""The tracker's HTTP interface (aiohttp): announce, scrape, register, stats, metrics.

BitTorrent clients get bencoded replies (libtorrent's bencode) and, for anything wrong with
their request, a ``failure reason`` with HTTP 200, which is what they know how to show.
Operators get JSON (/register, /stats) and Prometheus text (/metrics).

The announce path is the hot one: no middleware, no access log, no per-request logging at
info level, peers' compact bytes precomputed by the registry.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from typing import Protocol
from urllib.parse import parse_qsl, unquote_to_bytes

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as prometheus_text
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .. import torrent
from ..lt import bencode
from . import announce as announce_rules
from . import registry as reg

log = logging.getLogger(__name__)

MAX_ANNOUNCE_FIELDS = 64
MAX_SCRAPE_HASHES = 1000
MAX_NUMBER = 2**63 - 1
MAX_TORRENT_BYTES = 16 * 1024 * 1024
EVENTS = {
    "": reg.EVENT_NONE,
    "started": reg.EVENT_STARTED,
    "completed": reg.EVENT_COMPLETED,
    "stopped": reg.EVENT_STOPPED,
    # BEP 21: a partial seed pausing; for the tracker an ordinary announce.
    "paused": reg.EVENT_NONE,
}
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)


class Malformed(ValueError):
    """The request cannot be served; str() is the failure reason the client sees."""


class Registrar(Protocol):
    """What the daemon provides for POST/DELETE /register (it persists registrations)."""

    def register(self, parsed: torrent.Torrent) -> reg.Known: ...

    def unregister(self, info_hash: bytes) -> bool: ...


normalize_ip = announce_rules.normalize_ip
_in_networks = announce_rules.in_networks


def parse_query(raw: str, max_fields: int) -> dict[str, str]:
    """The raw (still percent-encoded) query string as {key: value}, the last value winning.

    The same result as dict(parse_qsl(raw, keep_blank_values=True, encoding="latin-1")), so
    binary values (info_hash, peer_id) survive as one char per byte (.encode("latin-1")),
    at a quarter of the cost: an announce's values are mostly plain ASCII that needs no
    unquoting.  (aiohttp's request.query and request.query_string decode as UTF-8 and
    mangle binary values.)  Malformed when there are more than max_fields fields.
    """
    parts = raw.split("&")
    if len(parts) > max_fields:
        raise Malformed("too many query parameters")
    query = {}
    for part in parts:
        if not part:
            continue
        key, _, value = part.partition("=")
        if "%" in key or "+" in key:
            key = unquote_to_bytes(key.replace("+", " ")).decode("latin-1")
        if "%" in value or "+" in value:
            value = unquote_to_bytes(value.replace("+", " ")).decode("latin-1")
        query[key] = value
    return query


def _binary20(query: dict, key: str) -> bytes:
    value = query.get(key)
    if value is None:
        raise Malformed(f"missing {key}")
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        raise Malformed(f"{key} is not percent-encoded bytes") from None
    if len(raw) != 20:
        raise Malformed(f"{key} must be 20 bytes, got {len(raw)}")
    return raw


def _number(query: dict, key: str, default: int | None = None) -> int:
    value = query.get(key)
    if value is None:
        if default is None:
            raise Malformed(f"missing {key}")
        return default
    if not (value.isascii() and value.isdigit()) or len(value) > 19:
        raise Malformed(f"{key} must be a non-negative integer, got {value[:32]!r}")
    number = int(value)
    if number > MAX_NUMBER:
        raise Malformed(f"{key} is too large")
    return number


def _parse_hex_hash(text: str) -> bytes:
    if len(text) != 40:
        raise Malformed("info hash must be 40 hex characters")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise Malformed("info hash must be 40 hex characters") from None


def _failure_body(reason: str) -> bytes:
    return bencode({b"failure reason": reason.encode()})


def _failure(reason: str) -> web.Response:
    return web.Response(body=_failure_body(reason), content_type="text/plain")


class _BadRequestFilter(logging.Filter):
    """aiohttp logs a traceback at ERROR for every request it cannot parse (it answers 400).

    Anyone can send those, so one DEBUG line each is enough; real server errors pass as they
    are.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or (exc.code or 500) >= 500:
            return True
        if not server_log.isEnabledFor(logging.DEBUG):
            return False
        reason = " ".join(str(exc.message or type(exc).__name__).split())[:160]
        record.msg, record.args = "%s: %s %s", (record.getMessage(), exc.code, reason)
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info = record.exc_text = None
        return True


# aiohttp's own messages about connections (bad requests, handler errors) go here.
server_log = logging.getLogger(__name__ + ".server")
server_log.addFilter(_BadRequestFilter())


class _StateCollector:
    """Gauges read from the registry at scrape time (nothing to keep in sync)."""

    def __init__(self, registry: reg.Registry):
        self.registry = registry

    def describe(self):
        return []

    def collect(self):
        deploys, seeders, leechers = self.registry.counts()
        yield GaugeMetricFamily(
            "murderd_tracker_deploys", "Deploys known or with a swarm", value=deploys
        )
        peers = GaugeMetricFamily("murderd_tracker_peers", "Peers by state", labels=["state"])
        peers.add_metric(["seeding"], seeders)
        peers.add_metric(["downloading"], leechers)
        yield peers
        gone = CounterMetricFamily(
            "murderd_tracker_peers_removed", "Peers dropped by the tracker", labels=["reason"]
        )
        gone.add_metric(["expired"], self.registry.expired_peers)
        gone.add_metric(["evicted"], self.registry.evicted_peers)
        yield gone
        yield CounterMetricFamily(
            "murderd_tracker_deploys_evicted",
            "Swarms evicted past max_deploys",
            value=self.registry.evicted_deploys,
        )


class TrackerHTTP:
    """Request handlers over one Registry; configure() applies [tracker] settings live."""

    def __init__(self, registry: reg.Registry, registrar: Registrar, settings: dict):
        self.registry = registry
        self.registrar = registrar
        self.token: str | None = None  # None: registration is off
        self.metrics = CollectorRegistry(auto_describe=True)
        self.metrics.register(_StateCollector(registry))
        # The announce and scrape rules and counters, shared with the UDP tracker.
        self.core = announce_rules.Tracker(registry, settings, self.metrics)
        self.configure(settings)

        self._registrations = Counter(
            "murderd_tracker_registrations",
            "POST/DELETE /register requests by result",
            ["result"],
            registry=self.metrics,
        )
        latency = Histogram(
            "murderd_tracker_request_duration_seconds",
            "Time spent handling a request, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.metrics,
        )
        self._latency = {name: latency.labels(name) for name in ("announce", "scrape", "stats")}

    @property
    def announces(self) -> int:
        return self.core.announces

    def configure(self, settings: dict) -> None:
        """Take the live [tracker] keys (a config section dict)."""
        self.core.configure(settings)
        self.stats_networks = [ipaddress.ip_network(n) for n in settings["stats_networks"]]

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_TORRENT_BYTES + 1)
        app.router.add_get("/announce", self.announce)
        app.router.add_get("/scrape", self.scrape)
        app.router.add_post("/register", self.register)
        app.router.add_delete("/register/{info_hash}", self.unregister)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/stats/{info_hash}", self.stats)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_get("/healthz", self.healthz)
        return app

    # -- BitTorrent ---------------------------------------------------------------------------

    async def announce(self, request: web.Request) -> web.Response:
        body = self.announce_body(request.rel_url.raw_query_string, request.remote)
        return web.Response(body=body, content_type="text/plain")

    def announce_body(self, raw_query: str, source: str | None) -> bytes:
        """The bencoded reply to an announce (a failure reason for a malformed one).

        Kept apart from aiohttp's request and response objects: the announce logic is
        plain code, testable and measurable on its own.
        """
        started = time.perf_counter()
        self.core.announces += 1
        try:
            body = self._announce(raw_query, source)
        except Malformed as exc:
            self.core.announce_malformed.inc()
            log.debug("announce from %s refused: %s", source, exc)
            body = _failure_body(str(exc))
        self._latency["announce"].observe(time.perf_counter() - started)
        return body

    def _announce(self, raw_query: str, source: str | None) -> bytes:
        core = self.core
        query = parse_query(raw_query, MAX_ANNOUNCE_FIELDS)
        info_hash = _binary20(query, "info_hash")
        peer_id = _binary20(query, "peer_id")
        port = _number(query, "port")
        if not 0 < port < 65536:
            raise Malformed(f"port {port} is outside 1-65535")
        uploaded = _number(query, "uploaded", 0)
        downloaded = _number(query, "downloaded", 0)
        left = _number(query, "left")
        event = EVENTS.get(query.get("event", ""))
        if event is None:
            raise Malformed(f"unknown event {query['event'][:32]!r}")
        numwant = core.numwant(_number(query, "numwant", core.numwant_default))
        if not source:
            raise Malformed("no source address")
        try:
            ip = core.peer_ip(source, query.get("ip"))
            answer = core.announce(
                info_hash, peer_id, ip, port, uploaded, downloaded, left, event, numwant,
                time.monotonic(), compact=query.get("compact") != "0",
            )  # fmt: skip
        except ValueError as exc:
            raise Malformed(str(exc)) from None
        if answer is None:
            # The deploy may be known in a moment (a torrent just published, a tracker
            # just restarted): without an interval, libtorrent retries after 30 minutes.
            return bencode(
                {
                    b"failure reason": b"unknown deploy "
                    + self.registry.canonical(info_hash).hex().encode(),
                    b"interval": core.min_interval,
                    b"min interval": core.min_interval,
                }
            )
        deploy, chosen = answer
        reply = {
            b"interval": core.interval,
            b"min interval": core.min_interval,
            b"complete": deploy.seeders,
            b"incomplete": deploy.leechers,
            b"downloaded": deploy.completed,
        }
        if query.get("compact") == "0":
            no_peer_id = query.get("no_peer_id") == "1"
            peers = []
            for other in chosen:
                entry = {b"ip": other.ip.encode(), b"port": other.port}
                if not no_peer_id:
                    entry[b"peer id"] = other.peer_id
                peers.append(entry)
            reply[b"peers"] = peers
        else:
            peers = b"".join(chosen)
            if len(peers) == 6 * len(chosen):
                reply[b"peers"] = peers
            else:  # both families
                reply[b"peers"] = b"".join([c for c in chosen if len(c) == 6])
                reply[b"peers6"] = b"".join([c for c in chosen if len(c) == 18])
        return bencode(reply)

    async def scrape(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            body = self._scrape(request)
        except Malformed as exc:
            self.core.scrape_malformed.inc()
            response = _failure(str(exc))
        else:
            response = web.Response(body=body, content_type="text/plain")
        self._latency["scrape"].observe(time.perf_counter() - started)
        return response

    def _scrape(self, request: web.Request) -> bytes:
        try:
            pairs = parse_qsl(
                request.rel_url.raw_query_string,
                keep_blank_values=True,
                encoding="latin-1",
                max_num_fields=MAX_SCRAPE_HASHES + 16,
            )
        except ValueError:
            raise Malformed(f"more than {MAX_SCRAPE_HASHES} info_hash values") from None
        hashes = []
        for key, value in pairs:
            if key == "info_hash":
                hashes.append(_binary20({key: value}, key))
        core = self.core
        deploys = [(h, d) for h, d in core.scrape(hashes, time.monotonic()) if d is not None]
        if hashes and not deploys:
            core.scrape_unknown.inc()
            unknown = ", ".join(h.hex() for h in hashes[:3])
            return bencode({b"failure reason": f"unknown deploy {unknown}".encode()})
        files = {}
        for asked, deploy in deploys:
            files[asked] = {
                b"complete": deploy.seeders,
                b"incomplete": deploy.leechers,
                b"downloaded": deploy.completed,
                b"name": deploy.name.encode(),
            }
        core.scrape_ok.inc()
        return bencode({b"files": files, b"flags": {b"min_request_interval": core.min_interval}})

    # -- registration -------------------------------------------------------------------------

    def _authorize(self, request: web.Request) -> web.Response | None:
        """An error response, or None when the request carries the right token."""
        if self.token is None:
            self._registrations.labels("off").inc()
            return web.json_response(
                {"error": "registration is off: [tracker] token_file is not set or empty"},
                status=403,
            )
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        # aiohttp keeps a header's non-UTF-8 bytes as surrogates: compare the raw bytes.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode("utf-8", "surrogateescape"), self.token.encode()
        ):
            self._registrations.labels("unauthorized").inc()
            log.warning("registration from %s refused: missing or wrong token", request.remote)
            return web.json_response(
                {"error": "missing or wrong token (Authorization: Bearer <token>)"},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return None

    async def register(self, request: web.Request) -> web.Response:
        refused = self._authorize(request)
        if refused is not None:
            return refused
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self._registrations.labels("malformed").inc()
            return web.json_response(
                {"error": f"torrent is larger than {MAX_TORRENT_BYTES} bytes"}, status=413
            )
        try:
            parsed = torrent.parse(data, max_bytes=MAX_TORRENT_BYTES)
        except torrent.TorrentError as exc:
            self._registrations.labels("malformed").inc()
            log.warning(
                "registration from %s refused: not a valid torrent: %s", request.remote, exc
            )
            return web.json_response({"error": f"not a valid torrent: {exc}"}, status=400)
        try:
            known = self.registrar.register(parsed)
        except OSError as exc:
            self._registrations.labels("error").inc()
            return web.json_response(
                {"error": f"cannot save the registration: {exc.strerror or exc}"}, status=503
            )
        self._registrations.labels("registered").inc()
        return web.json_response({"info_hash": known.info_hash.hex(), "name": known.name})

    async def unregister(self, request: web.Request) -> web.Response:
        refused = self._authorize(request)
        if refused is not None:
            return refused
        try:
            info_hash = _parse_hex_hash(request.match_info["info_hash"])
        except Malformed as exc:
            return web.json_response({"error": str(exc)}, status=400)
        try:
            removed = self.registrar.unregister(info_hash)
        except OSError as exc:
            self._registrations.labels("error").inc()
            return web.json_response(
                {"error": f"cannot save the change: {exc.strerror or exc}"}, status=503
            )
        if not removed:
            return web.json_response({"error": f"{info_hash.hex()} is not registered"}, status=404)
        self._registrations.labels("unregistered").inc()
        return web.json_response({"info_hash": info_hash.hex(), "unregistered": True})

    # -- operators ------------------------------------------------------------------------------

    def _stats_refused(self, request: web.Request) -> web.Response | None:
        if self.stats_networks and not _in_networks(request.remote, self.stats_networks):
            return web.Response(status=403, text="forbidden: not in [tracker] stats_networks\n")
        return None

    async def stats(self, request: web.Request) -> web.Response:
        refused = self._stats_refused(request)
        if refused is not None:
            return refused
        started = time.perf_counter()
        wanted = request.match_info.get("info_hash") or request.query.get("info_hash")
        registry = self.registry
        now = time.monotonic()
        if wanted:
            try:
                deploy = registry.find(_parse_hex_hash(wanted))
            except Malformed as exc:
                return web.json_response({"error": str(exc)}, status=400)
            if deploy is None:
                return web.json_response({"error": f"unknown deploy {wanted}"}, status=404)
            registry.expire_deploy(deploy, now)
            deploys = [deploy]
        else:
            registry.expire(now)
            deploys = registry.all_deploys()
        wall = time.time()
        body = {"deploys": [self._deploy_stats(d, now, wall) for d in deploys]}
        self._latency["stats"].observe(time.perf_counter() - started)
        return web.json_response(body)

    @staticmethod
    def _deploy_stats(deploy: reg.Deploy, now: float, wall: float) -> dict:
        size = deploy.size
        known = deploy.known
        peers = []
        for peer in reversed(deploy.peers.values()):  # most recently seen first
            if size:
                progress = min(max((size - peer.left) / size, 0.0), 1.0)
            else:
                progress = 1.0 if peer.left == 0 else 0.0
            peers.append(
                {
                    "address": peer.ip,
                    "port": peer.port,
                    "peer_id": peer.peer_id.hex(),
                    "progress": round(progress, 4),
                    "uploaded": peer.uploaded,
                    "downloaded": peer.downloaded,
                    "left": peer.left,
                    "state": "seeding" if peer.left == 0 else "downloading",
                    "last_seen": round(wall - (now - peer.last_seen), 3),
                }
            )
        return {
            "name": deploy.name,
            "info_hash": deploy.info_hash.hex(),
            "size": size,
            "seeders": deploy.seeders,
            "leechers": deploy.leechers,
            "completed": deploy.completed,
            # Unix time the tracker first knew the deploy (a registration restored from
            # state keeps its own time); None for an unknown deploy (allowlist off).
            "added": round(min(known.added_at, known.registered_at or known.added_at), 3)
            if known
            else None,
            "peers": peers,
        }

    async def metrics_text(self, request: web.Request) -> web.Response:
        refused = self._stats_refused(request)
        if refused is not None:
            return refused
        self.registry.expire(time.monotonic())
        response = web.Response(body=prometheus_text(self.metrics))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

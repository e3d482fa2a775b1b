"""murder-tracker: the Service that ties the registry, HTTP, UDP and the disk together.

It learns deploys from ``*.torrent`` files in torrents_dir (watched with pyinotify: created,
moved in, deleted, moved out) and from POST /register, whose registrations it keeps in
state_dir (written atomically) so a restarted tracker still knows them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import sys
import time
from pathlib import Path

import prometheus_client
import pyinotify
from aiohttp import web

from .. import config, runtime, torrent
from ..fsutil import atomic_write
from . import http, udp
from . import registry as reg
from .http import TrackerHTTP
from .udp import TrackerUDP

log = logging.getLogger(__name__)

STATE_FILE = "registrations.json"
UDP_SECRET_FILE = "udp-secret"  # the key of the UDP tracker's connection ids
NOT_KEPT = "UDP connection ids will not outlive a restart"
STATE_VERSION = 1
WATCH_MASK = (
    pyinotify.IN_CLOSE_WRITE
    | pyinotify.IN_MOVED_TO
    | pyinotify.IN_DELETE
    | pyinotify.IN_MOVED_FROM
    | pyinotify.IN_DELETE_SELF
    | pyinotify.IN_MOVE_SELF
)
LISTEN_BACKLOG = 1024


def read_token(path: str) -> str | None:
    """The registration token, or None when registration is off (no file, or empty).

    The token guards who may add deploys: a file everyone can read is refused.
    """
    if not path:
        return None
    try:
        st = os.stat(path)
        if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
            raise runtime.StartupError(
                f"token_file {path} is readable or writable by everyone "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except OSError as exc:
        raise runtime.StartupError(f"token_file {path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise runtime.StartupError(f"token_file {path}: not UTF-8 text") from None
    if not token:
        log.warning("token_file %s is empty: POST /register is off", path)
        return None
    return token


def bind_listen_socket(listen: str) -> socket.socket:
    """A listening TCP socket for host:port; [::] is dual-stack (IPv4 peers too)."""
    host, port = config.split_hostport(listen)
    if host == "localhost":
        host = "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise runtime.StartupError(
            f"cannot listen on {listen} ([tracker] listen): {exc.strerror or exc}"
        ) from None
    return sock


class _WatchEvents(pyinotify.ProcessEvent):
    def my_init(self, service: TrackerService):
        self.service = service

    def process_default(self, event):
        self.service.on_watch_event(event)


class TrackerService(runtime.Service):
    name = "tracker"
    live_keys = frozenset(
        ("tracker", key)
        for key in (
            "interval",
            "min_interval",
            "allowlist",
            "trusted_networks",
            "numwant_max",
            "numwant_default",
            "peer_timeout",
            "max_peers_per_deploy",
            "max_deploys",
            "stats_networks",
        )
    )

    def __init__(self, cfg: config.Config):
        super().__init__(cfg)
        settings = cfg["tracker"]
        self.registry = reg.Registry(**self._registry_settings(settings))
        self.http = TrackerHTTP(self.registry, self, settings)
        # BEP 15 over the same rules, registry and counters (bound in start()).
        self.udp = TrackerUDP(self.http.core, self.http.metrics)
        self.torrents_dir = Path(settings["torrents_dir"])
        self.state_path = Path(settings["state_dir"]) / STATE_FILE
        self._files: dict[str, bytes] = {}  # torrent path -> info-hash it holds
        self._queue: asyncio.Queue | None = None
        self._pending: set[str] = set()
        self._notifier: pyinotify.AsyncioNotifier | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []

    @staticmethod
    def _registry_settings(settings: dict) -> dict:
        return {
            "allowlist": settings["allowlist"],
            "peer_timeout": settings["peer_timeout"] or 3 * settings["interval"],
            "max_peers_per_deploy": settings["max_peers_per_deploy"],
            "max_deploys": settings["max_deploys"],
            "subnet_prefix_v4": settings["subnet_prefix_v4"],
            "subnet_prefix_v6": settings["subnet_prefix_v6"],
        }

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.cfg["tracker"]
        sock = bind_listen_socket(settings["listen"])
        try:
            self.http.token = read_token(settings["token_file"])
            for key in ("state_dir", "torrents_dir"):
                try:
                    Path(settings[key]).mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise runtime.StartupError(
                        f"[tracker] {key} {settings[key]}: cannot create: {exc.strerror}"
                    ) from None
            udp_listen = self._udp_listen(settings)
            if udp_listen:
                self._start_udp(udp_listen)
            self._load_state()
            self._queue = asyncio.Queue()
            self._watch()
            await self._scan()
            self._tasks.append(asyncio.ensure_future(self._watch_worker()))
            self._tasks.append(asyncio.ensure_future(self._sweeper()))
            self._runner = web.AppRunner(
                self.http.make_app(), access_log=None, logger=http.server_log
            )
            await self._runner.setup()
            site = web.SockSite(self._runner, sock, backlog=LISTEN_BACKLOG)
            await site.start()
        except BaseException:
            sock.close()
            self.udp.close()
            raise
        log.info(
            "tracker listening on %s, UDP %s (allowlist %s, registration %s, torrents_dir %s)",
            settings["listen"],
            udp_listen or "off",
            "on" if settings["allowlist"] else "off",
            "on" if self.http.token else "off",
            self.torrents_dir,
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        if self._notifier is not None:
            self._notifier.stop()
            self._notifier = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.udp.close()

    @staticmethod
    def _udp_listen(settings: dict) -> str:
        """Where the UDP tracker listens ("" when it is off)."""
        if not settings["udp"]:
            return ""
        return settings["udp_listen"] or settings["listen"]

    def _start_udp(self, listen: str) -> None:
        key = "udp_listen" if self.cfg["tracker"]["udp_listen"] else "listen"
        host, port = config.split_hostport(listen)
        try:
            sock = udp.bind_socket(host, port)
        except OSError as exc:
            raise runtime.StartupError(
                f"cannot listen on {listen}/udp ([tracker] {key}; udp = no turns UDP off): "
                f"{exc.strerror or exc}"
            ) from None
        self.udp.secret = self._udp_secret()
        self.udp.open(sock)

    def _udp_secret(self) -> bytes:
        """The connection ids' key, kept in state_dir so that they outlive a restart."""
        path = Path(self.cfg["tracker"]["state_dir"]) / UDP_SECRET_FILE
        try:
            secret = path.read_bytes()
        except FileNotFoundError:
            secret = b""
        except OSError as exc:
            log.warning("cannot read %s (%s): %s", path, exc.strerror, NOT_KEPT)
            return os.urandom(udp.SECRET_BYTES)
        if len(secret) == udp.SECRET_BYTES:
            return secret
        if secret:
            log.warning("%s is not a %d-byte key: making a new one", path, udp.SECRET_BYTES)
        secret = os.urandom(udp.SECRET_BYTES)
        try:
            atomic_write(path, secret, mode=0o600)
        except OSError as exc:
            log.warning("cannot write %s (%s): %s", path, exc.strerror, NOT_KEPT)
        return secret

    async def reload(self, cfg: config.Config) -> None:
        self.cfg = cfg
        settings = cfg["tracker"]
        self.registry.configure(**self._registry_settings(settings))
        self.http.configure(settings)

    def status(self) -> str:
        deploys, seeders, leechers = self.registry.counts()
        line = f"{deploys} deploys, {seeders + leechers} peers, {self.http.announces} announces"
        if self.udp.serving:
            line += f" ({self.udp.announces} over UDP)"
        return line

    async def _sweeper(self) -> None:
        """Expire silent peers everywhere (announces expire their own swarm as they go)."""
        while True:
            await asyncio.sleep(max(1.0, min(self.registry.peer_timeout / 2, 30.0)))
            dropped = self.registry.expire(time.monotonic())
            if dropped:
                log.debug("expired %d silent peers", dropped)

    # -- torrents_dir ---------------------------------------------------------------------------

    def _watch(self) -> None:
        manager = pyinotify.WatchManager()
        loop = asyncio.get_running_loop()
        self._notifier = pyinotify.AsyncioNotifier(
            manager, loop, default_proc_fun=_WatchEvents(service=self)
        )
        try:
            result = manager.add_watch(str(self.torrents_dir), WATCH_MASK, quiet=False)
        except pyinotify.WatchManagerError as exc:
            raise runtime.StartupError(
                f"[tracker] torrents_dir {self.torrents_dir}: cannot watch: {exc}"
            ) from None
        if not result or min(result.values()) < 0:
            raise runtime.StartupError(
                f"[tracker] torrents_dir {self.torrents_dir}: cannot watch it with inotify"
            )

    def on_watch_event(self, event) -> None:
        if event.mask & pyinotify.IN_Q_OVERFLOW:
            log.warning("torrents_dir %s: inotify queue overflowed; rescanning", self.torrents_dir)
            for path in list(self._files) + self._list_torrents():
                self._enqueue(path)
        elif event.mask & (pyinotify.IN_DELETE_SELF | pyinotify.IN_MOVE_SELF):
            log.error(
                "torrents_dir %s was deleted or moved: new torrents are no longer seen "
                "until the tracker restarts",
                self.torrents_dir,
            )
        elif not event.dir and event.name.endswith(".torrent"):
            self._enqueue(event.pathname)

    def _enqueue(self, path: str) -> None:
        if path not in self._pending:
            self._pending.add(path)
            self._queue.put_nowait(path)

    def _list_torrents(self) -> list[str]:
        try:
            names = sorted(os.listdir(self.torrents_dir))
        except OSError as exc:
            log.error("torrents_dir %s: cannot list: %s", self.torrents_dir, exc.strerror)
            return []
        return [str(self.torrents_dir / n) for n in names if n.endswith(".torrent")]

    async def _scan(self) -> None:
        for path in self._list_torrents():
            await self._refresh(path)
        log.info(
            "torrents_dir %s: %d torrents, %d deploys known",
            self.torrents_dir,
            len(self._files),
            len(self.registry.known),
        )

    async def _watch_worker(self) -> None:
        # One path at a time, re-checked when its turn comes: the file's state then is what
        # counts, whatever order the events came in.
        while True:
            path = await self._queue.get()
            self._pending.discard(path)
            try:
                await self._refresh(path)
            except Exception:
                log.exception("torrents_dir: error handling %s", path)

    async def _refresh(self, path: str) -> None:
        """Make the registry agree with what path holds now (a torrent, garbage, nothing)."""
        loop = asyncio.get_running_loop()
        try:
            parsed = await loop.run_in_executor(None, torrent.load, path)
        except FileNotFoundError:
            parsed = None
        except (OSError, torrent.TorrentError) as exc:
            log.warning("torrents_dir: skipping %s: %s", path, getattr(exc, "strerror", 0) or exc)
            parsed = None
        old = self._files.pop(path, None)
        new = bytes.fromhex(parsed.info_hash) if parsed is not None else None
        if old is not None and old != new:
            known = self.registry.known.get(old)
            name = known.name if known else old.hex()
            if self.registry.remove_known(old, path):
                log.info("torrents_dir: %s gone: deploy %s (%s) forgotten", path, name, old.hex())
            else:
                log.info("torrents_dir: %s gone (deploy %s still known)", path, name)
        if parsed is None:
            return
        self._files[path] = new
        self.registry.add_known(new, parsed.name, parsed.total_size, path, _alias(parsed))
        if old != new:
            log.info(
                "torrents_dir: deploy %s (%s, %d bytes) from %s",
                parsed.name,
                parsed.info_hash,
                parsed.total_size,
                path,
            )

    # -- registrations (POST/DELETE /register) --------------------------------------------------

    def register(self, parsed: torrent.Torrent) -> reg.Known:
        info_hash = bytes.fromhex(parsed.info_hash)
        known = self.registry.known.get(info_hash)
        if known is not None and reg.REGISTERED in known.sources:
            self.registry.add_known(
                info_hash, parsed.name, parsed.total_size, reg.REGISTERED, _alias(parsed)
            )
            log.info("registration of deploy %s (%s) renewed", parsed.name, parsed.info_hash)
            return known
        evict = self.registry.registration_to_evict()
        if evict is not None:
            log.warning(
                "max_deploys (%d) registrations reached: dropping registration of %s (%s)",
                self.registry.max_deploys,
                evict.name,
                evict.info_hash.hex(),
            )
            self.registry.remove_known(evict.info_hash, reg.REGISTERED)
        known = self.registry.add_known(
            info_hash, parsed.name, parsed.total_size, reg.REGISTERED, _alias(parsed)
        )
        known.registered_at = time.time()
        try:
            self._save_state()
        except OSError:
            self.registry.remove_known(info_hash, reg.REGISTERED)
            raise
        log.info(
            "registered deploy %s (%s, %d bytes)",
            parsed.name,
            parsed.info_hash,
            parsed.total_size,
        )
        return known

    def unregister(self, info_hash: bytes) -> bool:
        known = self.registry.known.get(info_hash)
        if known is None or reg.REGISTERED not in known.sources:
            return False
        self.registry.remove_known(info_hash, reg.REGISTERED)
        try:
            self._save_state()
        except OSError:
            self.registry.add_known(info_hash, known.name, known.size, reg.REGISTERED)
            raise
        log.info("unregistered deploy %s (%s)", known.name, info_hash.hex())
        return True

    def _save_state(self) -> None:
        items = [
            {
                "info_hash": k.info_hash.hex(),
                "name": k.name,
                "size": k.size,
                "registered": k.registered_at,
                "alias": next(
                    (a.hex() for a, h in self.registry.aliases.items() if h == k.info_hash), None
                ),
            }
            for k in self.registry.registered()
        ]
        data = json.dumps({"version": STATE_VERSION, "registrations": items}, indent=1)
        try:
            atomic_write(self.state_path, data.encode() + b"\n", mode=0o640)
        except OSError as exc:
            log.error("cannot save registrations to %s: %s", self.state_path, exc.strerror)
            raise

    def _load_state(self) -> None:
        try:
            data = json.loads(self.state_path.read_bytes())
            items = data["registrations"]
            loaded = []
            for item in items:
                info_hash = bytes.fromhex(item["info_hash"])
                if len(info_hash) != 20 or not isinstance(item["name"], str):
                    raise ValueError(f"bad entry {item!r}")
                alias = bytes.fromhex(item["alias"]) if item.get("alias") else None
                loaded.append(
                    (info_hash, item["name"], int(item["size"]), item.get("registered"), alias)
                )
        except FileNotFoundError:
            return
        except OSError as exc:
            raise runtime.StartupError(f"cannot read {self.state_path}: {exc.strerror}") from None
        except (ValueError, KeyError, TypeError) as exc:
            aside = self.state_path.with_name(f"{STATE_FILE}.corrupt-{int(time.time())}")
            log.error(
                "%s is corrupt (%s): moved aside to %s; registrations must be redone",
                self.state_path,
                exc,
                aside,
            )
            try:
                os.replace(self.state_path, aside)
            except OSError as move_exc:
                raise runtime.StartupError(
                    f"{self.state_path} is corrupt and cannot be moved aside: {move_exc.strerror}"
                ) from None
            return
        for info_hash, name, size, registered_at, alias in loaded:
            known = self.registry.add_known(info_hash, name, size, reg.REGISTERED, alias)
            known.registered_at = float(registered_at or 0)
        log.info("loaded %d registrations from %s", len(loaded), self.state_path)


def _alias(parsed: torrent.Torrent) -> bytes | None:
    return bytes.fromhex(parsed.v2_alias) if parsed.v2_alias else None


def main() -> None:
    # *_created series only add noise to a daemon's /metrics (older clients lack the switch).
    if hasattr(prometheus_client, "disable_created_metrics"):
        prometheus_client.disable_created_metrics()
    sys.exit(runtime.run(TrackerService))

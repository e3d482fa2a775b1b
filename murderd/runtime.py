"""The daemon runtime shared by murder-tracker, murder-seeder and murder-peer.

It owns what every daemon needs and none should write again: command line, config loading
(exit 78 on a bad config), logging to ``<log dir>/<daemon>.log`` through WatchedFileHandler,
signals (TERM/INT stop, HUP reload), sd_notify readiness, status and watchdog, and the
asyncio loop.  A daemon is a :class:`Service`; ``run(ServiceClass)`` does the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.handlers
import os
import signal
import sys
import time
from pathlib import Path

import sdnotify

from . import __version__, config

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
STATUS_REFRESH_SECONDS = 2.0
NOTIFY_TIMEOUT = 1.0


class StartupError(Exception):
    """The daemon cannot start (port in use, directory missing ...); the message says why."""


class Service:
    """One daemon's own work.  Subclasses set ``name`` and override the coroutines."""

    name = "murderd"
    # (section, key) pairs a reload applies without a restart; "log" is handled here.
    live_keys: frozenset = frozenset()

    def __init__(self, cfg: config.Config):
        self.cfg = cfg

    async def start(self) -> None:
        """Bind sockets, set watches; return once the daemon really serves."""

    async def stop(self) -> None:
        """Stop serving and save state."""

    async def reload(self, cfg: config.Config) -> None:
        """Apply the live keys of a new config (only called with changed live keys)."""
        self.cfg = cfg

    def status(self) -> str:
        """One human line for sd_notify STATUS= (systemctl status shows it)."""
        return "running"


class Notifier:
    """sd_notify through sdnotify; a no-op when NOTIFY_SOCKET is unset (not under systemd)."""

    def __init__(self):
        self._sd = sdnotify.SystemdNotifier()
        self._last_status = None

    def send(self, *lines: str, wait: bool = True) -> bool:
        """Send lines to systemd; False when they could not be sent.

        The socket holds only a few datagrams (net.unix.max_dgram_qlen) until systemd reads
        them, and a blocking send would stall the event loop, SIGTERM included, for as long
        as systemd does not read: a state change (READY, STOPPING ...) waits at most
        NOTIFY_TIMEOUT, a STATUS or WATCHDOG line (wait=False) is dropped at once.
        """
        sock = self._sd.socket
        if not os.environ.get("NOTIFY_SOCKET") or sock is None:
            return False
        try:
            sock.settimeout(NOTIFY_TIMEOUT if wait else 0)
            sock.sendall("\n".join(lines).encode())
        except OSError:
            return False
        return True

    def status(self, text: str) -> None:
        if text != self._last_status and self.send(f"STATUS={text}", wait=False):
            self._last_status = text

    @staticmethod
    def watchdog_interval() -> float | None:
        """Half of WATCHDOG_USEC in seconds, when systemd asks for a watchdog for this PID."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return max(int(usec) / 2e6, 0.05)
        except ValueError:
            return None


def setup_logging(cfg: config.Config, name: str, force_stderr: bool = False) -> None:
    """Log to <dir>/<name>.log (WatchedFileHandler follows logrotate) and maybe stderr."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(LOG_FORMAT)
    log_dir = Path(cfg["log"]["dir"])
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.WatchedFileHandler(log_dir / f"{name}.log", encoding="utf-8")
    except OSError as exc:
        raise StartupError(f"cannot open log file in {log_dir}: {exc}") from None
    handler.setFormatter(formatter)
    root.addHandler(handler)
    if force_stderr or cfg["log"]["stderr"]:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(formatter)
        root.addHandler(stream)
    root.setLevel(cfg["log"]["level"].upper())
    # pyinotify installs its own stderr handler at import: route it through ours instead.
    pyinotify_log = logging.getLogger("pyinotify")
    for handler in list(pyinotify_log.handlers):
        pyinotify_log.removeHandler(handler)
    pyinotify_log.propagate = True
    logging.captureWarnings(True)


def parse_args(prog: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=f"{prog} (murderd {__version__})")
    parser.add_argument(
        "--config",
        "-c",
        default=None,
        help=f"config file (default {config.DEFAULT_PATH}; conf.d/*.conf beside it override)",
    )
    parser.add_argument("--stderr", action="store_true", help="also log to stderr")
    parser.add_argument("--version", action="version", version=f"murderd {__version__}")
    return parser.parse_args(argv)


class Runner:
    """Drives one Service through start, reloads and stop on one asyncio loop."""

    def __init__(self, service_cls, cfg: config.Config, config_path: str | None):
        self.service_cls = service_cls
        self.cfg = cfg
        self.config_path = config_path
        self.notifier = Notifier()
        self.service: Service | None = None
        self._stop: asyncio.Event | None = None  # made in run(): 3.9 binds it to a loop
        self._reload_pending = False
        self._reloading = False

    def _request_stop(self, signum: int) -> None:
        if not self._stop.is_set():
            log.info("received %s: stopping", signal.Signals(signum).name)
        self._stop.set()

    def _request_reload(self) -> None:
        # Repeated SIGHUPs during a reload are merged into one more reload.
        self._reload_pending = True
        if not self._reloading:
            asyncio.get_running_loop().create_task(self._reload_loop())

    async def _reload_loop(self) -> None:
        self._reloading = True
        try:
            while self._reload_pending and not self._stop.is_set():
                self._reload_pending = False
                await self._reload_once()
        finally:
            self._reloading = False

    async def _reload_once(self) -> None:
        monotonic_usec = int(time.monotonic() * 1e6)
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")
        log.info("received SIGHUP: reloading configuration")
        try:
            new = config.load(self.config_path)
        except config.ConfigError as exc:
            for line in exc.problems:
                log.error("reload refused, keeping the running configuration: %s", line)
            self.notifier.send("READY=1")
            return
        changed = config.changed_keys(self.cfg, new)
        live = [k for k in changed if k[0] == "log" or k in self.service.live_keys]
        for section, key in changed:
            if (section, key) not in live:
                log.warning(
                    "[%s] %s changed from %r to %r: takes effect after a restart",
                    section,
                    key,
                    self.cfg[section][key],
                    new[section][key],
                )
        # Keys that need a restart keep their running values.
        effective = config.Config({s: dict(v) for s, v in self.cfg.items()}, new.files, new.origin)
        for section, key in live:
            effective[section][key] = new[section][key]
        if any(section == "log" for section, _ in live):
            setup_logging(effective, self.service.name)
        try:
            await self.service.reload(effective)
        except Exception:
            log.exception("reload failed; the daemon keeps running")
        self.cfg = effective
        for section, key in live:
            log.info("[%s] %s is now %r", section, key, effective[section][key])
        log.info("reload done (%d changed, %d applied)", len(changed), len(live))
        self.notifier.send("READY=1")

    async def _status_loop(self) -> None:
        while True:
            try:
                self.notifier.status(self.service.status())
            except Exception:
                log.exception("status line failed")
            await asyncio.sleep(STATUS_REFRESH_SECONDS)

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            self.notifier.send("WATCHDOG=1", wait=False)
            await asyncio.sleep(interval)

    async def run(self) -> int:
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._request_stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)
        self.service = self.service_cls(self.cfg)
        name = self.service.name
        log.info("murder-%s %s starting (pid %d)", name, __version__, os.getpid())
        try:
            await self.service.start()
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            self.notifier.send(f"STATUS=cannot start: {exc}")
            await self._stop_service()
            return 1
        helpers = [loop.create_task(self._status_loop())]
        interval = Notifier.watchdog_interval()
        if interval:
            helpers.append(loop.create_task(self._watchdog_loop(interval)))
        self.notifier.send("READY=1", f"STATUS={self.service.status()}")
        log.info("murder-%s ready: %s", name, self.service.status())
        await self._stop.wait()
        self.notifier.send("STOPPING=1", "STATUS=stopping")
        code = await self._stop_service()
        for task in helpers:
            task.cancel()
        log.info("murder-%s stopped", name)
        return code

    async def _stop_service(self) -> int:
        timeout = self.cfg["daemon"]["stop_timeout"]
        try:
            await asyncio.wait_for(self.service.stop(), timeout)
        except asyncio.TimeoutError:
            log.error("stop took longer than %ss; exiting anyway", timeout)
            return 1
        except Exception:
            log.exception("error while stopping")
            return 1
        return 0


MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt() parameter


def cap_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """At most this many glibc malloc arenas (as MALLOC_ARENA_MAX would), before any thread.

    glibc gives each thread that allocates an arena of its own and keeps what is freed
    there for reuse: with libtorrent's disk threads allocating the pieces a peer reads
    back (digest.py) and the main thread freeing them, a peer fetching 2 GiB peaked at
    97-105 MiB RSS instead of 79 (bench/peermem.py; capped at 2: 78 MiB, as fast).
    True when glibc took it (no glibc, e.g. musl: False, nothing changes).
    """
    try:
        import ctypes

        return bool(ctypes.CDLL(None).mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def run(service_cls, argv: list[str] | None = None) -> int:
    """Entry point of a daemon: parse args, load config, log, serve until stopped."""
    cap_malloc_arenas()
    prog = f"murder-{service_cls.name}"
    args = parse_args(prog, argv)
    cfg = config.load_or_report(args.config, prog)
    if cfg is None:
        return config.EX_CONFIG
    if os.geteuid() == 0 and not cfg["daemon"]["allow_root"]:
        where = cfg.source("daemon", "allow_root")
        print(
            f"{prog}: refusing to run as root; run as the murderd user, "
            f"or set [daemon] allow_root = yes ({where})",
            file=sys.stderr,
        )
        return config.EX_CONFIG
    try:
        setup_logging(cfg, service_cls.name, force_stderr=args.stderr)
    except StartupError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(Runner(service_cls, cfg, args.config).run())
    except Exception:
        log.exception("murder-%s crashed", service_cls.name)
        return 1

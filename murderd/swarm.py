"""What the seeder and the peer share: a daemon that takes part in a swarm.

It owns the libtorrent session and its alert pump, an HTTP client, the drop-directory
watcher, background tasks and the executor for slow work, and takes them down in the one
safe order.  Each daemon adds its own work on top (murderd/seeder.py, murderd/peer.py).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp

from . import fsutil, runtime
from .lt import AlertPump, apply_rate_limits, lan_settings, make_session
from .watch import DropWatcher

log = logging.getLogger(__name__)


class SwarmService(runtime.Service):
    section = ""  # the config section: "seeder" or "peer"
    fingerprint = "-MD0100-"  # libtorrent peer-id prefix: tells seeders from peers

    def __init__(self, cfg, pool_name: str):
        super().__init__(cfg)
        self.pool = ThreadPoolExecutor(2, thread_name_prefix=pool_name)
        # libtorrent queries that wait on its network thread (status, peer lists: 7-40 ms
        # each with 16 peers on 2 cores in bench/) run here, one at a time, off the loop.
        self.queries = ThreadPoolExecutor(1, thread_name_prefix=f"{pool_name}-lt")
        self.session = None
        self.pump: AlertPump | None = None
        self.watcher: DropWatcher | None = None
        self.http = None
        self.client: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task] = set()

    @property
    def conf(self) -> dict:
        return self.cfg[self.section]

    def make_dirs(self, *directories: Path) -> None:
        for directory in directories:
            try:
                fsutil.ensure_dir(directory)
            except OSError as exc:
                raise runtime.StartupError(f"cannot create {directory}: {exc.strerror}") from None

    def start_session(self, *, seeder: bool = False, **client_options) -> None:
        """The libtorrent session (LAN settings from the config), its alerts, an HTTP client."""
        c = self.conf
        self.session = make_session(
            lan_settings(
                c["listen_interfaces"] or f"0.0.0.0:{c['listen_port']}",
                upload_rate_limit=c["upload_rate_limit"],
                download_rate_limit=c.get("download_rate_limit", 0),
                announce_ip=c["announce_ip"],
                seeder=seeder,
                fingerprint=self.fingerprint,
            )
        )
        self.pump = AlertPump(self.session, self._alert)
        self.client = aiohttp.ClientSession(**client_options)

    def start_watcher(self, directory: Path, **callbacks) -> None:
        self.watcher = DropWatcher(
            directory, ignore_suffixes=tuple(self.conf["ignore_suffixes"]), **callbacks
        )
        try:
            self.watcher.start()
        except OSError as exc:
            raise runtime.StartupError(str(exc)) from None

    def _alert(self, alert) -> None:
        """Handle one libtorrent alert (on the loop)."""

    async def ask(self, call, *args):
        """call(*args) on the queries thread (a libtorrent query: it releases the GIL)."""
        return await asyncio.get_running_loop().run_in_executor(self.queries, call, *args)

    def spawn(self, coro) -> asyncio.Task:
        """A background task, cancelled at stop."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def stop(self) -> None:
        if self.watcher:
            self.watcher.stop()
        for task in list(self.tasks):
            task.cancel()
        if self.session is not None:
            self.session.pause()
            await self.save()
        if self.http:
            await self.http.cleanup()
        if self.client:
            await self.client.close()
        # A query under way ends before the session goes (its tasks are cancelled already).
        self.queries.shutdown(wait=True, cancel_futures=True)
        self.session = None  # the pump holds the last reference and shuts libtorrent down
        if self.pump:
            self.pump.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def save(self) -> None:
        """Save what must survive a restart; the session is paused, still alive."""

    async def reload(self, cfg) -> None:
        self.cfg = cfg
        c = self.conf
        apply_rate_limits(self.session, c["upload_rate_limit"], c.get("download_rate_limit", 0))
        if self.watcher:
            self.watcher.ignore_suffixes = tuple(c["ignore_suffixes"])

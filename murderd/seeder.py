"""murder-seeder: drop dir -> torrent -> publish -> seed.

A file (or a directory moved in) that settles in ``[seeder] drop_dir`` is hashed into a torrent
off the event loop, written atomically as ``<name>.torrent`` into ``publish_dir``, registered
with the tracker(s) when a token is configured, and seeded without a second hash pass.  The
HTTP server publishes ``/torrents/<name>.torrent`` and ``/index.json``.  A restart seeds the
published deploys again, rehashing only files whose size or mtime changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import sys
import time
from pathlib import Path
from urllib.parse import quote

import aiohttp
from aiohttp import web
from prometheus_client import Counter, Gauge

from . import fsutil, httpserver, metrics, piecehttp, runtime, slices, torrent
from .lt import lt
from .swarm import SwarmService

log = logging.getLogger(__name__)

STATE_FILE = "deploys.json"
REGISTER_RETRY_SECONDS = (1, 2, 5, 10, 30)
INDEX_MAX_WAIT = 60.0  # longest a GET /index.json?wait= is held open (seconds)


class Deploy:
    """One published deploy: its torrent, where its data is, and its libtorrent handle."""

    def __init__(self, name: str, made: dict):
        self.name = name
        self.info_hash = made["info_hash"]
        self.size = made["size"]
        self.created = made["created"]
        self.sources = made["sources"]  # [[abspath, size, mtime_ns]]
        self.handle = None
        self.info = None  # its libtorrent torrent_info, once seeded (pieces served over HTTP)
        self.dealer: slices.Dealer | None = None  # who owns which piece (slices.py); not kept

    def record(self) -> dict:
        return {
            "info_hash": self.info_hash,
            "size": self.size,
            "created": self.created,
            "sources": self.sources,
        }

    def unchanged_on_disk(self) -> bool:
        for path, size, mtime_ns in self.sources:
            try:
                st = os.lstat(path)
            except OSError:
                return False
            if st.st_size != size or st.st_mtime_ns != mtime_ns:
                return False
        return True


class SeederService(SwarmService):
    name = "seeder"
    section = "seeder"
    fingerprint = "-MS0100-"
    live_keys = frozenset(
        {
            ("seeder", "upload_rate_limit"),
            ("seeder", "ignore_suffixes"),
            ("seeder", "slices"),
            ("seeder", "slices_http"),
        }
    )

    def __init__(self, cfg):
        super().__init__(cfg, pool_name="hash")
        c = cfg["seeder"]
        self.drop_dir = Path(c["drop_dir"])
        self.publish_dir = Path(c["publish_dir"])
        self.state_dir = Path(c["state_dir"])
        self.deploys: dict[str, Deploy] = {}
        self.hashing: dict[str, asyncio.Task] = {}
        self.rehash_wanted: set[str] = set()
        self.token = ""
        self.published_total = 0
        self.metrics = metrics.DaemonMetrics("seeder", lambda: self.session)
        # index.json's generation: changes whenever the list of deploys does.  Unique to this
        # process, so that a follower holding a generation from before a restart is answered
        # at once.
        self.index_boot = os.urandom(4).hex()
        self.index_count = 0
        self.index_event: asyncio.Event | None = None  # set when the followers are answered
        self.index_closed = False
        self.followers = slices.Followers()  # who follows index.json (for slices)
        self.rebalancing: asyncio.Task | None = None
        Gauge(
            "murderd_seeder_followers",
            "Peers following index.json now (a long poll open, or answered in the last 10 s)",
            registry=self.metrics.registry,
        ).set_function(lambda: len(self.followers.live(time.monotonic())))
        self.pieces_served = Counter(
            "murderd_seeder_piece_http_bytes",
            "Bytes of pieces served to following peers over HTTP (their slices)",
            registry=self.metrics.registry,
        )
        self.slice_moves = Counter(
            "murderd_seeder_slice_moves",
            "Times the seeder moved the rest of a lagging slice to a peer about to run out",
            registry=self.metrics.registry,
        )

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        c = self.cfg["seeder"]
        self.make_dirs(self.drop_dir, self.publish_dir, self.state_dir)
        if c["token_file"]:
            try:
                mode = os.stat(c["token_file"]).st_mode
                self.token = Path(c["token_file"]).read_text().strip()
            except OSError as exc:
                raise runtime.StartupError(
                    f"cannot read token_file {c['token_file']}: {exc.strerror}"
                ) from None
            if mode & (stat.S_IROTH | stat.S_IWOTH):  # as the tracker: a secret stays private
                raise runtime.StartupError(
                    f"token_file {c['token_file']} is readable or writable by everyone "
                    f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {c['token_file']}"
                )
        self.start_session(seeder=True, timeout=aiohttp.ClientTimeout(total=10))
        self._restore()
        self.http = await httpserver.serve(self._app(), c["http_listen"], "torrent server")
        self.start_watcher(
            self.drop_dir, on_ready=self._dropped, on_gone=self._gone, on_refused=self._refused
        )

    async def stop(self) -> None:
        for task in list(self.hashing.values()):
            task.cancel()
        self.index_closed = True
        self._wake_index_waiters()  # answer the followers waiting on index.json now
        await super().stop()

    def status(self) -> str:
        seeding = len(self.deploys)
        peers = 0
        rate = 0
        for deploy in self.deploys.values():
            if deploy.handle is not None and deploy.handle.is_valid():
                st = deploy.handle.status()
                peers += st.num_peers
                rate += st.upload_rate
        return (
            f"{seeding} deploys seeding, {len(self.hashing)} hashing, {peers} peers, "
            f"up {rate / 1e6:.1f} MB/s"
        )

    # --- state ------------------------------------------------------------------------

    def _state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def _save_state(self) -> None:
        data = {name: d.record() for name, d in self.deploys.items()}
        fsutil.atomic_write_json(self._state_path(), {"version": 1, "deploys": data})
        self._index_changed()

    # --- index.json long polling ------------------------------------------------------

    @property
    def index_generation(self) -> str:
        return f"{self.index_boot}-{self.index_count}"

    def follower_generation(self, follower: str | None) -> str:
        """The index's generation as this follower sees it: its slices' moves count too."""
        moved = 0
        if follower is not None:
            moved = sum(d.dealer.version(follower) for d in self.deploys.values() if d.dealer)
        return f"{self.index_generation}.{moved}" if moved else self.index_generation

    def _index_changed(self) -> None:
        """The deploy list changed: a new generation, and every waiting follower answered."""
        self.index_count += 1
        self._wake_index_waiters()

    def _wake_index_waiters(self) -> None:
        if self.index_event is not None:
            self.index_event.set()
            self.index_event = None

    async def _index_wait(self, after: str, wait: float, follower: str | None) -> None:
        """Hold a GET /index.json?after=G&wait=S until the generation moves on or S passes."""
        deadline = time.monotonic() + min(wait, INDEX_MAX_WAIT)
        while after == self.follower_generation(follower) and not self.index_closed:
            left = deadline - time.monotonic()
            if not left > 0:
                return
            if self.index_event is None:
                self.index_event = asyncio.Event()
            try:
                await asyncio.wait_for(self.index_event.wait(), left)
            except asyncio.TimeoutError:
                return

    def _restore(self) -> None:
        """Seed what was published before a restart; unchanged files are not rehashed."""
        try:
            saved = fsutil.read_json(self._state_path()).get("deploys", {})
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("cannot read %s (%s): every deploy will be rehashed", self._state_path(), exc)
            return
        for name, record in saved.items():
            deploy = Deploy(name, record)
            torrent_path = self._torrent_path(name)
            if not deploy.unchanged_on_disk() or not torrent_path.exists():
                log.info("deploy %s changed or vanished while stopped: republishing", name)
                self._unpublish_files(name)
                continue
            try:
                parsed = torrent.load(torrent_path)
            except (OSError, torrent.TorrentError) as exc:
                log.warning("published torrent %s unusable (%s): rehashing", torrent_path, exc)
                continue
            self.deploys[name] = deploy
            self._seed(deploy, parsed)
            log.info("deploy %s (%s) restored without rehashing", name, deploy.info_hash)
        self._save_state()

    # --- drop dir events --------------------------------------------------------------

    def _dropped(self, path: Path) -> None:
        name = path.name
        try:
            torrent.check_name(name)
        except torrent.TorrentError as exc:
            log.error("ignoring %s: %s", path, exc)
            return
        current = self.deploys.get(name)
        if current is not None and current.unchanged_on_disk():
            log.debug("deploy %s unchanged, already seeding", name)
            return
        if name in self.hashing:
            self.rehash_wanted.add(name)  # changed again while hashing: hash once more after
            return
        self.hashing[name] = asyncio.get_running_loop().create_task(self._publish(path))

    def _gone(self, path: Path) -> None:
        name = path.name
        task = self.hashing.pop(name, None)
        self.rehash_wanted.discard(name)
        if task:
            task.cancel()
            log.warning("deploy %s: deleted or moved away while being hashed: not published", name)
        if name in self.deploys:
            log.info("deploy %s removed from the drop dir: unpublishing", name)
            self._unpublish(name)

    def _refused(self, path: Path, kind: str) -> None:
        log.warning("ignoring %s in the drop dir: %s (deploys must be regular files)", path, kind)

    # --- publishing -------------------------------------------------------------------

    async def _publish(self, path: Path) -> None:
        try:
            await self._publish_once(path)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("deploy %s: publishing failed", path.name)

    async def _publish_once(self, path: Path) -> None:
        name = path.name
        c = self.cfg["seeder"]
        started = time.monotonic()
        log.info("deploy %s: hashing %s", name, path)
        try:
            made = await asyncio.get_running_loop().run_in_executor(
                self.pool,
                lambda: torrent.make_torrent(
                    path, c["trackers"], c["piece_size"], c["torrent_format"]
                ),
            )
        except torrent.FileChangedError as exc:
            # Still being written: hashing again at once would loop for as long as the
            # writer writes; its close (or a move into place) is the next event.
            log.warning(
                "deploy %s: %s: not published; hashed again once it is closed or moved in",
                name,
                exc,
            )
            made = None
        except (torrent.TorrentError, OSError) as exc:
            log.error("deploy %s: cannot make a torrent: %s", name, exc)
            self.metrics.deploy_failed()
            made = None
        finally:
            self.hashing.pop(name, None)
        if name in self.rehash_wanted:
            self.rehash_wanted.discard(name)
            if path.exists():
                self._dropped(path)
            return
        if made is None:
            return
        elapsed = time.monotonic() - started
        log.info(
            "deploy %s: hashed %d bytes in %.2fs (%.0f MB/s), info-hash %s, sha256 %s",
            name,
            made.total_size,
            elapsed,
            made.total_size / max(elapsed, 1e-6) / 1e6,
            made.info_hash,
            ", ".join(f"{k}={v}" for k, v in made.sha256.items()) if len(made.sha256) < 4 else "…",
        )
        old = self.deploys.pop(name, None)
        if old is not None and old.info_hash != made.info_hash:
            log.info("deploy %s replaced: %s -> %s", name, old.info_hash, made.info_hash)
            self._remove_from_session(old)
            self._unregister(old)
        deploy = Deploy(
            name,
            {
                "info_hash": made.info_hash,
                "size": made.total_size,
                "created": time.time(),
                "sources": [[s.abspath, s.size, s.mtime_ns] for s in made.sources],
            },
        )
        fsutil.atomic_write(self._torrent_path(name), made.data)
        parsed = torrent.parse(made.data)
        if self.cfg["seeder"]["slices"]:  # before _save_state() answers the followers
            members = self.followers.assign(time.monotonic())
            if members:
                deploy.dealer = slices.Dealer(
                    members,
                    parsed.info.num_pieces(),
                    time.monotonic(),
                    on_out=lambda: self._all_out(deploy),
                )
                log.info("deploy %s: %d slices for the peers following", name, len(members))
        self.deploys[name] = deploy
        self._save_state()
        self._seed(deploy, parsed)
        if deploy.dealer is not None and (self.rebalancing is None or self.rebalancing.done()):
            self.rebalancing = self.spawn(self._rebalance_loop())
        self.published_total += 1
        self.metrics.deploy_completed(time.monotonic() - started)
        log.info("deploy %s published at %s", name, self.torrent_url(name))
        self.spawn(self._register(deploy, made.data))

    async def _rebalance_loop(self) -> None:
        """Every slices.REBALANCE_EVERY s while a new deploy's pieces are not all out.

        Reading every peer's bitfield costs CPU in a big swarm: the pause after a look is at
        least REBALANCE_COST times as long as the look took.
        """
        while True:
            started = time.monotonic()
            dealers = [
                d for d in self.deploys.values()
                if d.dealer is not None and not d.dealer.done
                and d.dealer.count <= slices.REBALANCE_MAX_SLICES
                and started - d.dealer.dealt_at < slices.REBALANCE_FOR
            ]  # fmt: skip
            if not dealers:
                return
            for deploy in dealers:
                if deploy.handle is None or not deploy.handle.is_valid():
                    continue
                dealer = deploy.dealer
                for peer in deploy.handle.get_peer_info():
                    dealer.saw(peer.pieces)
                moves = dealer.moves
                if dealer.rebalance(time.monotonic()):
                    self.slice_moves.inc(dealer.moves - moves)
                    log.debug(
                        "deploy %s: slices rebalanced (%d moves so far, %d pieces not out)",
                        deploy.name, dealer.moves, dealer.left,
                    )  # fmt: skip
                    self._wake_index_waiters()
            took = time.monotonic() - started
            await asyncio.sleep(max(slices.REBALANCE_EVERY, slices.REBALANCE_COST * took))

    def _all_out(self, deploy: Deploy) -> None:
        """Every piece has left once (slices.Dealer.on_out): the followers hear it
        (index.json "out") at once.  The log says what went over BitTorrent before: the
        followers that took their slices over HTTP kept it away until now."""
        dealer = deploy.dealer
        handle = deploy.handle
        valid = handle is not None and handle.is_valid()
        over_bt = handle.status(0).total_payload_upload if valid else 0  # no piece lists
        log.info(
            "deploy %s: every piece is out (%d slice moves, %d pieces taken from other slices; "
            "%d bytes sent over BitTorrent before)",
            deploy.name, dealer.moves, dealer.steals, over_bt,
        )  # fmt: skip
        self._wake_index_waiters()

    def _seed(self, deploy: Deploy, parsed: torrent.Torrent) -> None:
        params = lt.add_torrent_params()
        params.ti = parsed.info
        params.save_path = str(self.drop_dir)  # relpaths start at the dropped entry
        params.flags = lt.torrent_flags.seed_mode
        deploy.handle = self.session.add_torrent(params)
        deploy.info = parsed.info

    def _remove_from_session(self, deploy: Deploy) -> None:
        if deploy.handle is not None and deploy.handle.is_valid():
            self.session.remove_torrent(deploy.handle)
        deploy.handle = None

    def _unpublish(self, name: str) -> None:
        deploy = self.deploys.pop(name)
        self._remove_from_session(deploy)
        self._unpublish_files(name)
        self._save_state()
        self._unregister(deploy)

    def _unpublish_files(self, name: str) -> None:
        try:
            self._torrent_path(name).unlink()
        except FileNotFoundError:
            pass

    def _torrent_path(self, name: str) -> Path:
        return self.publish_dir / f"{name}.torrent"

    def base_url(self) -> str:
        c = self.cfg["seeder"]
        if c["public_url"]:
            return c["public_url"].rstrip("/")
        host, port = c["http_listen"].rsplit(":", 1)
        host = host.strip("[]")
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    def torrent_url(self, name: str) -> str:
        return f"{self.base_url()}/torrents/{quote(name)}.torrent"

    # --- tracker registration ---------------------------------------------------------

    def _register_urls(self) -> list[str]:
        """Where deploys are registered: each murder-tracker named in trackers, over HTTP.

        A udp:// announce URL registers at http:// on the same host and port (murder-tracker
        serves both on one port unless [tracker] udp_listen moves UDP elsewhere).
        """
        urls = []
        for announce in self.cfg["seeder"]["trackers"]:
            if not announce.endswith("/announce"):
                continue
            base = announce[: -len("/announce")]
            if base.startswith("udp://"):
                base = "http://" + base[len("udp://") :]
            elif not base.startswith(("http://", "https://")):
                continue
            if base + "/register" not in urls:
                urls.append(base + "/register")
        return urls

    async def _register(self, deploy: Deploy, data: bytes) -> None:
        if not self.token:
            return
        headers = {"Authorization": f"Bearer {self.token}"}
        for url in self._register_urls():
            for attempt, delay in enumerate((0,) + REGISTER_RETRY_SECONDS):
                await asyncio.sleep(delay)
                if self.deploys.get(deploy.name) is not deploy:
                    return  # replaced or removed meanwhile
                try:
                    async with self.client.post(url, data=data, headers=headers) as resp:
                        body = await resp.text()
                        if resp.status == 200:
                            log.info("deploy %s registered with %s", deploy.name, url)
                            if deploy.handle is not None and deploy.handle.is_valid():
                                deploy.handle.force_reannounce()
                            break
                        log.error(
                            "deploy %s: %s refused registration (%s): %s",
                            deploy.name,
                            url,
                            resp.status,
                            body[:200],
                        )
                        if resp.status in (400, 401, 403):
                            break  # retrying won't help
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    log.warning(
                        "deploy %s: registering with %s failed (attempt %d): %s",
                        deploy.name,
                        url,
                        attempt + 1,
                        exc or type(exc).__name__,
                    )

    def _unregister(self, deploy: Deploy) -> None:
        if self.token:
            self.spawn(self._unregister_async(deploy))

    async def _unregister_async(self, deploy: Deploy) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        for url in self._register_urls():
            try:
                async with self.client.delete(f"{url}/{deploy.info_hash}", headers=headers):
                    pass
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                log.warning("deploy %s: unregistering from %s failed: %s", deploy.name, url, exc)

    # --- libtorrent alerts ------------------------------------------------------------

    def _alert(self, alert) -> None:
        if self.metrics.on_alert(alert):
            return
        if isinstance(alert, (lt.tracker_error_alert, lt.torrent_error_alert, lt.file_error_alert)):
            log.warning("libtorrent: %s", alert.message())
        elif isinstance(alert, lt.listen_failed_alert):
            log.error("libtorrent: %s", alert.message())
        else:
            log.debug("libtorrent: %s", alert.message())

    # --- HTTP -------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/index.json", self._index)
        app.router.add_get("/torrents/{file}", self._torrent_file)
        app.router.add_get("/pieces/{info_hash}/{index}", self._piece)
        app.router.add_get("/healthz", lambda request: web.Response(text="ok\n"))
        app.router.add_get("/metrics", self.metrics.handle)
        return app

    def index(self, follower: str | None = None) -> list[dict]:
        """The deploys; for a follower given a slice of one, its "slice": [index, count]."""
        out = []
        for d in sorted(self.deploys.values(), key=lambda d: d.created):
            valid = d.handle is not None and d.handle.is_valid()
            st = d.handle.status() if valid else None
            item = {
                "name": d.name,
                "info_hash": d.info_hash,
                "size": d.size,
                "created": d.created,
                "url": self.torrent_url(d.name),
                "uploaded": st.all_time_upload if st else 0,
                "peers": st.num_peers if st else 0,
            }
            part = d.dealer.part(follower) if d.dealer and follower is not None else None
            if part is not None:
                item["slice"] = [part.index, part.count]
                if part.added:
                    item["slice_add"] = list(part.added)
                if part.dropped:
                    item["slice_drop"] = list(part.dropped)
                if part.out:
                    item["out"] = True
                if self.cfg["seeder"]["slices_http"]:
                    item["pieces"] = f"{self.base_url()}/pieces/{d.info_hash}/"
            out.append(item)
        return out

    async def _index(self, request: web.Request) -> web.Response:
        """The deploys; with ?after=GENERATION&wait=SECONDS, a long poll (followers use it).

        Without the parameters (or with ones it cannot read) it answers at once, like the
        plain file a web server would serve instead.
        """
        after = request.query.get("after")
        follower = slices.follower_id(request.query.get("peer"))
        if follower is not None:
            self.followers.enter(follower)
        try:
            if after is not None:
                try:
                    wait = float(request.query.get("wait", "0"))
                except ValueError:
                    wait = 0.0
                await self._index_wait(after, wait, follower)
        finally:
            if follower is not None:
                self.followers.leave(follower, time.monotonic())
        if self.index_closed:
            # Not an unchanged index (a follower would take it for a server that does not
            # long-poll, and wait follow_interval): an error, retried soon.
            raise web.HTTPServiceUnavailable(text="the seeder is stopping\n")
        deploys = self.index(follower)
        generation = self.follower_generation(follower)
        return web.json_response({"generation": generation, "deploys": deploys})

    async def _torrent_file(self, request: web.Request) -> web.StreamResponse:
        file = request.match_info["file"]
        if not file.endswith(".torrent") or file[: -len(".torrent")] not in self.deploys:
            raise web.HTTPNotFound(text="no such deploy\n")
        path = self._torrent_path(file[: -len(".torrent")])
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise web.HTTPNotFound(text="no such deploy\n") from None
        return web.Response(body=data, content_type="application/x-bittorrent")

    async def _piece(self, request: web.Request) -> web.Response:
        """One piece of a deploy: a follower's slice, taken over HTTP (piecehttp.py)."""
        if not self.cfg["seeder"]["slices_http"]:
            raise web.HTTPNotFound(text="pieces are not served (slices_http off)\n")
        info_hash, raw = request.match_info["info_hash"], request.match_info["index"]
        deploy = next((d for d in self.deploys.values() if d.info_hash == info_hash), None)
        if deploy is None or deploy.info is None:
            raise web.HTTPNotFound(text="no such deploy\n")
        dealer = deploy.dealer
        if raw == piecehttp.STREAM:
            return await self._stream(request, deploy)
        if raw == piecehttp.NEXT:
            # The follower's next piece, dealt now (slices.Dealer.take); none left: 204.
            index = dealer.take(self._follower(request, dealer))  # the last: _all_out()
            if index is None:
                return web.Response(status=204)
        elif not (raw.isascii() and raw.isdigit()) or int(raw) >= deploy.info.num_pieces():
            raise web.HTTPNotFound(text="no such piece\n")
        else:
            index = int(raw)
        data = await self._read_piece(deploy, index)
        if data is None:
            raise web.HTTPServiceUnavailable(text="cannot read the piece\n")
        if dealer is not None and raw != piecehttp.NEXT:  # take() counted a dealt one out
            dealer.sent(index)  # asked for by index: out now (the last one: _all_out())
        self.pieces_served.inc(len(data))
        return web.Response(
            body=data,
            content_type="application/octet-stream",
            headers={piecehttp.PIECE_HEADER: str(index)},
        )

    @staticmethod
    def _follower(request: web.Request, dealer) -> str:
        """The ?peer= of a request for dealt pieces.  No slice for it (not following at
        publication, or dealt before a restart): 404, and it asks for its own pieces by
        index."""
        follower = slices.follower_id(request.query.get("peer"))
        if dealer is None or follower not in dealer.members:
            raise web.HTTPNotFound(text="no slice dealt to this follower\n")
        return follower

    async def _read_piece(self, deploy: Deploy, index: int) -> bytes | None:
        """Piece index of deploy from the drop dir (in a worker thread); None, logged, when
        it cannot be read."""
        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, piecehttp.read_piece, deploy.info, str(self.drop_dir), index
            )
        except OSError as exc:
            log.error("deploy %s: cannot read piece %d: %s", deploy.name, index, exc)
            return None

    async def _stream(self, request: web.Request, deploy: Deploy) -> web.StreamResponse:
        """A follower's pieces, one after the other in one answer, each dealt (Dealer.take)
        as the one before has all but left: no gap of a request's round trip between two
        pieces (piecehttp.py).  The answer ends after STREAM_PIECES, or with an END frame
        when no piece is left to deal."""
        dealer = deploy.dealer
        follower = self._follower(request, dealer)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        piecehttp.small_send_buffer(request.transport)
        await response.prepare(request)
        try:
            for _ in range(piecehttp.STREAM_PIECES):
                index = dealer.take(follower)  # the last one dealt: _all_out()
                if index is None:
                    await response.write(piecehttp.FRAME.pack(piecehttp.END, 0))
                    break
                data = await self._read_piece(deploy, index)
                if data is None:
                    break  # ends the answer early: the follower asks for a new one
                # Waits while the socket holds more than a little of the pieces before.
                await response.write(piecehttp.frame(index, data))
                self.pieces_served.inc(len(data))
            await response.write_eof()
        except ConnectionResetError:
            # The follower went away (restarted, gave up): what it was dealt and did not get
            # goes out over BitTorrent after "out", from the seeder or from a peer.
            log.info(
                "deploy %s: follower %s left in the middle of its pieces", deploy.name, follower
            )
        return response


def main() -> None:
    sys.exit(runtime.run(SeederService))

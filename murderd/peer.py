"""murder-peer: drop dir / url / follow -> validate -> stage -> verify -> place -> linger.

Every deploy's life is kept in ``state_dir/<info-hash>.json`` (written atomically), so a
restart resumes each deploy where it was:

    queued -> downloading -> verifying -> placing -> [hook] -> seeding (linger) -> done
       any step -> failed (reason kept; retried when the torrent is dropped again)
    rejected: an invalid torrent, quarantined in drop_dir/rejected/ with a .reason file
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import re
import shlex
import sys
import time
from pathlib import Path

from aiohttp import web

from . import (
    digest,
    follow,
    fsutil,
    httpserver,
    metrics,
    piecehttp,
    publish,
    runtime,
    slices,
    torrent,
)
from .lt import (
    default_priorities,
    lt,
    prioritize_pieces,
    staggered_priorities,
)
from .swarm import SwarmService

log = logging.getLogger(__name__)

ACTIVE = ("queued", "downloading", "stalled", "verifying", "placing", "seeding")
SEEDER_FINGERPRINT = b"-MS"
RETRY_ERROR_SECONDS = 10
RETRY_MIN_FREE = 4 * 1024 * 1024  # a full staging filesystem counts as freed above this
STATE_WRITE_SECONDS = 2.0
CHECK_WAIT_SECONDS = 30.0  # a piece over HTTP waits this long at most for the files' check
DIGEST_STALL_SECONDS = 30.0  # verifying: a piece's hashing under way this long, hash the files
FREE_SPACE_MARGIN = 16 * 1024 * 1024
FAMILY = re.compile(r"^(.+?)[-_]v?[0-9]")


def family(name: str) -> str:
    """Deploys of one family differ only from the first '-<digit>' on (app-1.2, app-1.3)."""
    match = FAMILY.match(name)
    return match.group(1) if match else name


class PeerDeploy:
    """A deploy on this host: persisted state plus its (unpersisted) libtorrent handle."""

    FIELDS = (
        "info_hash",
        "name",
        "state",
        "progress",
        "size",
        "source",
        "created",
        "updated",
        "finished",
        "placed",
        "sha256",
        "error",
        "hook",
        "bytes_from_seeder",
        "bytes_from_peers",
        "hash_failures",
    )

    def __init__(self, **fields):
        self.info_hash = ""
        self.name = ""
        self.state = "queued"
        self.progress = 0.0
        self.size = 0
        self.source = ""
        self.created = time.time()
        self.updated = self.created
        self.finished = None
        self.placed = []
        self.sha256 = {}
        self.error = ""
        self.hook = None
        self.bytes_from_seeder = 0
        self.bytes_from_peers = 0
        self.hash_failures = 0
        for key, value in fields.items():
            if key in self.FIELDS:
                setattr(self, key, value)
        self.handle = None
        self.torrent: torrent.Torrent | None = None
        self.peer_bytes: dict = {}  # (ip, port) -> [is_seeder, total_download]
        self.linger_timer = None
        self.retry_timer = None
        self.stall_enospc = False  # the stall is a full staging filesystem
        self.stall_placing = False  # the stall came while placing (destination full)
        self.completing = False  # verify/place under way (one at a time)
        self.top_band: list[int] = []  # staggered start: preferred pieces, until had
        self.gate: slices.Gate | None = None  # its slice of the seeder's, while it gates
        self.pieces_url: str | None = None  # where the seeder serves the slice (piecehttp)
        self.fetch_task: asyncio.Task | None = None  # the slice over HTTP, while it runs
        self.http_bytes = 0  # payload of the slice fetched over HTTP (from the seeder)
        self.seeder_address: str | None = None  # blocked for BitTorrent while it fetches
        self.digest: digest.Digest | None = None  # its SHA-256, taken as pieces come
        self.checked: asyncio.Event | None = None  # set once libtorrent checked its files
        # Which pieces libtorrent has (1) and not (0), from its alerts: the checked files
        # (torrent_checked_alert), then each piece_finished_alert.  None until checked.
        # Asking the handle (have_piece, status) instead waits on libtorrent's network
        # thread: 7-40 ms a call at N=16 in bench/, the event loop blocked meanwhile.
        self.had: bytearray | None = None
        self.lt_payload = 0  # total_payload_download at the last tick (libtorrent's status)

    def record(self) -> dict:
        return {key: getattr(self, key) for key in self.FIELDS}


class PeerService(SwarmService):
    name = "peer"
    section = "peer"
    fingerprint = "-MP0100-"
    live_keys = frozenset(
        {
            ("peer", key)
            for key in (
                "linger_seconds",
                "max_linger_seconds",
                "keep_deploys",
                "hook",
                "hook_timeout",
                "extract",
                "max_torrent_bytes",
                "max_deploy_bytes",
                "resume_save_interval",
                "url_timeout",
                "ignore_suffixes",
                "upload_rate_limit",
                "download_rate_limit",
                "follow",
                "follow_interval",
                "corrupt_peer_block_seconds",
                "slices",
                "slices_http",
            )
        }
    )

    def __init__(self, cfg):
        super().__init__(cfg, pool_name="verify")
        c = cfg["peer"]
        self.drop_dir = Path(c["drop_dir"])
        self.rejected_dir = self.drop_dir / "rejected"
        self.staging_dir = Path(c["staging_dir"])
        self.destination_dir = Path(c["destination_dir"])
        self.state_dir = Path(c["state_dir"])
        self.deploys: dict[str, PeerDeploy] = {}
        self.by_handle: dict = {}  # libtorrent torrent_handle -> its deploy
        self.pending_resume = 0
        self.resume_done = asyncio.Event()
        self.follower = follow.Follower(
            client=lambda: self.client,
            settings=lambda: self.cfg["peer"],
            known=lambda info_hash: info_hash in self.deploys,
            accept=lambda data, url, part, pieces: self._accept(data, url, None, part, pieces),
            reslice=self._reslice,
        )
        self.hash_failures_total = 0
        self.blocked: dict[str, float] = {}  # address -> when it was blocked (monotonic)
        # Seeders whose BitTorrent connections are kept away while slices come over HTTP:
        # address -> deploys fetching from it (piecehttp.py).
        self.seeders_blocked: dict[str, int] = {}
        self.flush_waiters: dict[str, asyncio.Future] = {}
        self.gate_task: asyncio.Task | None = None
        self.metrics = metrics.DaemonMetrics("peer", lambda: self.session)

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        c = self.cfg["peer"]
        self.make_dirs(
            self.drop_dir, self.rejected_dir, self.staging_dir, self.destination_dir, self.state_dir
        )
        if os.stat(self.staging_dir).st_dev != os.stat(self.destination_dir).st_dev:
            raise runtime.StartupError(
                f"staging_dir {self.staging_dir} and destination_dir {self.destination_dir} "
                "are on different filesystems: placing a deploy could not be atomic"
            )
        if not fsutil.can_hardlink(self.staging_dir, self.destination_dir):
            log.warning(
                "cannot hard-link from %s to %s (separate mounts, e.g. systemd ReadWritePaths): "
                "placing a deploy will copy it",
                self.staging_dir,
                self.destination_dir,
            )
        self.start_session()
        # peer_ban_alert: a peer libtorrent banned for corrupt data (see _banned).
        mask = self.session.get_settings()["alert_mask"] | lt.alert.category_t.peer_notification
        self.session.apply_settings({"alert_mask": mask})
        self._restore()
        if c["http_listen"]:
            self.http = await httpserver.serve(self._app(), c["http_listen"], "peer endpoint")
        self.start_watcher(
            self.drop_dir,
            on_ready=self._dropped,
            on_refused=lambda path, kind: self._reject_file(path, f"{kind}, not a torrent"),
            suffixes=(".torrent", ".url"),
        )
        self.spawn(self._tick_loop())
        self.spawn(self._resume_loop())
        self.spawn(self.follower.run())

    async def save(self) -> None:
        await self._save_all_resume(timeout=min(10.0, self.cfg["daemon"]["stop_timeout"] / 2))
        for deploy in self.deploys.values():
            self._write_state(deploy)

    def status(self) -> str:
        counts: dict[str, int] = {}
        progress = []
        for deploy in self.deploys.values():
            counts[deploy.state] = counts.get(deploy.state, 0) + 1
            if deploy.state in ("downloading", "stalled"):
                progress.append(deploy.progress)
        down = counts.get("downloading", 0) + counts.get("stalled", 0)
        text = f"{down} downloading"
        if progress:
            text += f" ({100 * sum(progress) / len(progress):.0f}%)"
        done = counts.get("done", 0) + counts.get("seeding", 0)
        return f"{text}, {done} done, {counts.get('failed', 0)} failed"

    # --- persisted state --------------------------------------------------------------

    def _paths(self, info_hash: str) -> tuple[Path, Path, Path]:
        base = self.state_dir / info_hash
        return base.with_suffix(".json"), base.with_suffix(".torrent"), base.with_suffix(".resume")

    def _write_state(self, deploy: PeerDeploy) -> None:
        deploy.updated = time.time()
        try:
            fsutil.atomic_write_json(self._paths(deploy.info_hash)[0], deploy.record())
        except OSError as exc:
            log.error("deploy %s: cannot write its state file: %s", deploy.name, exc)

    def _set_state(self, deploy: PeerDeploy, state: str, error: str = "") -> None:
        if deploy.state != state:
            log.info("deploy %s (%s): %s -> %s", deploy.name, deploy.info_hash, deploy.state, state)
            if state == "seeding" and deploy.state == "placing":
                self.metrics.deploy_completed((deploy.finished or time.time()) - deploy.created)
            elif state == "failed":
                self.metrics.deploy_failed()
        deploy.state = state
        deploy.error = error
        self._write_state(deploy)

    def _restore(self) -> None:
        for path in sorted(self.state_dir.glob("*.json")):
            try:
                record = fsutil.read_json(path)
                deploy = PeerDeploy(**record)
                if not deploy.info_hash:
                    raise ValueError("no info_hash")
            except (OSError, ValueError, TypeError) as exc:
                log.error("ignoring unreadable state file %s: %s", path, exc)
                continue
            self.deploys[deploy.info_hash] = deploy
            if deploy.state == "seeding":
                # Placed before the restart: the linger is over, keep the placed file.
                self._finish(deploy)
            elif deploy.state in ACTIVE:
                log.info("deploy %s: resuming (%s)", deploy.name, deploy.state)
                try:
                    deploy.torrent = torrent.load(self._paths(deploy.info_hash)[1])
                except (OSError, torrent.TorrentError) as exc:
                    self._set_state(deploy, "failed", f"saved torrent unusable: {exc}")
                    continue
                self._add_to_session(deploy)

    # --- input: drop dir, .url files, follow ------------------------------------------

    def _dropped(self, path: Path) -> None:
        if path.name.endswith(".url"):
            self.spawn(self._fetch_url_file(path))
            return
        try:
            with open(path, "rb") as handle:
                data = handle.read(self.cfg["peer"]["max_torrent_bytes"] + 1)
        except OSError as exc:
            log.error("cannot read %s: %s", path, exc)
            return
        self._accept(data, source=path.name, drop_path=path)

    async def _fetch_url_file(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8", errors="strict").strip()
        except (OSError, UnicodeDecodeError) as exc:
            self._reject_file(path, f"unreadable .url file: {exc}")
            return
        url = text.splitlines()[0].strip() if text else ""
        if not url.startswith(("http://", "https://")):
            self._reject_file(path, f"not an http(s) URL: {url[:200]!r}")
            return
        try:
            data = await self.follower.fetch(url)
        except follow.FETCH_ERRORS as exc:
            self._reject_file(path, f"cannot fetch {url}: {exc or type(exc).__name__}")
            return
        self._accept(data, source=url, drop_path=path)

    def _reject_file(self, path: Path, reason: str) -> None:
        """Quarantine a dropped file in rejected/ with a .reason file beside it."""
        log.error("rejected %s: %s", path.name, reason)
        try:
            target = self.rejected_dir / path.name
            os.replace(path, target)
            fsutil.atomic_write(target.with_name(target.name + ".reason"), (reason + "\n").encode())
        except OSError as exc:
            log.error("cannot quarantine %s: %s", path, exc)

    def _reject_data(self, data: bytes, name: str, reason: str) -> None:
        log.error("rejected %s: %s", name, reason)
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[-100:] or "torrent"
        try:
            fsutil.atomic_write(self.rejected_dir / safe, data)
            fsutil.atomic_write(self.rejected_dir / (safe + ".reason"), (reason + "\n").encode())
        except OSError as exc:
            log.error("cannot quarantine %s: %s", name, exc)

    def _accept(
        self,
        data: bytes,
        source: str,
        drop_path: Path | None,
        part: tuple | None = None,
        pieces: str | None = None,
    ) -> None:
        """Validate a torrent; start it, or quarantine it with the reason.

        part: the slice of its pieces the seeder dealt this peer (slices.py); pieces: the
        URL the seeder serves them at (piecehttp.py).
        """
        c = self.cfg["peer"]

        def reject(reason):
            if drop_path is not None:
                self._reject_file(drop_path, reason)
            else:
                self._reject_data(data, source.rsplit("/", 1)[-1], reason)

        try:
            parsed = torrent.parse(data, c["max_torrent_bytes"], c["max_deploy_bytes"])
            publish.check_destination(self.destination_dir, [f.path for f in parsed.files])
        except (torrent.TorrentError, publish.PlacementError) as exc:
            reject(str(exc))
            return
        existing = self.deploys.get(parsed.info_hash)
        if existing is not None and existing.state != "failed":
            log.info("deploy %s (%s) already %s", parsed.name, parsed.info_hash, existing.state)
            self._consume(drop_path)
            return
        free = fsutil.free_bytes(self.staging_dir)
        if parsed.total_size + FREE_SPACE_MARGIN > free:
            reject(
                f"not enough disk space: {parsed.name} needs {parsed.total_size} bytes, "
                f"{self.staging_dir} has {free} free"
            )
            return
        _, torrent_path, resume_path = self._paths(parsed.info_hash)
        fsutil.atomic_write(torrent_path, data)
        if existing is not None:
            log.info("deploy %s (%s): retrying after failure", parsed.name, parsed.info_hash)
            resume_path.unlink(missing_ok=True)
        deploy = PeerDeploy(
            info_hash=parsed.info_hash, name=parsed.name, size=parsed.total_size, source=source
        )
        deploy.torrent = parsed
        if part is not None:
            deploy.gate = slices.Gate(part, time.monotonic())
            deploy.pieces_url = pieces
        self.deploys[deploy.info_hash] = deploy
        self._write_state(deploy)
        self._consume(drop_path)
        log.info(
            "deploy %s (%s): accepted from %s, %d bytes in %d files",
            deploy.name,
            deploy.info_hash,
            source,
            deploy.size,
            len(parsed.files),
        )
        if deploy.gate is not None:
            log.info("deploy %s: slice %d of %d from the seeder", deploy.name, *part[:2])
        self._add_to_session(deploy)

    @staticmethod
    def _consume(drop_path: Path | None) -> None:
        if drop_path is not None:
            try:
                drop_path.unlink()
            except FileNotFoundError:
                pass

    # --- downloading ------------------------------------------------------------------

    def _staging(self, deploy: PeerDeploy) -> Path:
        return self.staging_dir / deploy.info_hash

    def _add_to_session(self, deploy: PeerDeploy) -> None:
        resume_path = self._paths(deploy.info_hash)[2]
        params = None
        if resume_path.exists():
            try:
                params = lt.read_resume_data(resume_path.read_bytes())
            except Exception as exc:  # libtorrent raises RuntimeError on bad resume data
                log.warning("deploy %s: resume data unusable (%s): rechecking", deploy.name, exc)
        if params is None:
            params = lt.add_torrent_params()
        params.ti = deploy.torrent.info
        params.save_path = str(self._staging(deploy))
        if deploy.gate is not None:
            params.piece_priorities = deploy.gate.first(deploy.torrent.info.num_pieces())
        params.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
        params.flags &= ~lt.torrent_flags.seed_mode
        fsutil.ensure_dir(self._staging(deploy))
        address = None
        if deploy.gate is not None and deploy.pieces_url and deploy.fetch_task is None:
            # A literal address is blocked before libtorrent can connect to the seeder.
            address = self._slice_address(deploy, piecehttp.literal(deploy.pieces_url))
        deploy.checked = asyncio.Event()
        deploy.had = None
        deploy.handle = self.session.add_torrent(params)
        self.by_handle[deploy.handle] = deploy
        self._close_digest(deploy)
        paths = [f.path for f in deploy.torrent.files]
        deploy.digest = digest.Digest(
            deploy.handle, deploy.torrent.info, paths, self.pool, lambda p: self._has(deploy, p)
        )
        if deploy.gate is not None and deploy.pieces_url and deploy.fetch_task is None:
            deploy.fetch_task = self.spawn(self._fetch_slice(deploy, deploy.gate, address))
        if deploy.gate is not None:
            self._gate(deploy, time.monotonic())  # before libtorrent asks for anything
            if self.gate_task is None or self.gate_task.done():
                self.gate_task = self.spawn(self._gate_loop())
        else:
            self._stagger(deploy)
        if deploy.state not in ("downloading", "stalled"):
            self._set_state(deploy, "downloading")

    async def _gate_loop(self) -> None:
        """Every slices.GATE_EVERY s while a deploy gates: its piece priorities (slices.py)."""
        while True:
            gated = [d for d in self.deploys.values() if d.gate is not None]
            if not gated:
                return
            for deploy in gated:
                handle = deploy.handle
                try:
                    availability = None
                    if deploy.state == "downloading" and handle is not None and handle.is_valid():
                        # On the queries thread: the loop goes on meanwhile (swarm.py).
                        availability = await self.ask(handle.piece_availability)
                        if deploy.gate is None or deploy.handle is not handle:
                            continue  # it ended or restarted meanwhile
                    self._gate(deploy, time.monotonic(), availability)
                except Exception:
                    log.exception("deploy %s: cannot gate its pieces", deploy.name)
                    self._ungate(deploy)
            await asyncio.sleep(slices.GATE_EVERY)

    def _reslice(self, info_hash: str, part: slices.Part) -> None:
        """The seeder moved pieces to or from this peer's slice (slices.Dealer)."""
        deploy = self.deploys.get(info_hash)
        if deploy is None or deploy.gate is None or deploy.gate.part == part:
            return
        if part.out:
            self._all_out(deploy)
            return
        deploy.gate.reslice(part)
        log.debug(
            "deploy %s: slice now %d pieces (+%d -%d)",
            deploy.name, len(deploy.gate.own or ()), len(part.added), len(part.dropped),
        )  # fmt: skip
        if deploy.handle is not None and deploy.handle.is_valid():
            self._gate(deploy, time.monotonic())  # at once, not at the next tick
        if deploy.gate.fetch is not None:
            deploy.gate.fetch.more.set()

    def _all_out(self, deploy: PeerDeploy) -> None:
        """Every piece has left the seeder once (slices.Part.out): the gate ends.

        The seeder's link is free from now on, while the peers still pass the last pieces
        round: any piece from anyone, the seeder included (let back in over BitTorrent, and
        found again through the tracker at once).  Pieces on their way over HTTP still come.
        """
        kept_away = deploy.seeder_address is not None
        self._ungate(deploy, drain=True)
        handle = deploy.handle
        if handle is not None and handle.is_valid():
            default_priorities(handle, deploy.torrent.info.num_pieces())
            if kept_away:
                handle.force_reannounce(0, -1, lt.reannounce_flags_t.ignore_min_interval)
        log.info(
            "deploy %s: every piece has left the seeder: any piece from anyone now", deploy.name
        )

    @staticmethod
    def _close_digest(deploy: PeerDeploy) -> None:
        if deploy.digest is not None:
            deploy.digest.close()
            deploy.digest = None

    def _ungate(self, deploy: PeerDeploy, drain: bool = False) -> None:
        """The deploy no longer gates: any piece from anyone, and no more fetching (drain:
        what was asked for over HTTP still comes, piecehttp.Fetch.drain)."""
        gate, deploy.gate = deploy.gate, None
        if drain and gate is not None and gate.fetch is not None:
            gate.fetch.drain()
        else:
            task, deploy.fetch_task = deploy.fetch_task, None
            if task is not None:
                task.cancel()
        self._unblock_seeder(deploy)

    def _unblock_seeder(self, deploy: PeerDeploy) -> None:
        address, deploy.seeder_address = deploy.seeder_address, None
        if address is None:
            return
        left = self.seeders_blocked.pop(address, 1) - 1
        if left > 0:
            self.seeders_blocked[address] = left
        self._apply_blocks()

    def _gate(self, deploy: PeerDeploy, now: float, availability=None) -> None:
        """Set the gated deploy's priorities (slices.Gate.update), or end the gate.

        availability: libtorrent's piece_availability(), when the caller has it.  What the
        peer has comes from deploy.had; the stall clock runs on the payload the last tick
        saw, the slice's HTTP bytes and the pieces finished since.
        """
        gate = deploy.gate
        handle = deploy.handle
        if deploy.state not in ("queued", "downloading", "stalled"):
            self._ungate(deploy)
            return
        if handle is None or not handle.is_valid() or deploy.state == "stalled":
            gate.pause(now)
            return
        had = deploy.had
        pieces = had.count(1) if had else 0
        payload = deploy.lt_payload + deploy.http_bytes + pieces
        if had and pieces == len(had):
            self._ungate(deploy)
        elif not gate.update(handle, payload, now, had, availability):
            self._ungate(deploy)
            if gate.ended == "stalled":
                log.info(
                    "deploy %s: no data for %g s with slices: any piece from anyone now",
                    deploy.name,
                    slices.STALL_SECONDS,
                )
            else:
                log.debug("deploy %s: own slice in: any piece from anyone now", deploy.name)

    def _slice_address(self, deploy: PeerDeploy, address: str | None) -> str | None:
        """The seeder's address, blocked for BitTorrent, if the slice can come over HTTP."""
        if address is None or not self.cfg["peer"]["slices_http"]:
            return None
        listening = self.session.get_settings()["listen_interfaces"]
        if not piecehttp.may_block(address, listening):
            log.info(
                "deploy %s: slice over BitTorrent: the seeder (%s) shares this peer's address",
                deploy.name,
                address,
            )
            deploy.pieces_url = None
            return None
        self.seeders_blocked[address] = self.seeders_blocked.get(address, 0) + 1
        deploy.seeder_address = address
        self._apply_blocks()
        return address

    async def _fetch_slice(self, deploy: PeerDeploy, gate: slices.Gate, address) -> None:
        """Take the deploy's slice over HTTP from the seeder, if this peer can (piecehttp)."""
        url = deploy.pieces_url
        if address is None and url:  # a name: resolved first
            found = await piecehttp.resolve(url)
            if deploy.gate is gate:
                address = self._slice_address(deploy, found)
        if address is None:
            return
        handle = deploy.handle
        info = deploy.torrent.info

        checked = deploy.checked

        def put(piece: int, data: bytes) -> None:
            if handle.is_valid():
                handle.add_piece(piece, data, 0)

        def add(piece: int, data: bytes) -> None:
            deploy.http_bytes += len(data)
            if checked.is_set():
                put(piece, data)
            else:
                self.spawn(add_once_checked(piece, data))

        async def add_once_checked(piece: int, data: bytes) -> None:
            # libtorrent drops a piece added before it has checked the files (the fetch
            # would take it again only REFETCH_SECONDS later).
            try:
                await asyncio.wait_for(checked.wait(), CHECK_WAIT_SECONDS)
            except asyncio.TimeoutError:
                log.warning(
                    "deploy %s: files not checked after %g s", deploy.name, CHECK_WAIT_SECONDS
                )
            put(piece, data)

        fetch = piecehttp.Fetch(
            url,
            missing=lambda: gate.missing,
            have=lambda p: self._has(deploy, p),
            add=add,
            size=info.piece_size,
            count=info.num_pieces(),
        )
        gate.fetching(fetch)
        log.info(
            "deploy %s: slice over HTTP from %s (its BitTorrent connections kept away meanwhile)",
            deploy.name,
            url,
        )
        try:
            await fetch.run(self.client, self.follower.ident, self.cfg["peer"]["url_timeout"])
        finally:
            log.debug(
                "deploy %s: %d pieces (%d bytes) over HTTP", deploy.name, fetch.pieces, fetch.bytes
            )
        if fetch.failed and deploy.gate is gate:
            log.warning(
                "deploy %s: cannot fetch the slice over HTTP (%s): any piece from anyone now",
                deploy.name,
                fetch.failed,
            )
            deploy.fetch_task = None
            self._ungate(deploy)
            if handle.is_valid():
                default_priorities(handle, info.num_pieces())

    def _stagger(self, deploy: PeerDeploy) -> None:
        """Among equally rare pieces, prefer the half of the file after a random offset.

        At the start every peer would ask the seeder for the same (rarest) pieces, and a piece
        in flight is invisible to the others: the seeder would send it several times.  Peers
        preferring different regions ask it for different pieces and trade them among
        themselves; once a peer has its preferred half, priorities go back to uniform.
        bench/ (64 MiB, 100 Mbit/s, medians): T / T_limit 1.58 -> 1.48 at N=2, 1.97 -> 1.88
        at N=8, 2.00 -> 1.98 at N=16.
        """
        count = deploy.torrent.info.num_pieces()
        priorities = staggered_priorities(count, random.randrange(count))
        top = max(priorities)
        deploy.top_band = [i for i, p in enumerate(priorities) if p == top]
        prioritize_pieces(deploy.handle, priorities)

    def _unstagger(self, deploy: PeerDeploy, pieces) -> None:
        if all(pieces[i] for i in deploy.top_band):
            deploy.top_band = []
            default_priorities(deploy.handle, len(pieces))

    @staticmethod
    def _has(deploy: PeerDeploy, piece: int) -> bool:
        """Whether libtorrent has the piece, as its alerts said (PeerDeploy.had)."""
        had = deploy.had
        return had is not None and had[piece] == 1

    @staticmethod
    def _finished_piece(deploy: PeerDeploy, piece: int) -> None:
        """libtorrent has a new piece (hashed against the torrent, written)."""
        if deploy.had is not None:
            deploy.had[piece] = 1
        if deploy.digest is not None:
            deploy.digest.pump(piece)

    def _by_handle(self, handle) -> PeerDeploy | None:
        # Every handle is registered when its torrent is added (_add_to_session) and dropped
        # with it: a torrent_handle's own methods wait on libtorrent's network thread
        # (0.3-0.5 ms each while it is busy).
        return self.by_handle.get(handle)

    def _alert(self, alert) -> None:
        if self.metrics.on_alert(alert):
            return
        if isinstance(alert, lt.save_resume_data_alert):
            self._resume_saved(alert)
            return
        if isinstance(alert, lt.save_resume_data_failed_alert):
            self._resume_accounted()
            return
        handle = getattr(alert, "handle", None)
        deploy = self._by_handle(handle) if handle is not None else None
        if isinstance(alert, lt.piece_finished_alert):
            if deploy is not None:
                self._finished_piece(deploy, alert.piece_index)
        elif isinstance(alert, lt.read_piece_alert):
            if deploy is not None and deploy.digest is not None:
                failed = alert.error.message() if alert.error.value() else ""
                deploy.digest.read(alert.piece, alert.buffer, failed)
        elif isinstance(alert, lt.cache_flushed_alert):
            waiter = self.flush_waiters.pop(deploy.info_hash, None) if deploy else None
            if waiter is not None and not waiter.done():
                waiter.set_result(True)
        elif isinstance(alert, (lt.torrent_finished_alert, lt.torrent_checked_alert)):
            if deploy is not None and deploy.checked is not None:
                deploy.checked.set()
            status = handle.status(lt.torrent_handle.query_pieces) if deploy else None
            if deploy is not None and deploy.handle == handle:
                # What it has from its files (resume data, a restart): once, then alerts.
                deploy.had = bytearray(status.pieces)
                if deploy.digest is not None:
                    deploy.digest.pump()
            finishing = deploy and deploy.state in ("downloading", "stalled")
            if finishing and not deploy.stall_placing and status.is_seeding:
                self._start_complete(deploy)
        elif isinstance(alert, lt.hash_failed_alert):
            self.hash_failures_total += 1
            if deploy:
                deploy.hash_failures += 1
            log.warning("libtorrent: %s", alert.message())
        elif isinstance(alert, (lt.file_error_alert, lt.torrent_error_alert)):
            # A full disk fails every block in flight: one line per stall, not hundreds.
            stalled = deploy is not None and deploy.state == "stalled"
            log.log(logging.DEBUG if stalled else logging.ERROR, "libtorrent: %s", alert.message())
            if deploy and deploy.state in ("downloading", "stalled"):
                self._stall(deploy, alert)
        elif isinstance(alert, lt.peer_ban_alert):
            self._banned(deploy, alert)
        elif isinstance(alert, (lt.tracker_error_alert, lt.listen_failed_alert)):
            log.warning("libtorrent: %s", alert.message())
        else:
            log.debug("libtorrent: %s", alert.message())

    def _banned(self, deploy: PeerDeploy | None, alert) -> None:
        """libtorrent banned a peer that sent corrupt data: make the ban stick.

        libtorrent bans an address and port: the same host connecting back from another port
        (allow_multiple_connections_per_ip, which the LAN settings need, lets it) was served
        again and sent more bad pieces.  Block the address for the whole session, unless other
        peers share it (several daemons behind one address) or it is a seeder.
        """
        ip, port = alert.endpoint[0], alert.endpoint[1]
        pid = alert.pid.to_bytes()
        name = deploy.name if deploy else alert.torrent_name
        shared = any(
            other.ip[0] == ip and other.pid.to_bytes() != pid
            for d in self.deploys.values()
            if d.handle is not None and d.handle.is_valid()
            for other in d.handle.get_peer_info()
        )
        if shared or pid.startswith(SEEDER_FINGERPRINT):
            why = "a seeder" if not shared else "its address is shared with other peers"
            log.error("deploy %s: peer %s:%d sent corrupt data: banned (%s)", name, ip, port, why)
            return
        self.blocked[ip] = time.monotonic()
        self._apply_blocks()
        hold = self.cfg["peer"]["corrupt_peer_block_seconds"]
        log.error(
            "deploy %s: peer %s:%d sent corrupt data: banned, and %s blocked %s",
            name,
            ip,
            port,
            ip,
            f"for {hold}s" if hold else "until restart",
        )

    def _apply_blocks(self) -> None:
        blocked = lt.ip_filter()
        for address in set(self.blocked).union(self.seeders_blocked):
            blocked.add_rule(address, address, 1)
        self.session.set_ip_filter(blocked)

    def _unblock_expired(self) -> None:
        """Let blocked addresses back once corrupt_peer_block_seconds have passed (0: never)."""
        hold = self.cfg["peer"]["corrupt_peer_block_seconds"]
        if not self.blocked or not hold:
            return
        now = time.monotonic()
        expired = [ip for ip, since in self.blocked.items() if now - since >= hold]
        if not expired:
            return
        for ip in expired:
            del self.blocked[ip]
            log.warning(
                "%s no longer blocked: corrupt_peer_block_seconds (%ds) passed since it sent "
                "corrupt data",
                ip,
                hold,
            )
        self._apply_blocks()

    def _stall(self, deploy: PeerDeploy, alert) -> None:
        """A disk error (e.g. staging full): record it, retry until it clears."""
        error = alert.error
        text = error.message()
        deploy.stall_enospc = error.value() == errno.ENOSPC
        if deploy.stall_enospc:
            text = f"no space left on {self.staging_dir}"
        if deploy.state == "stalled" and deploy.retry_timer is not None:
            return  # already recorded; the retry is scheduled
        self._set_state(deploy, "stalled", f"{text}; retrying every {RETRY_ERROR_SECONDS}s")
        self._schedule_retry(deploy)

    def _schedule_retry(self, deploy: PeerDeploy) -> None:
        if deploy.retry_timer is None:
            deploy.retry_timer = asyncio.get_running_loop().call_later(
                RETRY_ERROR_SECONDS, self._retry, deploy
            )

    def _retry(self, deploy: PeerDeploy) -> None:
        deploy.retry_timer = None
        if deploy.state != "stalled" or deploy.handle is None or not deploy.handle.is_valid():
            return
        if deploy.stall_enospc:
            where = self.destination_dir if deploy.stall_placing else self.staging_dir
            try:
                free = fsutil.free_bytes(where)
            except OSError:
                free = 0
            if free < RETRY_MIN_FREE:
                # Still full: stay stalled (what the operator must see) and look again later.
                log.debug("deploy %s: %s still has %d bytes free", deploy.name, where, free)
                self._schedule_retry(deploy)
                return
        log.info("deploy %s: retrying after: %s", deploy.name, deploy.error)
        if deploy.stall_placing:
            deploy.stall_enospc = deploy.stall_placing = False
            self._start_complete(deploy)  # verifies again, then places
            return
        # Connections made while it waited (a restarted seeder connecting to it) were set
        # up for upload mode; twice in full test runs the resumed download then got no data
        # for 90 s over them.  Pausing drops them: it connects afresh on resume.
        deploy.handle.pause()
        deploy.handle.clear_error()
        # A failed write (disk full, read-only) puts the torrent in upload mode rather than
        # in error, and only auto-managed torrents ever leave it by themselves.
        deploy.handle.unset_flags(lt.torrent_flags.upload_mode)
        deploy.handle.resume()
        # Its sources may have come and gone while it waited (a restarted seeder): ask the
        # tracker again now rather than at the next interval.
        deploy.handle.force_reannounce()
        deploy.stall_enospc = False
        self._set_state(deploy, "downloading")

    async def _tick_loop(self) -> None:
        """Once a second: progress, byte accounting, periodic state writes."""
        last_write = 0.0
        while True:
            now = time.monotonic()
            write = now - last_write >= STATE_WRITE_SECONDS
            for deploy in list(self.deploys.values()):
                handle = deploy.handle
                if deploy.state not in ("downloading", "stalled") or handle is None:
                    continue
                if not handle.is_valid():
                    continue
                try:
                    # On the queries thread: the loop goes on meanwhile (swarm.py).
                    status = await self.ask(handle.status)
                    peers = await self.ask(handle.get_peer_info)
                    # (A deploy that finished or restarted meanwhile has just written its
                    # state; it is written below again all the same.)
                    if deploy.handle is handle and deploy.state in ("downloading", "stalled"):
                        self._tick(deploy, status, peers)
                except Exception:
                    log.exception("deploy %s: cannot read its status", deploy.name)
                if write:
                    self._write_state(deploy)
            if write:
                last_write = now
            self._unblock_expired()
            await asyncio.sleep(1.0)

    def _tick(self, deploy: PeerDeploy, status, peers) -> None:
        """A downloading deploy's status (libtorrent's, read off the loop) once a second."""
        deploy.progress = round(status.progress, 4)
        deploy.lt_payload = status.total_payload_download
        done = deploy.state == "downloading" and status.is_seeding
        if done and not deploy.completing:
            # The finished alert normally does this; after a disk-full stall
            # libtorrent was seen to finish without one.
            log.info("deploy %s: all pieces in (status check)", deploy.name)
            self._start_complete(deploy)
        if deploy.top_band:
            self._unstagger(deploy, status.pieces)
        had = deploy.had
        if had is not None and len(status.pieces) == len(had):
            # Only ever adds: a piece_finished_alert handled since status was read stays.
            for piece, has in enumerate(status.pieces):
                if has and not had[piece]:
                    self._finished_piece(deploy, piece)
        if deploy.digest is not None:
            deploy.digest.pump()
        self._account_peers(deploy, peers)

    def _account_peers(self, deploy: PeerDeploy, peers=None) -> None:
        if peers is None:
            peers = deploy.handle.get_peer_info()
        for peer in peers:
            pid = peer.pid.to_bytes()
            key = (peer.ip[0], peer.ip[1], pid)
            from_seeder = pid.startswith(SEEDER_FINGERPRINT)
            deploy.peer_bytes[key] = (from_seeder, peer.total_download)
        deploy.bytes_from_seeder = deploy.http_bytes + sum(
            b for s, b in deploy.peer_bytes.values() if s
        )
        deploy.bytes_from_peers = sum(b for s, b in deploy.peer_bytes.values() if not s)

    # --- resume data ------------------------------------------------------------------

    async def _resume_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg["peer"]["resume_save_interval"])
            for deploy in self.deploys.values():
                handle = deploy.handle
                active = deploy.state == "downloading" and handle is not None
                if active and handle.is_valid() and handle.need_save_resume_data():
                    self.pending_resume += 1
                    handle.save_resume_data(lt.save_resume_flags_t.flush_disk_cache)

    def _resume_saved(self, alert) -> None:
        deploy = self._by_handle(alert.handle)
        try:
            if deploy is not None and deploy.state in ("downloading", "stalled", "verifying"):
                data = lt.write_resume_data_buf(alert.params)
                fsutil.atomic_write(self._paths(deploy.info_hash)[2], data)
        except OSError as exc:
            log.error("cannot save resume data: %s", exc)
        finally:
            self._resume_accounted()

    def _resume_accounted(self) -> None:
        self.pending_resume = max(0, self.pending_resume - 1)
        if self.pending_resume == 0:
            self.resume_done.set()

    async def _save_all_resume(self, timeout: float) -> None:
        self.resume_done.clear()
        for deploy in self.deploys.values():
            handle = deploy.handle
            if deploy.state in ("downloading", "stalled") and handle and handle.is_valid():
                self.pending_resume += 1
                handle.save_resume_data(lt.save_resume_flags_t.flush_disk_cache)
        if self.pending_resume:
            try:
                await asyncio.wait_for(self.resume_done.wait(), timeout)
                log.info("resume data saved")
            except asyncio.TimeoutError:
                log.error("resume data not saved within %ss", timeout)

    # --- finishing: verify, place, hook, linger ---------------------------------------

    def _start_complete(self, deploy: PeerDeploy) -> None:
        if not deploy.completing:
            deploy.completing = True
            self.spawn(self._complete(deploy))

    async def _complete(self, deploy: PeerDeploy) -> None:
        try:
            await self._complete_once(deploy)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
            if not (full and deploy.state == "placing"):
                log.exception("deploy %s: finishing failed", deploy.name)
                self._fail(deploy, f"finishing failed: {exc}")
                return
            # The destination filled up while placing (a copy, or unpacking an archive):
            # nothing half-placed stays (publish cleans its temporaries); wait for space.
            log.error("deploy %s: placing: %s", deploy.name, exc)
            deploy.stall_enospc = deploy.stall_placing = True
            self._set_state(
                deploy,
                "stalled",
                f"no space left on {self.destination_dir} while placing; "
                f"retrying every {RETRY_ERROR_SECONDS}s",
            )
            self._schedule_retry(deploy)
        finally:
            deploy.completing = False

    async def _complete_once(self, deploy: PeerDeploy) -> None:
        loop = asyncio.get_running_loop()
        self._account_peers(deploy)
        deploy.progress = 1.0
        self._set_state(deploy, "verifying")
        began = loop.time()
        await self._flush(deploy)
        flushed = loop.time()
        staging = self._staging(deploy)
        files = deploy.torrent.files
        sums, hashed = None, "while downloading"
        if deploy.digest is not None:
            streamed = deploy.digest.next
            sums = await deploy.digest.finish(DIGEST_STALL_SECONDS, str(staging))
            hashed = (
                f"while downloading: {streamed} of {deploy.digest.total} pieces, the rest from the "
                f"files in {loop.time() - flushed:.2f}s; written out in {flushed - began:.2f}s"
            )
            if sums is None:
                log.warning(
                    "deploy %s: hashing while downloading failed (%s): hashing the staged files",
                    deploy.name,
                    deploy.digest.failed,
                )
        if sums is None:
            hashed = "the staged files"
            sums = await loop.run_in_executor(
                self.pool, lambda: {f.path: torrent.sha256_file(staging / f.path) for f in files}
            )
        for f in files:
            if f.sha256 and f.sha256 != sums[f.path]:
                self._fail(
                    deploy, f"sha256 mismatch for {f.path}: expected {f.sha256}, got {sums[f.path]}"
                )
                return
        deploy.sha256 = sums
        how = "sha256" if deploy.torrent.has_sha256 else "piece hashes (torrent has no sha256)"
        log.info(
            "deploy %s verified by %s (%s): %s",
            deploy.name,
            how,
            hashed,
            ", ".join(f"{k}={v}" for k, v in list(sums.items())[:3]),
        )
        self._set_state(deploy, "placing")
        c = self.cfg["peer"]
        placed = [
            await loop.run_in_executor(
                self.pool,
                publish.place,
                staging,
                self.destination_dir,
                deploy.torrent.name,
                deploy.info_hash,
            )
        ]
        if c["extract"] and publish.archive_stem(deploy.name) and not deploy.torrent.multi_file:
            placed.append(
                await loop.run_in_executor(
                    self.pool,
                    publish.extract,
                    staging / deploy.name,
                    self.destination_dir,
                    deploy.info_hash,
                )
            )
        deploy.placed = [str(p) for p in placed]
        deploy.finished = time.time()
        log.info("deploy %s placed: %s", deploy.name, ", ".join(deploy.placed))
        self._resume_path_cleanup(deploy)
        self._retain(deploy)
        if c["hook"]:
            deploy.hook = await self._run_hook(deploy, placed[-1])
        self._set_state(deploy, "seeding")
        deploy.linger_timer = loop.call_later(c["linger_seconds"], self._linger_check, deploy)

    async def _flush(self, deploy: PeerDeploy, timeout: float = 60.0) -> None:
        """Wait until libtorrent has written every downloaded byte to the staged file.

        libtorrent 2.1 keeps written blocks in a store buffer: the finished alert can come
        before the data is in the file, so the end-to-end hash would read stale bytes.
        """
        waiter = asyncio.get_running_loop().create_future()
        self.flush_waiters[deploy.info_hash] = waiter
        deploy.handle.flush_cache()
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            log.warning("deploy %s: disk cache flush not confirmed in %ss", deploy.name, timeout)
        finally:
            self.flush_waiters.pop(deploy.info_hash, None)

    def _resume_path_cleanup(self, deploy: PeerDeploy) -> None:
        self._paths(deploy.info_hash)[2].unlink(missing_ok=True)

    async def _run_hook(self, deploy: PeerDeploy, path: Path) -> dict:
        c = self.cfg["peer"]
        values = {"path": str(path), "name": deploy.name, "infohash": deploy.info_hash}
        try:
            argv = [arg.format(**values) for arg in shlex.split(c["hook"])]
        except (ValueError, KeyError, IndexError) as exc:
            log.error("deploy %s: hook %r is malformed: %s", deploy.name, c["hook"], exc)
            return {"argv": c["hook"], "exit": None, "error": f"malformed hook: {exc}"}
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            log.error("deploy %s: hook %s cannot run: %s", deploy.name, argv[0], exc)
            return {"argv": argv, "exit": None, "error": str(exc)}
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), c["hook_timeout"])
            error = ""
        except asyncio.TimeoutError:
            proc.kill()
            output, _ = await proc.communicate()
            error = f"killed after {c['hook_timeout']}s"
        for line in output.decode(errors="replace").splitlines()[-200:]:
            log.info("deploy %s: hook: %s", deploy.name, line)
        level = logging.INFO if proc.returncode == 0 else logging.ERROR
        log.log(level, "deploy %s: hook exited with %s %s", deploy.name, proc.returncode, error)
        return {
            "argv": argv,
            "exit": proc.returncode,
            "error": error,
            "seconds": round(time.monotonic() - started, 3),
        }

    def _retain(self, newest: PeerDeploy) -> None:
        """Keep the last keep_deploys deploys of newest's family; remove older placements."""
        keep = self.cfg["peer"]["keep_deploys"]
        fam = family(newest.name)
        placed = [
            d
            for d in self.deploys.values()
            if d.placed and family(d.name) == fam and d.state in ("seeding", "done", "placing")
        ]
        placed.sort(key=lambda d: d.finished or 0, reverse=True)
        kept_paths = {p for d in placed[:keep] for p in d.placed}
        for old in placed[keep:]:
            for path in old.placed:
                if path not in kept_paths:
                    log.info("retention: removing %s (deploy %s)", path, old.name)
                    publish.remove_placed(Path(path))
            old.placed = []
            self._write_state(old)

    def _linger_check(self, deploy: PeerDeploy) -> None:
        deploy.linger_timer = None
        handle = deploy.handle
        if deploy.state != "seeding" or handle is None or not handle.is_valid():
            return
        c = self.cfg["peer"]
        elapsed = time.time() - (deploy.finished or time.time())
        st = handle.status()
        leechers = max(st.num_incomplete, 0) + sum(
            1 for p in handle.get_peer_info() if not p.flags & p.seed
        )
        if leechers and elapsed < c["max_linger_seconds"]:
            deploy.linger_timer = asyncio.get_running_loop().call_later(
                min(5.0, c["max_linger_seconds"] - elapsed), self._linger_check, deploy
            )
            return
        log.info(
            "deploy %s: done seeding after %.0fs (%d leechers left)", deploy.name, elapsed, leechers
        )
        self._finish(deploy)

    def _finish(self, deploy: PeerDeploy) -> None:
        self._drop_from_session(deploy, delete_staging=True)
        self._set_state(deploy, "done")

    def _fail(self, deploy: PeerDeploy, reason: str) -> None:
        log.error("deploy %s (%s) failed: %s", deploy.name, deploy.info_hash, reason)
        self._drop_from_session(deploy, delete_staging=True)
        self._paths(deploy.info_hash)[2].unlink(missing_ok=True)
        self._set_state(deploy, "failed", reason)

    def _drop_from_session(self, deploy: PeerDeploy, delete_staging: bool) -> None:
        for timer in (deploy.linger_timer, deploy.retry_timer):
            if timer is not None:
                timer.cancel()
        deploy.linger_timer = deploy.retry_timer = None
        self._ungate(deploy)
        self._close_digest(deploy)
        if deploy.handle is not None:
            self.by_handle.pop(deploy.handle, None)
            if deploy.handle.is_valid():
                self.session.remove_torrent(deploy.handle)
        deploy.handle = None
        if delete_staging:
            publish.remove_placed(self._staging(deploy))

    # --- HTTP (metrics live here; see murderd.metrics) --------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", lambda request: web.Response(text="ok\n"))
        app.router.add_get("/deploys", self._deploys)
        app.router.add_get("/metrics", self.metrics.handle)
        return app

    async def _deploys(self, request: web.Request) -> web.Response:
        return web.json_response({"deploys": [d.record() for d in self.deploys.values()]})


def main() -> None:
    sys.exit(runtime.run(PeerService))

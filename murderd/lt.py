"""The only module that imports libtorrent.

It checks the version (2.0.x and 2.1.x are supported), holds the session settings tuned for
a LAN deploy swarm, builds sessions, bridges libtorrent alerts into the asyncio loop, and
hides the API differences between 2.0 and 2.1 (creating torrents).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import warnings
from typing import Callable

import libtorrent as _lt

log = logging.getLogger(__name__)

VERSION = tuple(int(part) for part in _lt.__version__.split(".")[:2])
if VERSION < (2, 0):
    raise ImportError(f"murderd needs libtorrent 2.0 or newer, found {_lt.__version__}")

lt = _lt  # for the few callers that need a libtorrent type (alerts, flags, torrent_info)
bencode = _lt.bencode


def bdecode(data: bytes):
    """Decode bencoded bytes; ValueError (never a crash) on anything malformed."""
    try:
        value = _lt.bdecode(bytes(data))
    except RuntimeError as exc:
        raise ValueError(f"malformed bencoding: {exc}") from None
    if value is None:
        raise ValueError("malformed bencoding")
    return value


def torrent_info(data: bytes, max_pieces: int = 10_000_000) -> _lt.torrent_info:
    """Parse a .torrent file's bytes; ValueError on anything libtorrent refuses."""
    try:
        limits = {"max_buffer_size": max(len(data), 1), "max_pieces": max_pieces}
        return _lt.torrent_info(bytes(data), limits)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"not a valid torrent: {exc}") from None


def create_torrent(files: list[tuple[str, int]], piece_size: int, fmt: str):
    """A create_torrent for files [(path relative to the parent dir, size)], on 2.0 and 2.1.

    2.1 deprecates file_storage + add_files and takes a list of create_file_entry; 2.0 only
    has the former.  fmt is 'v1', 'hybrid' or 'v2'.
    """
    flags = {"v1": _lt.create_torrent.v1_only, "v2": _lt.create_torrent.v2_only}.get(fmt, 0)
    if hasattr(_lt, "create_file_entry"):
        entries = [_lt.create_file_entry(path, size) for path, size in files]
        return _lt.create_torrent(entries, piece_size, flags)
    storage = _lt.file_storage()
    for path, size in files:
        storage.add_file(path, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ct = _lt.create_torrent(storage, piece_size, flags)
    # 2.0's create_torrent keeps a reference to the file_storage: keep it alive with ct.
    ct.murderd_storage = storage
    return ct


def set_piece_hashes(ct, parent_dir: str, progress: Callable[[int], None] | None = None):
    if progress is None:
        _lt.set_piece_hashes(ct, parent_dir)
    else:
        _lt.set_piece_hashes(ct, parent_dir, progress)


def lan_settings(
    listen_interfaces: str,
    *,
    upload_rate_limit: int = 0,
    download_rate_limit: int = 0,
    announce_ip: str = "",
    seeder: bool = False,
    fingerprint: str = "-MD0000-",
) -> dict:
    """Session settings for a deploy swarm on a LAN.

    libtorrent's defaults suit the public internet: DHT/LSD/UPnP on, a 300 s floor under the
    tracker's interval, one connection per IP, a handful of active torrents.  A deploy fleet
    wants the opposite: private trackers only, prompt announces, every torrent active, TCP only
    (uTP cost 4x the CPU for nothing on a LAN).
    """
    base = _lt.high_performance_seed() if seeder else _lt.default_settings()
    settings = dict(base)
    settings.update(
        {
            "listen_interfaces": listen_interfaces,
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_incoming_utp": False,
            "enable_outgoing_utp": False,
            "allow_multiple_connections_per_ip": True,
            "min_announce_interval": 1,
            "announce_to_all_trackers": True,
            "announce_to_all_tiers": True,
            "active_downloads": -1,
            "active_seeds": -1,
            "active_limit": -1,
            "active_checking": 4,
            "dont_count_slow_torrents": False,
            "auto_manage_startup": 0,
            "connection_speed": 200,
            "peer_connect_timeout": 3,
            "handshake_timeout": 5,
            "request_timeout": 10,
            "inactivity_timeout": 60,
            "unchoke_slots_limit": -1,
            "choking_algorithm": 0,  # fixed slots; with no limit, everyone is unchoked
            "seed_choking_algorithm": 1,  # fastest upload: feed whoever drains fastest
            "upload_rate_limit": upload_rate_limit,
            "download_rate_limit": download_rate_limit,
            # Short request queues (bench/: 2.31 -> 1.92 x the limit at N=8 with the seeder
            # settings below).  A piece asked of the seeder is invisible to the other peers
            # until it arrives, so they ask the seeder for it too: the shorter the wait, the
            # fewer pieces the seeder sends twice.  Note: libtorrent replaces
            # max_out_request_queue with the remote's "reqq" (its
            # max_allowed_in_request_queue) once the extension handshake is in, so between
            # murderd daemons the cap is 2000, and a connection in slow start grows its
            # queue to the seeder to 100-300 blocks (bench/ trace_peers).  A cap of 16-64 on
            # the seeder measured within the noise (README, session 4).
            "max_out_request_queue": 32,
            "max_allowed_in_request_queue": 2000,
            # 0 (a connection asks for libtorrent's floor and whole pieces, not a second's
            # worth at its rate) was faster with the seeder's slice rebalancing: bench/ N=8,
            # interleaved, 7.18 and 7.21 s against 7.84 and 7.55 s with 1.  Back to 1: with
            # 0, tests/faults/test_disk_faults.py's staging-full test twice saw its resumed
            # download get no data for 90 s (in full test runs; never alone).  Not proven
            # to be the cause, but the only change of that session a non-following peer
            # sees; see README (session 4).
            "request_queue_time": 1,
            "whole_pieces_threshold": 5,
            # Received blocks wait in memory for the disk up to this much (default 100 MiB):
            # a peer fetching 2 GiB as fast as loopback allows peaked at 176 MiB RSS, with
            # this at 78 MiB, no slower (bench/peermem.py).
            "max_queued_disk_bytes": 8 * 1024 * 1024,
            # Finished peers keep their connections (to the seeder too) until they stop
            # seeding: the byte accounting (seeder vs peers) stays complete.
            "close_redundant_connections": False,
            "smooth_connects": False,
            "tracker_completion_timeout": 10,
            "tracker_receive_timeout": 5,
            "stop_tracker_timeout": 2,
            # Retry an unreachable tracker after ~7 s, then ~20 s (default: ~17 s, then ~1 min):
            # on a LAN that is a tracker restarting, and a new peer knows nobody until then.
            "tracker_backoff": 50,
            # Two peers that learn of each other at once (a late announce, a tracker restart)
            # connect both ways; libtorrent drops both as duplicates and waited 60 s (x fails)
            # to try again, stalling the deploy: on a LAN, try again in seconds.
            "min_reconnect_time": 2,
            # A peer blocks the seeder's address while its slice comes over HTTP
            # (piecehttp.py); the tracker often runs on the seeder's host.
            "apply_ip_filter_to_trackers": False,
            "user_agent": "murderd/libtorrent-" + _lt.__version__,
            # Peer ids tell seeders (-MS) from peers (-MP) in peer lists and accounting.
            "peer_fingerprint": fingerprint,
            "alert_mask": _lt.alert.category_t.error_notification
            | _lt.alert.category_t.status_notification
            | _lt.alert.category_t.storage_notification
            | _lt.alert.category_t.tracker_notification,
            "alert_queue_size": 10000,
        }
    )
    if not seeder:
        # piece_finished_alert: a peer hashes each deploy as its pieces come (digest.py).
        settings["alert_mask"] |= _lt.alert.category_t.piece_progress_notification
        # Other peers may queue at most 8 blocks (128 KiB) at this one (its "reqq"), and a
        # piece's blocks are asked of every peer that has it (whole_pieces_threshold 0).
        # With 2000, each asked for a second's worth of its rate: a piece that had just
        # reached its owner waited behind 7 such queues (about 0.9 s at N=8) before it went
        # on, and the deploy's tail was that long.  bench/ N=8, medians of 3, interleaved:
        # 16 blocks 6.65, 6.61, 6.73, 6.82 s against 7.06, 6.92 s.  Session 8: with whole
        # pieces, every peer had asked a busy peer for the whole of a piece that peers with
        # idle uploads had too, and it waited in that queue.  bench/ N=16, 128 KiB pieces,
        # medians of 3: 9.05 s against 9.35 (16 blocks) and 9.12 (8, whole pieces); N=2
        # 5.95 s against 6.19.  8 blocks cover 5 ms of round trip at 25 MB/s per
        # connection; a peer's requests to the seeder are not capped (2000).
        settings["max_allowed_in_request_queue"] = 8
        settings["whole_pieces_threshold"] = 0
        # Tell the other peers of a piece 300 ms before it is expected in (and hashed):
        # their requests for it wait here instead of a round trip after the HAVE, and
        # libtorrent rejects them (and says "don't have") if the piece then fails its hash.
        # bench/ N=16, medians of 3 interleaved with 0 (session 10): 9.12 / 9.09 / 9.22 /
        # 9.22 / 9.18 / 8.97 s against 9.47 / 9.19 / 9.23 / 9.47 / 9.12 / 9.06; 100 ms and
        # 1000 ms no better than 0; N=2 and N=8 unchanged.
        settings["predictive_piece_announce"] = 300
    if seeder:
        settings.update(
            {
                # high_performance_seed suggests the pieces in its read cache, i.e. the ones
                # just sent to other peers: peers then ask the seeder for those again.
                "suggest_mode": 0,
                # Small send buffers (libtorrent's and the socket's): data queued for one peer
                # is a piece no other peer can see yet, and the seeder's upload is the one
                # scarce resource of a deploy swarm.
                "send_buffer_watermark": 256 * 1024,
                "send_buffer_low_watermark": 64 * 1024,
                "send_buffer_watermark_factor": 50,
                "send_socket_buffer_size": 128 * 1024,
                # No allowed-fast set (BEP 6).  The set is derived from the peer's address
                # masked to /24, so on a LAN every peer is allowed the same few pieces and
                # asks the seeder for exactly those first (bench/blocktrace.py: 5 pieces sent
                # to 6-8 peers each in the first second of an 8-host deploy).
                "allowed_fast_set_size": 0,
            }
        )
    if announce_ip:
        settings["announce_ip"] = announce_ip
    bound = bound_addresses(listen_interfaces)
    if bound:
        # Listening on given addresses only: connect out from them too, so that other
        # peers (and their ip_filter rules, piecehttp.py) see this host by one address.
        settings["outgoing_interfaces"] = ",".join(bound)
    return settings


def bound_addresses(listen_interfaces: str) -> list[str]:
    """The addresses listen_interfaces names, if it names only specific ones (else [])."""
    found = []
    for item in listen_interfaces.split(","):
        host = item.strip().rsplit(":", 1)[0].strip("[]")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return []  # a device name, or no host
        if address.is_unspecified:
            return []
        found.append(str(address))
    return found


def make_session(settings: dict) -> _lt.session:
    """A session with our settings; LAN peers obey the rate limits too.

    Peers in private ranges are in libtorrent's *local* peer class, which ignores the global
    upload/download limits; give that class the same limits so a cap means a cap.
    """
    params = _lt.session_params()
    params.settings = settings
    session = _lt.session(params)
    up = settings.get("upload_rate_limit", 0)
    down = settings.get("download_rate_limit", 0)
    if up or down:
        for class_id in (session.local_peer_class_id, session.global_peer_class_id):
            info = session.get_peer_class(class_id)
            info["upload_limit"] = up
            info["download_limit"] = down
            session.set_peer_class(class_id, info)
    return session


def apply_rate_limits(session: _lt.session, up: int, down: int) -> None:
    session.apply_settings({"upload_rate_limit": up, "download_rate_limit": down})
    for class_id in (session.local_peer_class_id, session.global_peer_class_id):
        info = session.get_peer_class(class_id)
        info["upload_limit"] = up
        info["download_limit"] = down
        session.set_peer_class(class_id, info)


class AlertPump:
    """Delivers libtorrent alerts to a callback on the asyncio loop, without polling.

    libtorrent writes a byte to a socket when its alert queue becomes non-empty; the loop
    watches the other end and drains the queue with pop_alerts().
    """

    def __init__(self, session: _lt.session, handler: Callable[[object], None]):
        self.session = session
        self.handler = handler
        self._rx, self._tx = socket.socketpair()
        self._rx.setblocking(False)
        self._tx.setblocking(False)
        self._loop = asyncio.get_running_loop()
        session.set_alert_fd(self._tx.fileno())
        self._loop.add_reader(self._rx.fileno(), self.drain)

    def drain(self) -> None:
        try:
            while self._rx.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        for alert in self.session.pop_alerts():
            try:
                self.handler(alert)
            except Exception:
                log.exception("error handling %s", type(alert).__name__)

    def close(self) -> None:
        """Stop delivering alerts and let the session go; call after dropping your own
        reference to the session.

        No Python callback is ever handed to libtorrent (a libtorrent thread calling into a
        finalizing interpreter aborts the process): the session is destroyed here, which
        joins its threads, and only then is the socket it writes to closed.
        """
        self._loop.remove_reader(self._rx.fileno())
        self.session = None  # the last reference: libtorrent shuts down and joins its threads
        self._rx.close()
        self._tx.close()


def info_hash_hex(handle_or_info) -> str:
    """The v1 info-hash (or the truncated v2 one for a v2-only torrent) as 40 hex chars."""
    hashes = handle_or_info.info_hashes()
    if hashes.has_v1():
        return str(hashes.v1)
    return str(hashes.v2)[:40]


def post_session_stats(session: _lt.session) -> None:
    """Ask for the session counters; they come back as a session_stats_alert."""
    session.post_session_stats()


def session_stats_values(alert) -> dict | None:
    """{counter name: value} (e.g. net.sent_payload_bytes) from a session_stats_alert, or
    None for any other alert."""
    if not isinstance(alert, _lt.session_stats_alert):
        return None
    return dict(alert.values)


def check_pieces(ti: _lt.torrent_info, save_path: str, timeout: float = 3600.0) -> list[int]:
    """Hash-check data under save_path against a torrent (any format); bad piece indexes.

    Blocking (for murderctl): a throwaway session with no network checks the files.
    """
    import time

    settings = {
        "listen_interfaces": "",
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "alert_mask": _lt.alert.category_t.status_notification
        | _lt.alert.category_t.error_notification,
    }
    session = _lt.session(settings)
    params = _lt.add_torrent_params()
    params.ti = ti
    params.save_path = save_path
    # Not paused (a paused torrent is not checked); stop once checked; never download.
    params.flags = _lt.torrent_flags.stop_when_ready | _lt.torrent_flags.upload_mode
    handle = session.add_torrent(params)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        session.wait_for_alert(500)
        for alert in session.pop_alerts():
            if isinstance(alert, _lt.torrent_checked_alert):
                pieces = handle.status().pieces
                return [i for i, have in enumerate(pieces) if not have]
    raise TimeoutError("hash check did not finish in time")


def staggered_priorities(num_pieces: int, offset: int, levels: int = 2) -> list[int]:
    """Piece priorities that start a download at piece `offset`: `levels` equal bands wrapping
    round the file from there, at priority `levels` down to 1 (never 0: "do not download").

    libtorrent's picker ranks a piece by availability x (8 - priority): with priorities 2 and
    1, rarity still comes first (a piece one more peer has never wins) and the band only breaks
    ties, so peers starting at different offsets ask the seeder for different pieces among
    the equally rare ones.  bench/: top priorities (7 and 6) helped at N=8 but made N=2 and
    N=16 worse: a peer then asked the seeder for its own band's pieces that others had.
    """
    levels = max(1, min(levels, 7))
    num_pieces = max(num_pieces, 1)
    offset %= num_pieces
    out = [0] * num_pieces
    for distance in range(num_pieces):
        out[(offset + distance) % num_pieces] = levels - distance * levels // num_pieces
    return out


def prioritize_pieces(handle, priorities: list[int]) -> None:
    """Set every piece's priority (1..7; 0 would mean "do not download")."""
    handle.prioritize_pieces(priorities)


DEFAULT_PRIORITY = 4  # libtorrent's own for every piece


def default_priorities(handle, count: int) -> None:
    """Every one of count pieces back to libtorrent's default: any piece from anyone."""
    handle.prioritize_pieces([DEFAULT_PRIORITY] * count)

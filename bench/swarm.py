"""The swarm benchmark: one file from host 0 to N hosts, three ways, over capped links.

- murderd: murder-tracker and murder-seeder on host 0, one murder-peer on each other host; the
  clock runs from the file landing in the seeder's drop dir to the last peer's copy being in
  its destination dir (hashing, publishing, announcing, transfer, verify, atomic move).
- http: one HTTP server on host 0, every peer fetches the file with curl at the same moment.
- client: opentracker (whitelist) and an aria2c seed on host 0, aria2c on each other host;
  the clock runs from starting the peers (torrent made, seed announced) to the last peer
  finishing: generous to the client, which gets its hashing and seeding set-up for free.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

from murderd import fsutil, torrent
from murderd.localfleet import Daemon, write_config, write_peer_config
from murderd.lt import bdecode

from .common import Processes, limit_seconds, override_env, proc_cpu_seconds
from .netns import TBF_GOODPUT, Testbed, run, wait_port

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
TRACKER_PORT = 8998
SEEDER_HTTP_PORT = 8999
BT_PORT = 6881
HTTP_PORT = 8080
OPENTRACKER_PORT = 6969
POLL = 0.02


@dataclass
class SwarmRun:
    kind: str  # murderd, http or client
    peers: int
    rate_bit: int
    size: int
    limit: float  # seconds
    seconds: float | None = None  # start -> last peer done
    per_host: list = field(default_factory=list)  # seconds from start, per peer (None: never)
    ok: bool = False
    error: str = ""
    detail: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return self.seconds / self.limit if self.seconds else None

    def record(self) -> dict:
        out = asdict(self)
        out["ratio"] = None if self.ratio is None else round(self.ratio, 3)
        out["seconds"] = None if self.seconds is None else round(self.seconds, 3)
        out["limit"] = round(self.limit, 3)
        out["per_host"] = [None if t is None else round(t, 3) for t in self.per_host]
        return out


def _new_run(kind: str, peers: int, bed: Testbed, size: int) -> SwarmRun:
    return SwarmRun(kind, peers, bed.rate_bit, size, limit_seconds(size, bed.rate_bit, TBF_GOODPUT))


def _timeout(run_: SwarmRun, factor: float) -> float:
    return 30.0 + factor * run_.limit


def _wait_all(done: dict, check, deadline: float) -> None:
    """Call check() every POLL seconds until it has filled done for every key or deadline."""
    while time.monotonic() < deadline:
        check()
        if all(v is not None for v in done.values()):
            return
        time.sleep(POLL)


def _counters(bed: Testbed, hosts: int) -> list:
    return bed.counters()[: hosts + 1]


class Timeline:
    """Bytes host 0 sent, each peer received, and each peer sent, every `every` seconds.

    A sample: [seconds, host 0 sent, peer 1..N received, peer 1..N sent].
    """

    def __init__(self, bed: Testbed, hosts: int, started: float, every: float = 0.5):
        self.bed, self.hosts, self.started, self.every = bed, hosts, started, every
        self.base = _counters(bed, hosts)
        self.samples: list = []
        self.next = time.monotonic()

    def poll(self) -> None:
        if time.monotonic() < self.next:
            return
        self.next += self.every
        now = _counters(self.bed, self.hosts)
        self.samples.append(
            [round(time.time() - self.started, 2), now[0][0] - self.base[0][0]]
            + [c[1] - b[1] for c, b in zip(now[1:], self.base[1:])]
            + [c[0] - b[0] for c, b in zip(now[1:], self.base[1:])]
        )


def _traffic(before: list, after: list, size: int) -> dict:
    """Bytes each host sent, as multiples of the file size (host 0 is the source)."""
    sent = [(a[0] - b[0]) / size for a, b in zip(after, before)]
    return {"source_upload_x": round(sent[0], 3), "peer_upload_x": [round(s, 3) for s in sent[1:]]}


# --- murderd ------------------------------------------------------------------------------


def run_murderd(
    bed: Testbed,
    peers: int,
    source: Path,
    work: Path,
    *,
    mode: str = "follow",
    lt_overrides: dict | None = None,
    conf_set: dict | None = None,
    piece_size: int = 0,
    log_level: str = "info",
    timeline_every: float = 0.0,
) -> SwarmRun:
    """Drop source on host 0's seeder; the clock stops when hosts 1..peers have it placed."""
    result = _new_run("murderd", peers, bed, source.stat().st_size)
    conf_set = conf_set or {}
    result.detail.update(
        mode=mode, lt_overrides=lt_overrides or {}, config=conf_set, piece_size=piece_size
    )
    root = work / f"murderd-{peers}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    token = root / "token"
    fsutil.atomic_write(token, os.urandom(16).hex().encode(), mode=0o600)
    seeder_ip = bed.address(0)
    env = override_env(lt_overrides or {})
    seeder_dir = root / "seeder"
    drop_dir, publish_dir = seeder_dir / "drop", seeder_dir / "publish"
    publish_dir.mkdir(parents=True)
    drop_dir.mkdir(parents=True)
    log_cfg = {"level": log_level}
    tracker_cfg = write_config(
        root / "tracker",
        {
            "log": log_cfg,
            "tracker": {
                "listen": f"{seeder_ip}:{TRACKER_PORT}",
                "torrents_dir": str(publish_dir),
                "state_dir": str(root / "tracker" / "state"),
                "token_file": str(token),
                "interval": 15,
                "min_interval": 1,
                **conf_set.get("tracker", {}),
            },
        },
    )
    seeder_cfg = write_config(
        seeder_dir,
        {
            "log": log_cfg,
            "seeder": {
                "drop_dir": str(drop_dir),
                "publish_dir": str(publish_dir),
                "state_dir": str(seeder_dir / "state"),
                "http_listen": f"{seeder_ip}:{SEEDER_HTTP_PORT}",
                "trackers": [f"http://{seeder_ip}:{TRACKER_PORT}/announce"],
                "token_file": str(token),
                "listen_interfaces": f"{seeder_ip}:{BT_PORT}",
                "piece_size": piece_size,
                **conf_set.get("seeder", {}),
            },
        },
    )
    daemons = [
        Daemon("tracker", tracker_cfg, root / "tracker", env, bed.exec_prefix(0)),
        Daemon("seeder", seeder_cfg, seeder_dir, env, bed.exec_prefix(0)),
    ]
    peer_dirs = []
    for host in range(1, peers + 1):
        base = root / f"peer{host}"
        peer_dirs.append(base)
        follow_url = f"http://{seeder_ip}:{SEEDER_HTTP_PORT}/index.json"
        cfg = write_peer_config(
            base,
            log_cfg,
            f"{bed.address(host)}:{BT_PORT}",
            follow_url if mode == "follow" else "",
            **{"linger_seconds": 60, **conf_set.get("peer", {})},
        )
        daemons.append(Daemon("peer", cfg, base, env, bed.exec_prefix(host)))
    name = source.name
    try:
        # The source host first, then the peers: a fleet is up before a deploy lands, and a
        # peer whose first index.json fetch found no seeder would wait out its retry.
        for group in (daemons[:2], daemons[2:]):
            for daemon in group:
                daemon.start(wait=False)
            for daemon in group:
                daemon.wait_message("READY=1", 60)
        # The file is linked in under a temporary name first: the drop itself is one rename.
        staged = drop_dir / f"{name}.part"
        try:
            os.link(source, staged)
        except OSError:
            shutil.copyfile(source, staged)
        cpu_before = [proc_cpu_seconds(d.proc.pid) for d in daemons]
        before = _counters(bed, peers)
        started = time.time()
        os.replace(staged, drop_dir / name)
        deadline = time.monotonic() + _timeout(result, 8)
        timeline = Timeline(bed, peers, started, timeline_every) if timeline_every else None
        placed = {i: None for i in range(peers)}
        published = {"torrent": None}
        pending = set(range(peers))

        def check():
            now = time.time()
            if timeline:
                timeline.poll()
            if mode == "drop" and published["torrent"] is None:
                path = publish_dir / f"{name}.torrent"
                if path.exists():
                    published["torrent"] = now - started
                    for base in peer_dirs:  # what a deploy tool pushing the torrent does
                        tmp = base / "drop" / f"{name}.torrent.part"
                        shutil.copyfile(path, tmp)
                        os.replace(tmp, base / "drop" / f"{name}.torrent")
            for i in list(pending):
                if (peer_dirs[i] / "dest" / name).exists():
                    placed[i] = now - started
                    pending.discard(i)

        _wait_all(placed, check, deadline)
        after = _counters(bed, peers)
        cpu = [proc_cpu_seconds(d.proc.pid) - b for d, b in zip(daemons, cpu_before)]
        window = time.time() - started
        states = [_peer_state(base, name) for base in peer_dirs]
        result.per_host = []
        accepted = []
        for i, state in enumerate(states):
            finished = state.get("finished")
            result.per_host.append(finished - started if finished else placed[i])
            if state.get("created"):
                accepted.append(round(state["created"] - started, 3))
        result.detail.update(_traffic(before, after, result.size))
        result.detail["accepted_at"] = accepted  # when each peer learned of the deploy
        if timeline:
            # [t, source sent, peer 1 received, ...] in bytes since the drop
            result.detail["timeline"] = timeline.samples
        result.detail["from_seeder_x"] = [
            round(s.get("bytes_from_seeder", 0) / result.size, 3) for s in states
        ]
        result.detail["cpu_seconds"] = {
            "tracker": round(cpu[0], 2),
            "seeder": round(cpu[1], 2),
            "peers": round(sum(cpu[2:]), 2),
        }
        # The share of the machine the daemons used while the file went round: near 1, the
        # hosts (all on this machine) wait for CPU and T measures the machine, not the swarm.
        result.detail["cores_busy"] = round(sum(cpu) / (window * (os.cpu_count() or 1)), 3)
        result.detail["seeder_log"] = _grep(daemons[1].log_text(), ("hashed", "published"))
        missing = [i + 1 for i, t in enumerate(result.per_host) if t is None]
        if missing:
            result.error = f"hosts {missing} never placed the file"
        else:
            sizes = {(base / "dest" / name).stat().st_size for base in peer_dirs}
            result.ok = sizes == {result.size}
            if not result.ok:
                result.error = f"placed sizes {sizes} != {result.size}"
            result.seconds = max(result.per_host)
        for state in states:
            if state.get("state") == "failed":
                result.ok = False
                result.error = f"a peer failed: {state.get('error')}"
    except Exception as exc:  # one broken run must not lose the others' figures
        log.exception("murderd run with %d peers failed", peers)
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        for daemon in daemons:
            try:
                daemon.stop(timeout=10)
            except AssertionError:
                pass
            daemon.close()
        _keep_logs(root, daemons, work / "logs" / f"murderd-{peers}")
        shutil.rmtree(root, ignore_errors=True)
    return result


def _peer_state(base: Path, name: str) -> dict:
    for path in sorted((base / "state").glob("*.json")):
        try:
            state = fsutil.read_json(path)
        except (OSError, ValueError):
            continue
        if state.get("name") == name:
            return state
    return {}


def _grep(text: str, words: tuple) -> list:
    return [line[:300] for line in text.splitlines() if any(w in line for w in words)][:10]


def _keep_logs(root: Path, daemons: list, target: Path) -> None:
    """Keep each daemon's log of the last run (for looking into a slow or failed run)."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True, exist_ok=True)
    for i, daemon in enumerate(daemons):
        for path in (daemon.log_path, daemon.stderr_path):
            if path.exists() and path.stat().st_size:
                shutil.copyfile(path, target / f"{i:02d}-{path.name}")


# --- HTTP fan-out -------------------------------------------------------------------------


def run_http(bed: Testbed, peers: int, source: Path, work: Path) -> SwarmRun:
    """One HTTP server on host 0; every peer fetches source at once (curl)."""
    result = _new_run("http", peers, bed, source.stat().st_size)
    root = work / f"http-{peers}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    url = f"http://{bed.address(0)}:{HTTP_PORT}/{urllib.parse.quote(source.name)}"
    result.detail["server"] = "python3 -m http.server (ThreadingHTTPServer)"
    with Processes() as procs:
        try:
            procs.start(
                [
                    *bed.exec_prefix(0),
                    "python3",
                    "-m",
                    "http.server",
                    str(HTTP_PORT),
                    "--bind",
                    bed.address(0),
                    "--directory",
                    str(source.parent),
                ],  # fmt: skip
                log=root / "server.log",
            )
            wait_port(bed, 1, bed.address(0), HTTP_PORT)
            before = _counters(bed, peers)
            started = time.time()
            clients = [
                procs.start(
                    [*bed.exec_prefix(h), "curl", "-sS", "-o", str(root / f"peer{h}.bin"), url],
                    log=root / f"curl{h}.log",
                )
                for h in range(1, peers + 1)
            ]
            done = {i: None for i in range(peers)}

            def check():
                now = time.time()
                for i, proc in enumerate(clients):
                    if done[i] is None and proc.poll() is not None:
                        done[i] = now - started

            _wait_all(done, check, time.monotonic() + _timeout(result, 3 * peers))
            after = _counters(bed, peers)
            result.per_host = [done[i] for i in range(peers)]
            result.detail.update(_traffic(before, after, result.size))
            failed = [i + 1 for i, p in enumerate(clients) if p.poll() != 0]
            sizes = {
                (root / f"peer{h}.bin").stat().st_size if (root / f"peer{h}.bin").exists() else 0
                for h in range(1, peers + 1)
            }
            if failed:
                result.error = f"curl failed or timed out on hosts {failed}"
            elif sizes != {result.size}:
                result.error = f"fetched sizes {sizes} != {result.size}"
            else:
                result.ok = True
                result.seconds = max(result.per_host)
        except Exception as exc:
            log.exception("http run with %d peers failed", peers)
            result.error = f"{type(exc).__name__}: {exc}"
    shutil.rmtree(root, ignore_errors=True)
    return result


# --- aria2c + opentracker -----------------------------------------------------------------


ARIA2_COMMON = [
    "--enable-dht=false",
    "--enable-dht6=false",
    "--bt-enable-lpd=false",
    "--seed-ratio=0.0",
    "--summary-interval=0",
    "--console-log-level=warn",
    f"--listen-port={BT_PORT}",
    "--check-certificate=false",
]


def _scrape_complete(bed: Testbed, info_hash: str) -> int:
    quoted = urllib.parse.quote_from_bytes(bytes.fromhex(info_hash))
    url = f"http://{bed.address(0)}:{OPENTRACKER_PORT}/scrape?info_hash={quoted}"
    argv = [*bed.exec_prefix(0), "curl", "-s", "--max-time", "2", url]
    out = subprocess.run(argv, capture_output=True, timeout=10).stdout
    try:
        files = bdecode(out)[b"files"]
        return next(iter(files.values()))[b"complete"]
    except (ValueError, KeyError, TypeError, StopIteration):
        return 0


def run_client(bed: Testbed, peers: int, source: Path, work: Path) -> SwarmRun:
    """aria2c seed + opentracker on host 0, aria2c on hosts 1..peers (a v1 torrent)."""
    result = _new_run("client", peers, bed, source.stat().st_size)
    root = work / f"client-{peers}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    version = run("aria2c", "--version", check=False).stdout.split("\n", 1)[0]
    result.detail["client"] = version
    tracker_dir = root / "opentracker"
    tracker_dir.mkdir()
    os.chmod(root, 0o755)
    os.chmod(tracker_dir, 0o755)
    hook = root / "done.sh"
    hook.write_text('#!/bin/sh\ndate +%s.%N > "$MURDERBENCH_DONE"\n')
    hook.chmod(0o755)
    with Processes() as procs:
        try:
            made_at = time.monotonic()
            announce = f"http://{bed.address(0)}:{OPENTRACKER_PORT}/announce"
            made = torrent.make_torrent(source, [announce], fmt="v1")
            result.detail["torrent_seconds"] = round(time.monotonic() - made_at, 3)
            result.detail["piece_size"] = made.piece_size
            torrent_path = root / f"{source.name}.torrent"
            torrent_path.write_bytes(made.data)
            (tracker_dir / "whitelist").write_text(made.info_hash + "\n")
            os.chmod(tracker_dir / "whitelist", 0o644)
            procs.start(
                [
                    *bed.exec_prefix(0),
                    "opentracker",
                    "-i",
                    bed.address(0),
                    "-p",
                    str(OPENTRACKER_PORT),
                    "-P",
                    str(OPENTRACKER_PORT),
                    "-d",
                    str(tracker_dir),
                    "-w",
                    "whitelist",
                    "-u",
                    "nobody",
                ],  # fmt: skip
                log=root / "opentracker.log",
            )
            wait_port(bed, 1, bed.address(0), OPENTRACKER_PORT)
            procs.start(
                [
                    *bed.exec_prefix(0),
                    "aria2c",
                    *ARIA2_COMMON,
                    "-V",
                    "--bt-seed-unverified",
                    f"--dir={source.parent}",
                    str(torrent_path),
                ],  # fmt: skip
                log=root / "seed.log",
            )
            deadline = time.monotonic() + 30
            while _scrape_complete(bed, made.info_hash) < 1:
                if time.monotonic() > deadline:
                    raise TimeoutError("the aria2c seed never announced to opentracker")
                time.sleep(0.1)
            before = _counters(bed, peers)
            started = time.time()
            for h in range(1, peers + 1):
                dest = root / f"peer{h}"
                dest.mkdir()
                procs.start(
                    [
                        *bed.exec_prefix(h),
                        "aria2c",
                        *ARIA2_COMMON,
                        "--file-allocation=falloc",
                        f"--dir={dest}",
                        f"--on-bt-download-complete={hook}",
                        str(torrent_path),
                    ],  # fmt: skip
                    log=root / f"peer{h}.log",
                    env=dict(os.environ, MURDERBENCH_DONE=str(root / f"peer{h}.done")),
                )
            done = {i: None for i in range(peers)}

            def check():
                for i in range(peers):
                    marker = root / f"peer{i + 1}.done"
                    if done[i] is None and marker.exists():
                        text = marker.read_text().strip()
                        if text:
                            done[i] = float(text) - started

            _wait_all(done, check, time.monotonic() + _timeout(result, 12))
            after = _counters(bed, peers)
            result.per_host = [done[i] for i in range(peers)]
            result.detail.update(_traffic(before, after, result.size))
            missing = [i + 1 for i in range(peers) if done[i] is None]
            if missing:
                result.error = f"aria2c never finished on hosts {missing}"
            else:
                result.ok = True
                result.seconds = max(result.per_host)
        except Exception as exc:
            log.exception("client run with %d peers failed", peers)
            result.error = f"{type(exc).__name__}: {exc}"
    shutil.rmtree(root, ignore_errors=True)
    return result

"""murderctl: the operator's command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import __version__, config, fsutil, torrent
from .console import Bar, Digest, Output, human_age, human_size

EX_USAGE = 2
EX_ERROR = 2  # status/wait/publish/fetch/list: something is wrong (the message says what)
EX_NOT_DONE = 1  # wait/publish/fetch: timed out, or the deploy failed on this host

HTTP_TIMEOUT = 10.0
POLL_SECONDS = 0.5
TRACKER_ERROR_GRACE = 10.0  # wait: tracker errors tolerated this long once it answered
TRACKER_CONFIRM_SECONDS = 10.0  # publish: how long to wait for the tracker to know the deploy
MAX_TORRENT_BYTES = 16 * 1024 * 1024
SLOWEST_HOSTS = 5
SEEDER_PEER_ID = b"-MS"  # murder-seeder's peer-id prefix (murderd.lt fingerprints)
HEX40 = re.compile(r"[0-9a-fA-F]{40}")


class CtlError(Exception):
    """A command cannot go on; str() is the message (exit EX_ERROR)."""


class UnknownDeploy(CtlError):
    pass


def cmd_check_config(args) -> int:
    cfg = config.load_or_report(args.config, "murderctl")
    if cfg is None:
        return config.EX_CONFIG
    sys.stdout.write(cfg.render())
    return 0


def cmd_make_torrent(args) -> int:
    source = Path(args.file)
    out = Path(args.out) if args.out else Path(f"{source.name}.torrent")
    try:
        made = torrent.make_torrent(source, args.tracker, args.piece_size, args.format)
    except (torrent.TorrentError, OSError) as exc:
        print(f"murderctl: {exc}", file=sys.stderr)
        return 1
    from .fsutil import atomic_write

    atomic_write(out.resolve(), made.data)
    print(f"{out}: {made.name}, {made.total_size} bytes, piece size {made.piece_size}")
    print(f"info-hash {made.info_hash}")
    for rel, digest in made.sha256.items():
        print(f"sha256 {digest}  {rel}")
    return 0


def cmd_verify(args) -> int:
    try:
        parsed = torrent.load(args.torrent)
    except (OSError, torrent.TorrentError) as exc:
        print(f"murderctl: {args.torrent}: {exc}", file=sys.stderr)
        return EX_USAGE
    target = Path(args.file)
    try:
        problems = torrent.verify_data(parsed, target)
    except OSError as exc:
        print(f"murderctl: {target}: {exc}", file=sys.stderr)
        return 1
    for line in problems:
        print(f"FAIL {line}")
    if problems:
        return 1
    print(f"OK {target} matches {parsed.name} ({parsed.info_hash})")
    return 0


# --- shared: config, URLs, HTTP --------------------------------------------------------------


def _config(args) -> config.Config:
    try:
        return config.load(args.config)
    except config.ConfigError as exc:
        raise CtlError("config error: " + "; ".join(exc.problems)) from None
    except OSError as exc:
        raise CtlError(f"cannot read the config: {exc}") from None


def local_url(hostport: str) -> str:
    """http://host:port for a listen address; a wildcard host becomes loopback."""
    host, port = config.split_hostport(hostport)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def tracker_base(args) -> str:
    """The tracker's base URL: --tracker (an announce URL works too), else [tracker] listen."""
    if args.tracker:
        url = args.tracker.rstrip("/")
        return url[: -len("/announce")] if url.endswith("/announce") else url
    return local_url(_config(args)["tracker"]["listen"])


def http_get(url: str, timeout: float = HTTP_TIMEOUT, cap: int = MAX_TORRENT_BYTES) -> bytes:
    """The body of a 200 answer; CtlError (with the HTTP status, if any) otherwise."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data = resp.read(cap + 1)
    except urllib.error.HTTPError as exc:
        body = exc.read(2000).decode(errors="replace").strip()
        try:
            body = json.loads(body).get("error", body)
        except (ValueError, AttributeError):
            pass
        error = CtlError(f"{url}: HTTP {exc.code}: {body}")
        error.status = exc.code
        raise error from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CtlError(f"cannot reach {url}: {reason}") from None
    if len(data) > cap:
        raise CtlError(f"{url}: answer larger than {cap} bytes")
    return data


def http_json(url: str):
    try:
        return json.loads(http_get(url))
    except ValueError as exc:
        raise CtlError(f"{url}: not JSON: {exc}") from None


# --- the tracker's view: status, wait --------------------------------------------------------


def hosts(deploy: dict) -> tuple[int, int]:
    """(hosts done, hosts done or downloading) of a /stats deploy."""
    return deploy["completed"], deploy["completed"] + deploy["leechers"]


def is_seeder(peer: dict) -> bool:
    try:
        return bytes.fromhex(peer["peer_id"]).startswith(SEEDER_PEER_ID)
    except (KeyError, ValueError):
        return False


def fetch_deploy(base: str, info_hash: str) -> dict:
    try:
        return http_json(f"{base}/stats/{info_hash}")["deploys"][0]
    except CtlError as exc:
        if getattr(exc, "status", None) == 404:
            raise UnknownDeploy(
                f"deploy {info_hash} is not known to the tracker at {base}"
            ) from None
        raise


def resolve_deploy(base: str, wanted: str) -> dict:
    """The /stats entry of a deploy given by info-hash or name (the newest of that name)."""
    if HEX40.fullmatch(wanted):
        return fetch_deploy(base, wanted.lower())
    deploys = http_json(f"{base}/stats")["deploys"]
    matches = [d for d in deploys if d["name"] == wanted]
    if not matches:
        names = ", ".join(sorted({d["name"] for d in deploys})[:10]) or "none"
        raise UnknownDeploy(f"unknown deploy {wanted!r} (the tracker at {base} knows: {names})")
    return max(matches, key=lambda d: d.get("added") or 0)


def _summary(deploy: dict, now: float) -> dict:
    done, total = hosts(deploy)
    added = deploy.get("added")
    out = {k: v for k, v in deploy.items() if k != "peers"}
    out.update(hosts_done=done, hosts_total=total, age=round(now - added, 1) if added else None)
    return out


def cmd_status(args) -> int:
    base = tracker_base(args)
    now = time.time()
    out = Output()
    if args.deploy:
        deploy = resolve_deploy(base, args.deploy)
        if args.json:
            print(json.dumps(dict(_summary(deploy, now), peers=deploy["peers"]), indent=1))
            return 0
        _status_one(out, deploy, now)
        return 0
    deploys = [_summary(d, now) for d in http_json(f"{base}/stats")["deploys"]]
    if args.json:
        print(json.dumps({"tracker": base, "deploys": deploys}, indent=1))
        return 0
    if not deploys:
        out.line(f"no deploys known to the tracker at {base}")
        return 0
    rows = [
        [
            d["name"],
            human_size(d["size"]),
            f"{d['hosts_done']}/{d['hosts_total']}",
            d["seeders"],
            d["leechers"],
            human_age(d["age"]),
            Digest(d["info_hash"]),
        ]
        for d in deploys
    ]
    out.table(["DEPLOY", "SIZE", "HOSTS DONE", "SEEDERS", "LEECHERS", "AGE", "INFO-HASH"], rows)
    return 0


def _status_one(out: Output, deploy: dict, now: float) -> None:
    done, total = hosts(deploy)
    added = deploy.get("added")
    out.line(
        f"{deploy['name']}  {deploy['info_hash']}  {human_size(deploy['size'])}  "
        f"age {human_age(now - added if added else None)}"
    )
    out.line(
        f"hosts: {done} done of {total}, {deploy['leechers']} downloading; "
        f"{deploy['seeders']} seeding"
    )
    peers = deploy["peers"]
    if not peers:
        out.line("no peers in the swarm right now")
        return

    def row(peer: dict) -> list:
        return [
            f"{peer['address']}:{peer['port']}",
            "seeder" if is_seeder(peer) else "peer",
            peer["state"],
            Bar(peer["progress"]),
            human_size(peer["downloaded"]),
            human_size(peer["uploaded"]),
            human_age(now - peer["last_seen"]) + " ago",
        ]

    columns = ["HOST", "ROLE", "STATE", "PROGRESS", "DOWN", "UP", "SEEN"]
    out.table(columns, [row(p) for p in sorted(peers, key=lambda p: (p["address"], p["port"]))])
    slowest = sorted((p for p in peers if p["state"] != "seeding"), key=lambda p: p["progress"])
    if slowest:
        out.line()
        out.table(columns, [row(p) for p in slowest[:SLOWEST_HOSTS]], title="slowest hosts")


def cmd_wait(args) -> int:
    if args.hosts < 1:
        raise CtlError("--hosts must be at least 1")
    base = tracker_base(args)
    deploy = resolve_deploy(base, args.deploy)
    info_hash, name, wanted = deploy["info_hash"], deploy["name"], args.hosts
    started = time.monotonic()
    deadline = started + args.timeout if args.timeout else None
    last_answer = started
    with Output().progress(f"{name}", total=wanted) as bar:
        while True:
            done, _ = hosts(deploy)
            bar.update(min(done, wanted), f"hosts done, {deploy['leechers']} downloading")
            if done >= wanted:
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                print(
                    f"murderctl: timed out after {args.timeout:g}s: {done} of {wanted} hosts "
                    f"completed {name}",
                    file=sys.stderr,
                )
                return EX_NOT_DONE
            time.sleep(min(args.interval, deadline - now) if deadline else args.interval)
            try:
                deploy = fetch_deploy(base, info_hash)
                last_answer = time.monotonic()
            except UnknownDeploy:
                raise UnknownDeploy(f"deploy {name} ({info_hash}) is no longer known") from None
            except CtlError:
                if time.monotonic() - last_answer > TRACKER_ERROR_GRACE:
                    raise
    print(f"{name}: {done} hosts completed ({wanted} wanted) in {time.monotonic() - started:.1f}s")
    return 0


# --- the seeder: publish ---------------------------------------------------------------------


def _drop_atomically(source: Path, drop_dir: Path, name: str) -> Path:
    """Copy source into drop_dir under a dotfile name (the seeder ignores it), then rename it
    to drop_dir/name: the seeder only ever sees the complete file (or directory)."""
    target = drop_dir / name
    if source.is_dir():
        if target.exists():
            raise CtlError(f"{target} already exists: remove it first to publish a new version")
        tmp = tempfile.mkdtemp(dir=drop_dir, prefix=f".{name}.", suffix=".part")
        try:
            shutil.copytree(source, tmp, symlinks=True, dirs_exist_ok=True)
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        fd, tmp = tempfile.mkstemp(dir=drop_dir, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as dst, open(source, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.chmod(tmp, 0o644)  # the seeder runs as its own user
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    fsutil.fsync_dir(drop_dir)
    return target


def _seeder_entry(seeder: str, name: str) -> dict | None:
    for entry in http_json(f"{seeder}/index.json")["deploys"]:
        if entry["name"] == name:
            return entry
    return None


def cmd_publish(args) -> int:
    source = Path(args.file)
    if not source.exists():
        raise CtlError(f"{source}: no such file or directory")
    name = source.resolve().name
    try:
        torrent.check_name(name)
    except torrent.TorrentError as exc:
        raise CtlError(f"{source}: {exc}") from None
    cfg = _config(args) if not (args.drop_dir and args.seeder) else None
    drop_dir = Path(args.drop_dir or cfg["seeder"]["drop_dir"])
    if not drop_dir.is_dir():
        raise CtlError(f"drop directory {drop_dir} does not exist (is murder-seeder set up?)")
    if args.seeder:
        seeder = args.seeder.rstrip("/")
    else:
        c = cfg["seeder"]
        seeder = c["public_url"].rstrip("/") or local_url(c["http_listen"])
    before = _seeder_entry(seeder, name)
    started = time.monotonic()
    try:
        _drop_atomically(source, drop_dir, name)
    except OSError as exc:
        raise CtlError(f"cannot place {source} in {drop_dir}: {exc}") from None

    def published():
        entry = _seeder_entry(seeder, name)
        if entry is None or (
            before is not None
            and (entry["info_hash"], entry["created"]) == (before["info_hash"], before["created"])
        ):
            return None
        return entry

    entry = None
    with Output(sys.stderr).progress(f"publishing {name}", total=None) as bar:
        while entry is None:
            bar.update(0, "the seeder is hashing it")
            if args.timeout and time.monotonic() - started > args.timeout:
                print(
                    f"murderctl: {name} is in {drop_dir}, but the seeder at {seeder} did not "
                    f"publish it within {args.timeout:g}s (see its log)",
                    file=sys.stderr,
                )
                return EX_NOT_DONE
            entry = published()
            if entry is None:
                time.sleep(POLL_SECONDS)
    trackers = [args.tracker] if args.tracker else (cfg["seeder"]["trackers"] if cfg else [])
    if cfg is not None and not cfg.files and not args.tracker:
        trackers = []  # built-in defaults only: no tracker to ask
    for announce in trackers:
        _confirm_tracker(announce, entry)
    print(
        f"published {name}: {human_size(entry['size'])}, info-hash {entry['info_hash']}, "
        f"in {time.monotonic() - started:.1f}s",
        file=sys.stderr,
    )
    print(entry["url"])
    return 0


def _confirm_tracker(announce: str, entry: dict) -> None:
    """Wait (briefly) until the tracker knows the deploy, so a `wait` right after works."""
    url = announce.rstrip("/")
    if not url.startswith("http") or not url.endswith("/announce"):
        return
    base = url[: -len("/announce")]
    deadline = time.monotonic() + TRACKER_CONFIRM_SECONDS
    while True:
        try:
            fetch_deploy(base, entry["info_hash"])
            return
        except CtlError as exc:
            if time.monotonic() > deadline or getattr(exc, "status", 404) != 404:
                print(f"murderctl: warning: tracker {base}: {exc}", file=sys.stderr)
                return
        time.sleep(POLL_SECONDS)


# --- a peer host: fetch, list ----------------------------------------------------------------


def _peer_dir(args, key: str) -> Path:
    """drop_dir or state_dir of this host's murder-peer: the option, else the config."""
    given = getattr(args, key, None)
    return Path(given) if given else Path(_config(args)["peer"][key])


def _read_state(path: Path) -> dict | None:
    try:
        return fsutil.read_json(path)
    except (OSError, ValueError):
        return None  # absent, or being replaced right now: read it next time


def cmd_fetch(args) -> int:
    drop_dir, state_dir = _peer_dir(args, "drop_dir"), _peer_dir(args, "state_dir")
    if not drop_dir.is_dir():
        raise CtlError(f"drop directory {drop_dir} does not exist (is murder-peer set up?)")
    is_url = args.source.startswith(("http://", "https://"))
    if is_url:
        data = http_get(args.source)
    else:
        try:
            data = Path(args.source).read_bytes()
        except OSError as exc:
            raise CtlError(f"{args.source}: {exc.strerror or exc}") from None
    try:
        parsed = torrent.parse(data)
    except torrent.TorrentError as exc:
        raise CtlError(f"{args.source}: not a valid torrent: {exc}") from None
    drop_name = f"{parsed.name}.url" if is_url else f"{parsed.name}.torrent"
    dropped_at = time.time()
    payload = (args.source + "\n").encode() if is_url else data
    try:
        fsutil.atomic_write(drop_dir / drop_name, payload)
    except OSError as exc:
        raise CtlError(f"cannot place {drop_name} in {drop_dir}: {exc}") from None
    state_path = state_dir / f"{parsed.info_hash}.json"
    reason_path = drop_dir / "rejected" / f"{drop_name}.reason"
    started = time.monotonic()
    size = parsed.total_size
    with Output().progress(parsed.name, total=size, bytes_unit=True) as bar:
        while True:
            if reason_path.exists() and reason_path.stat().st_mtime >= dropped_at - 1:
                reason = reason_path.read_text(errors="replace").strip()
                print(f"murderctl: murder-peer rejected {drop_name}: {reason}", file=sys.stderr)
                return EX_NOT_DONE
            state = _read_state(state_path)
            if state is not None:
                progress = float(state.get("progress") or 0)
                bar.update(progress * size, state["state"])
                placed = state.get("placed") or []
                if state["state"] in ("seeding", "done"):
                    if placed and all(Path(p).exists() for p in placed):
                        break
                    if not placed:
                        raise CtlError(
                            f"{parsed.name} was deployed here before and is no longer placed "
                            "(removed by keep_deploys); nothing to do"
                        )
                if state["state"] == "failed" and state.get("updated", 0) >= dropped_at:
                    print(f"murderctl: {parsed.name} failed: {state['error']}", file=sys.stderr)
                    return EX_NOT_DONE
            if args.timeout and time.monotonic() - started > args.timeout:
                what = state["state"] if state else "not yet accepted by murder-peer"
                print(
                    f"murderctl: timed out after {args.timeout:g}s: {parsed.name} is {what}",
                    file=sys.stderr,
                )
                return EX_NOT_DONE
            time.sleep(POLL_SECONDS / 2)
    for path in placed:
        print(f"placed {path}")
    for rel, digest in (state.get("sha256") or {}).items():
        print(f"sha256 {digest}  {rel}")
    return 0


def cmd_list(args) -> int:
    state_dir = _peer_dir(args, "state_dir")
    if not state_dir.is_dir():
        raise CtlError(f"state directory {state_dir} does not exist (is murder-peer set up?)")
    records = [r for r in map(_read_state, sorted(state_dir.glob("*.json"))) if r]
    records.sort(key=lambda r: r.get("created") or 0)
    if args.json:
        print(json.dumps({"deploys": records}, indent=1))
        return 0
    out = Output()
    if not records:
        out.line(f"no deploys in {state_dir}")
        return 0
    rows = []
    for r in records:
        sums = r.get("sha256") or {}
        if len(sums) == 1:
            digest = Digest(next(iter(sums.values())))
        else:
            digest = f"{len(sums)} files" if sums else "-"
        state = r["state"] + (f": {r['error']}" if r.get("error") else "")
        rows.append(
            [
                r["name"],
                state,
                Bar(r.get("progress") or 0, width=10),
                human_size(r.get("size")),
                digest,
                Digest(r["info_hash"]),
            ]
        )
    out.table(["DEPLOY", "STATE", "PROGRESS", "SIZE", "SHA256", "INFO-HASH"], rows)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="murderctl", description="operate a murderd fleet")
    parser.add_argument("--version", action="version", version=f"murderd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check-config", help="validate the config and print the effective values")
    p.add_argument("--config", "-c", default=None, help=f"default {config.DEFAULT_PATH}")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("make-torrent", help="hash a file or directory into a private torrent")
    p.add_argument("file")
    p.add_argument("--tracker", action="append", required=True, help="announce URL (repeatable)")
    p.add_argument("--piece-size", type=int, default=0, help="bytes; default: from the size")
    p.add_argument("--format", choices=torrent.FORMATS, default="v1")
    p.add_argument("--out", "-o", help="output file (default ./<name>.torrent)")
    p.set_defaults(func=cmd_make_torrent)

    p = sub.add_parser("verify", help="full hash check of a file (or directory) against a torrent")
    p.add_argument("file")
    p.add_argument("torrent")
    p.set_defaults(func=cmd_verify)

    def fleet_options(p, tracker: bool = True):
        p.add_argument("--config", "-c", default=None, help=f"default {config.DEFAULT_PATH}")
        if tracker:
            p.add_argument("--tracker", help="tracker base URL (default: from [tracker] listen)")

    p = sub.add_parser("status", help="deploys the tracker knows; one deploy's hosts")
    p.add_argument("deploy", nargs="?", metavar="DEPLOY", help="name or info-hash")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    fleet_options(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "wait",
        help="wait until N hosts completed a deploy (exit 0; 1: timeout; 2: error)",
    )
    p.add_argument("deploy", metavar="DEPLOY", help="name (the newest of that name) or info-hash")
    p.add_argument("--hosts", type=int, required=True, metavar="N", help="hosts to wait for")
    p.add_argument("--timeout", type=float, default=3600, metavar="S", help="0: none")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    fleet_options(p)
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("publish", help="hand a file to the seeder and print its torrent URL")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--drop-dir", help="the seeder's drop dir (default: [seeder] drop_dir)")
    p.add_argument("--seeder", help="the seeder's base URL (default: from [seeder])")
    p.add_argument("--timeout", type=float, default=600, metavar="S", help="0: none")
    fleet_options(p)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("fetch", help="deploy a torrent (URL or file) on this host and wait")
    p.add_argument("source", metavar="URL|TORRENT")
    p.add_argument("--drop-dir", help="the peer's drop dir (default: [peer] drop_dir)")
    p.add_argument("--state-dir", help="the peer's state dir (default: [peer] state_dir)")
    p.add_argument("--timeout", type=float, default=3600, metavar="S", help="0: none")
    fleet_options(p, tracker=False)
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("list", help="this host's deploys (murder-peer's state dir)")
    p.add_argument("--state-dir", help="default: [peer] state_dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    fleet_options(p, tracker=False)
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except CtlError as exc:
        print(f"murderctl: {exc}", file=sys.stderr)
        sys.exit(EX_ERROR)
    except KeyboardInterrupt:
        sys.exit(130)

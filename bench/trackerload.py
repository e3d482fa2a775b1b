"""Tracker load: murder-tracker vs opentracker, on 127.0.0.1 only, bounded in count and time.

Both trackers serve the same DEPLOYS info-hashes (murder-tracker from torrents_dir,
opentracker from its whitelist).  Two phases, one connection per announce as BitTorrent
clients do (``Connection: close``):

- burst: PEERS distinct peers announce ``event=started``, as fast as the trackers answer
  (closed loop, CONCURRENCY requests in flight per load process): announces/s, latency.
  Afterwards the tracker holds PEERS peers: its RSS.
- steady: re-announces of those peers at a fixed offered rate (open loop, the latency counted
  from when each request was due): latency at a load a large fleet really makes.

The load processes share the 2 cores with the tracker: their CPU use is recorded, so a
figure capped by the generator can be told from one capped by the tracker; so is each
tracker's CPU time per announce (``cpu_efficiency_ratio``: opentracker's over
murder-tracker's), which the generator and other load on the machine change little.

Then the same two phases over UDP (BEP 15) against the same running trackers, with PEERS
more peers (their own peer ids and ports): one socket per load process, datagrams built
beforehand, a connection id fetched per socket (and again before it expires), at most
UDP_WINDOW announces outstanding per process; a datagram unanswered for UDP_LOST_SECONDS
counts as an error.  ``udp_throughput_ratio`` and ``udp_cpu_efficiency_ratio`` compare
them as above.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import selectors
import shutil
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from murderd import torrent
from murderd.localfleet import Daemon, free_port, write_config

from .common import percentile, proc_cpu_seconds, proc_memory

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # loopback only
DEPLOYS = 200
PEERS = 100_000
CONCURRENCY = 64
WORKERS = 2
STEADY_RATE = 1000
STEADY_SECONDS = 5.0
PHASE_LIMIT_SECONDS = 60.0
UDP_WINDOW = 64
UDP_LOST_SECONDS = 2.0
UDP_CID_SECONDS = 50.0  # BEP 15: a client may use a connection id for one minute
UDP_PROTOCOL_ID = struct.pack("!Q", 0x41727101980)
UDP_EVENTS = {"": 0, "completed": 1, "started": 2, "stopped": 3}


def _quote(raw: bytes) -> str:
    return urllib.parse.quote_from_bytes(raw, safe="")


def make_requests(hashes: list, peers: int, port: int, event: str) -> list:
    """One announce request (bytes) per peer, peers spread evenly over the hashes."""
    per_deploy = peers // len(hashes)
    out = []
    for d, info_hash in enumerate(hashes):
        quoted = _quote(info_hash)
        for p in range(per_deploy):
            peer_id = b"-MB0001-" + d.to_bytes(4, "big") + p.to_bytes(8, "big")
            query = (
                f"info_hash={quoted}&peer_id={_quote(peer_id)}&port={10000 + p}"
                f"&uploaded=0&downloaded=0&left=1048576&compact=1&numwant=50"
                + (f"&event={event}" if event else "")
            )
            out.append(
                f"GET /announce?{query} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                "User-Agent: murderbench\r\nConnection: close\r\n\r\n".encode()
            )
    return out


def _load(port: int, requests: list, concurrency: int, rate: float, limit: float, queue) -> None:
    """One load process: send requests (closed loop if rate is 0, else open loop at rate/s)."""
    sel = selectors.DefaultSelector()
    latencies = []
    failures = 0
    errors = 0
    todo = iter(enumerate(requests))
    started = time.perf_counter()
    deadline = started + limit
    exhausted = False

    def launch(due: float) -> bool:
        item = next(todo, None)
        if item is None:
            return False
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((HOST, port))
        state = [item[1], 0, bytearray(), due]
        try:  # on loopback the connection is usually up already: skip a select round
            state[1] = sock.send(state[0])
        except (BlockingIOError, InterruptedError, OSError):
            pass  # not connected yet (or refused: the EVENT_WRITE path counts the error)
        done = state[1] == len(state[0])
        sel.register(sock, selectors.EVENT_READ if done else selectors.EVENT_WRITE, state)
        return True

    def finish(sock, state, ok: bool) -> None:
        nonlocal failures, errors
        sel.unregister(sock)
        sock.close()
        if not ok:
            errors += 1
            return
        body = bytes(state[2])
        if not body.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")) or b"failure reason" in body:
            failures += 1
        latencies.append(time.perf_counter() - state[3])

    next_due = started
    if not rate:
        for _ in range(concurrency):
            if not launch(time.perf_counter()):
                exhausted = True
                break
    while time.perf_counter() < deadline:
        if rate and not exhausted:
            now = time.perf_counter()
            while next_due <= now and len(sel.get_map()) < concurrency:
                if not launch(next_due):
                    exhausted = True
                    break
                next_due += 1.0 / rate
        if exhausted and not sel.get_map():
            break
        timeout = max(0.0, min(0.05, next_due - time.perf_counter())) if rate else 0.05
        for key, events in sel.select(timeout):
            sock, state = key.fileobj, key.data
            try:
                if events & selectors.EVENT_WRITE:
                    sent = sock.send(state[0][state[1] :])
                    state[1] += sent
                    if state[1] == len(state[0]):
                        sel.modify(sock, selectors.EVENT_READ, state)
                    continue
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                finish(sock, state, False)
                if not rate and not launch(time.perf_counter()):
                    exhausted = True
                continue
            if data:
                state[2] += data
                continue
            finish(sock, state, True)  # the tracker closed: the reply is complete
            if not rate and not launch(time.perf_counter()):
                exhausted = True
    for key in list(sel.get_map().values()):
        key.fileobj.close()
        errors += 1
    _report(queue, latencies, failures, errors, started)


def _report(queue, latencies: list, failures: int, errors: int, started: float) -> None:
    """What one load process hands back: its latencies, failures, errors, time and CPU."""
    cpu = os.times()
    queue.put(
        {
            "latencies": latencies,
            "failures": failures,
            "errors": errors,
            "seconds": time.perf_counter() - started,
            "cpu": cpu.user + cpu.system,
        }
    )


def make_udp_requests(hashes: list, peers: int, event: str) -> list:
    """One BEP 15 announce per peer without its first 12 bytes (connection id, action).

    What is left starts with the transaction id: the request's index (unique per list).
    Peer ids and ports differ from make_requests' peers: these are new peers to both
    trackers (opentracker tells peers apart by address and port).
    """
    per_deploy = peers // len(hashes)
    out = []
    for d, info_hash in enumerate(hashes):
        for p in range(per_deploy):
            peer_id = b"-MU0001-" + d.to_bytes(4, "big") + p.to_bytes(8, "big")
            out.append(
                struct.pack(
                    "!I20s20sqqqIIIiH",
                    len(out),
                    info_hash,
                    peer_id,
                    0,
                    1048576,
                    0,
                    UDP_EVENTS[event],
                    0,
                    len(out),
                    50,
                    40000 + p,
                )
            )
    return out


def _udp_connect(sock: socket.socket) -> bytes:
    """A connection id for this socket (blocking, a few tries)."""
    sock.setblocking(True)
    sock.settimeout(1.0)
    try:
        for attempt in range(5):
            tid = struct.pack("!I", 0xC0000000 + attempt)
            sock.send(UDP_PROTOCOL_ID + b"\x00\x00\x00\x00" + tid)
            try:
                while True:
                    reply = sock.recv(2048)
                    if reply[:4] == b"\x00\x00\x00\x00" and reply[4:8] == tid:
                        return reply[8:16]
            except socket.timeout:
                continue
        raise TimeoutError("no reply to a UDP connect")
    finally:
        sock.setblocking(False)


def _udp_load(port: int, tails: list, window: int, rate: float, limit: float, queue) -> None:
    """One UDP load process (closed loop if rate is 0, else open loop at rate/s)."""
    latencies = []
    failures = errors = 0
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((HOST, 0))
    sock.connect((HOST, port))
    prefix = _udp_connect(sock) + b"\x00\x00\x00\x01"
    connected_at = time.perf_counter()
    pending: dict = {}  # transaction id -> when the request was due
    started = time.perf_counter()
    deadline = started + limit
    next_due = started
    next_sweep = started + UDP_LOST_SECONDS
    index, total = 0, len(tails)
    send, recv = sock.send, sock.recv
    while True:
        now = time.perf_counter()
        if now >= deadline or (index >= total and not pending):
            break
        if now - connected_at > UDP_CID_SECONDS:
            prefix = _udp_connect(sock) + b"\x00\x00\x00\x01"
            connected_at = now = time.perf_counter()
        try:
            while index < total and len(pending) < window and (not rate or next_due <= now):
                tail = tails[index]
                send(prefix + tail)
                pending[tail[:4]] = next_due if rate else now
                index += 1
                next_due += 1.0 / rate if rate else 0
        except (BlockingIOError, InterruptedError):
            pass  # the socket's send buffer is full: the next round sends it
        try:
            while True:
                reply = recv(2048)
                due = pending.pop(reply[4:8], None)
                if due is None:
                    continue  # a late reply to a request already counted as lost
                latencies.append(time.perf_counter() - due)
                if reply[:4] != b"\x00\x00\x00\x01":
                    failures += 1
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            errors += 1  # ICMP: nothing listens
        now = time.perf_counter()
        if now >= next_sweep:
            next_sweep = now + UDP_LOST_SECONDS / 4
            for tid in [t for t, due in pending.items() if now - due > UDP_LOST_SECONDS]:
                del pending[tid]
                errors += 1
        if rate and index < total and len(pending) < window:
            timeout = max(0.0, min(0.01, next_due - now))
        else:
            timeout = 0.01
        select.select([sock], [], [], timeout)
    errors += len(pending)
    sock.close()
    _report(queue, latencies, failures, errors, started)


def drive(
    port: int, requests: list, rate: float = 0, concurrency: int = CONCURRENCY, load=_load
) -> dict:
    """Send requests from WORKERS processes; announces/s, latency percentiles, errors."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    chunks = [requests[i::WORKERS] for i in range(WORKERS)]
    procs = [
        ctx.Process(
            target=load,
            args=(port, chunk, concurrency, rate / WORKERS, PHASE_LIMIT_SECONDS, queue),
        )
        for chunk in chunks
    ]
    started = time.perf_counter()
    for proc in procs:
        proc.start()
    parts = [queue.get(timeout=PHASE_LIMIT_SECONDS + 30) for _ in procs]
    elapsed = time.perf_counter() - started
    for proc in procs:
        proc.join(10)
    latencies = [x for part in parts for x in part["latencies"]]
    done = len(latencies)
    return {
        "requests": len(requests),
        "answered": done,
        "failures": sum(p["failures"] for p in parts),
        "errors": sum(p["errors"] for p in parts),
        "seconds": round(elapsed, 3),
        "rate": round(done / max(elapsed, 1e-9), 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 99) * 1000, 3),
        "load_cpu_share": round(sum(p["cpu"] for p in parts) / max(elapsed, 1e-9), 2),
    }


def _fake_torrents(root: Path, count: int) -> list:
    """count small real torrents (distinct info-hashes); returns the raw 20-byte hashes."""
    data_dir = root / "data"
    data_dir.mkdir(parents=True)
    out_dir = root / "torrents"
    out_dir.mkdir()
    hashes = []
    for i in range(count):
        path = data_dir / f"app{i}-1.0.bin"
        path.write_bytes(i.to_bytes(4, "big") * 1024)
        made = torrent.make_torrent(path, [f"http://{HOST}/announce"])
        (out_dir / f"{path.name}.torrent").write_bytes(made.data)
        hashes.append(bytes.fromhex(made.info_hash))
    return hashes


def _bench_tracker(name: str, pid_of, port: int, hashes: list, cpu_pid) -> dict:
    burst = make_requests(hashes, PEERS, port, "started")
    steady_all = make_requests(hashes, PEERS, port, "")
    steady = steady_all[:: max(1, len(steady_all) // int(STEADY_RATE * STEADY_SECONDS))]
    rss_idle = proc_memory(pid_of()).get("VmRSS", 0)
    result = {"rss_idle": rss_idle}
    result.update(_phases(name, "HTTP", pid_of, cpu_pid, port, burst, steady, _load, CONCURRENCY))
    return result


def _bench_udp(name: str, pid_of, port: int, hashes: list, cpu_pid) -> dict:
    burst = make_udp_requests(hashes, PEERS, "started")
    steady_all = make_udp_requests(hashes, PEERS, "")
    steady = steady_all[:: max(1, len(steady_all) // int(STEADY_RATE * STEADY_SECONDS))]
    return _phases(name, "UDP", pid_of, cpu_pid, port, burst, steady, _udp_load, UDP_WINDOW)


def _phases(name, transport, pid_of, cpu_pid, port, burst, steady, load, window) -> dict:
    """The burst, then the steady phase: rates, latencies, CPU per announce, RSS."""
    result = {}
    cpu0 = proc_cpu_seconds(cpu_pid())
    t0 = time.perf_counter()
    result["burst"] = drive(port, burst, concurrency=window, load=load)
    cpu = proc_cpu_seconds(cpu_pid()) - cpu0
    result["burst"]["tracker_cpu_share"] = round(cpu / (time.perf_counter() - t0), 2)
    # The tracker's CPU time per answered announce: what contention on the machine (the
    # load processes, anything else running) does not change much.
    answered = max(result["burst"]["answered"], 1)
    result["burst"]["tracker_cpu_us_per_announce"] = round(cpu / answered * 1e6, 1)
    result["rss"] = proc_memory(pid_of()).get("VmRSS", 0)
    result["steady"] = drive(port, steady, rate=STEADY_RATE, concurrency=512, load=load)
    result["steady"]["offered_rate"] = STEADY_RATE
    log.info(
        "  %s %s: burst %.0f/s (p50 %.2f ms, p99 %.2f ms, %.1f µs CPU each), "
        "steady p50 %.2f ms p99 %.2f ms, RSS %.1f MiB",
        name,
        transport,
        result["burst"]["rate"],
        result["burst"]["p50_ms"],
        result["burst"]["p99_ms"],
        result["burst"]["tracker_cpu_us_per_announce"],
        result["steady"]["p50_ms"],
        result["steady"]["p99_ms"],
        result["rss"] / (1 << 20),
    )
    return result


def _wait_known(port: int, hashes: list, timeout: float = 30.0) -> None:
    """Wait until the tracker answers an announce for every hash without a failure."""
    deadline = time.monotonic() + timeout
    for info_hash in hashes:
        query = (
            f"info_hash={_quote(info_hash)}&peer_id={_quote(b'-MB0000-' + info_hash[:12])}"
            "&port=9&uploaded=0&downloaded=0&left=0&compact=1&event=stopped"
        )
        while True:
            with urllib.request.urlopen(f"http://{HOST}:{port}/announce?{query}", timeout=5) as r:
                if b"failure reason" not in r.read():
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"tracker on {port} does not know all {len(hashes)} deploys")
            time.sleep(0.1)


def run(work: Path) -> dict:
    root = work / "tracker"
    shutil.rmtree(root, ignore_errors=True)
    hashes = _fake_torrents(root, DEPLOYS)
    out = {"deploys": DEPLOYS, "peers": PEERS, "workers": WORKERS, "concurrency": CONCURRENCY}
    log.info(
        "tracker load: %d peers in %d deploys, murder-tracker then opentracker", PEERS, DEPLOYS
    )
    # murder-tracker: an announce interval like opentracker's (30 min) so nobody expires.
    port = free_port()
    cfg = write_config(
        root / "murder-tracker",
        {
            "log": {"level": "warning"},
            "tracker": {
                "listen": f"{HOST}:{port}",
                "torrents_dir": str(root / "torrents"),
                "state_dir": str(root / "murder-tracker" / "state"),
                "interval": 1800,
                "min_interval": 1,
            },
        },
    )
    daemon = Daemon("tracker", cfg, root / "murder-tracker")
    try:
        daemon.start(timeout=60)
        _wait_known(port, hashes)
        out["murder-tracker"] = _bench_tracker(
            "murder-tracker", lambda: daemon.proc.pid, port, hashes, lambda: daemon.proc.pid
        )
    except Exception as exc:
        log.exception("murder-tracker load failed")
        out["murder-tracker"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        if daemon.proc is not None and daemon.proc.poll() is None:
            # UDP is on by default, on listen's port.
            out["murder-tracker-udp"] = _bench_udp(
                "murder-tracker", lambda: daemon.proc.pid, port, hashes, lambda: daemon.proc.pid
            )
    except Exception as exc:
        log.exception("murder-tracker UDP load failed")
        out["murder-tracker-udp"] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        daemon.stop(timeout=20)
        daemon.close()
    # opentracker: Debian's build serves whitelisted info-hashes only; it must not stay root.
    ot_dir = root / "opentracker"
    ot_dir.mkdir()
    os.chmod(root, 0o755)
    os.chmod(ot_dir, 0o755)
    (ot_dir / "whitelist").write_text("".join(h.hex() + "\n" for h in hashes))
    os.chmod(ot_dir / "whitelist", 0o644)
    port = free_port()
    proc = subprocess.Popen(
        [
            "opentracker",
            "-i",
            HOST,
            "-p",
            str(port),
            "-P",
            str(port),
            "-d",
            str(ot_dir),
            "-w",
            "whitelist",
            "-u",
            "nobody",
        ],  # fmt: skip
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_up(port)
        _wait_known(port, hashes)
        out["opentracker"] = _bench_tracker(
            "opentracker", lambda: proc.pid, port, hashes, lambda: proc.pid
        )
    except Exception as exc:
        log.exception("opentracker load failed")
        out["opentracker"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        if proc.poll() is None:  # -P: UDP on the same port
            out["opentracker-udp"] = _bench_udp(
                "opentracker", lambda: proc.pid, port, hashes, lambda: proc.pid
            )
    except Exception as exc:
        log.exception("opentracker UDP load failed")
        out["opentracker-udp"] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for suffix, prefix in (("", ""), ("-udp", "udp_")):
        mt, ot = out.get("murder-tracker" + suffix, {}), out.get("opentracker" + suffix, {})
        if "burst" in mt and "burst" in ot:
            ratio = mt["burst"]["rate"] / max(ot["burst"]["rate"], 1e-9)
            out[prefix + "throughput_ratio"] = round(ratio, 3)
            # The same ratio from CPU time: what each tracker would do with a core to itself.
            out[prefix + "cpu_efficiency_ratio"] = round(
                ot["burst"]["tracker_cpu_us_per_announce"]
                / max(mt["burst"]["tracker_cpu_us_per_announce"], 1e-9),
                3,
            )
    shutil.rmtree(root, ignore_errors=True)
    return out


def _wait_up(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {HOST}:{port}")


def main() -> None:
    """Standalone: ``python3 -m bench.trackerload [--workdir DIR] [--output FILE]``."""
    import argparse
    import json
    import tempfile

    from bench import report

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temp dir)")
    parser.add_argument("--output", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="trackerload-") as tmp:
        results = {"tracker": run(args.workdir or Path(tmp))}
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    text = report.table(results)
    print(text[text.index("tracker (") :].rsplit("\n\n", 1)[0])


if __name__ == "__main__":
    main()

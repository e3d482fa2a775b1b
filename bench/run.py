#!/usr/bin/env python3
"""`make bench`: murderd's deploy time against the physical limit, HTTP and a standard client.

Runs as root (network namespaces, tc).  Everything stays on loopback or inside namespaces this
run creates and always removes.  Writes bench/results/latest.json and latest.png and prints
the ratio table.  See README.md, Benchmarks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import netns, swarm  # noqa: E402
from bench.common import MIB, make_file, mbit  # noqa: E402

log = logging.getLogger("bench")
RESULTS = Path(__file__).resolve().parent / "results"
TOOLS = ("ip", "tc", "curl", "aria2c", "opentracker", "sha256sum")
PARTS = ("swarm", "sweep", "seed", "tracker", "memory")


def parse_size(text: str) -> int:
    from murderd.demo import parse_size as parse

    return parse(text)


def parse_rate(text: str) -> int:
    text = text.strip().lower().replace("bit", "").replace("/s", "")
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in "kmg" else text
    return int(float(number) * scale)


def parse_lt_set(items: list) -> dict:
    """['key=value', 'seeder.key=value', 'peer.key=value'] -> {'all': {...}, ...}.

    'const:murderd.MODULE.NAME=JSON' sets a module constant in every daemon (tuning runs).
    """
    out: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        if key.startswith("const:"):  # const:murderd.slices.HUNGRY_SECONDS=0.5
            out.setdefault("const", {})[key[len("const:") :]] = json.loads(value)
            continue
        scope, _, key = key.rpartition(".")
        scope = scope or "all"
        if key == "seed_flags":
            out["seed_flags"] = value.split(",")
            continue
        if key in ("trace_blocks", "trace_peers"):
            out[key] = value
            continue
        if scope not in ("all", "seeder", "peer"):
            raise argparse.ArgumentTypeError(f"{item}: scope must be seeder. or peer.")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        out.setdefault(scope, {})[key] = parsed
    return out


def parse_conf_set(items: list) -> dict:
    """['seeder.slices_http=no', ...] -> {'seeder': {'slices_http': 'no'}} (config keys)."""
    out: dict = {}
    for item in items:
        key, eq, value = item.partition("=")
        section, _, name = key.partition(".")
        if not eq or section not in ("tracker", "seeder", "peer") or not name:
            raise SystemExit(f"--set {item}: want tracker|seeder|peer.KEY=VALUE")
        out.setdefault(section, {})[name] = value
    return out


def machine() -> dict:
    model = ""
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import libtorrent

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "host": platform.node(),
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / (1 << 30), 1),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "libtorrent": libtorrent.__version__,
        "aria2c": _first_line(["aria2c", "--version"]),
        "curl": _first_line(["curl", "--version"]),
    }


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def _first_line(argv: list) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.split(
            "\n", 1
        )[0]
    except (OSError, subprocess.TimeoutExpired):
        return ""


def ensure_matplotlib() -> bool:
    """The plot needs matplotlib: installed into this venv on first use (the bench's set-up)."""
    try:
        import matplotlib  # noqa: F401

        return True
    except ImportError:
        pass
    log.info("installing matplotlib into %s", sys.prefix)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "matplotlib>=3.3"], timeout=600
    )
    if proc.returncode != 0:
        log.error("matplotlib could not be installed: no plot")
        return False
    return True


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def sweep_rate(rate_bit: int, peers: int, budget_bit: int) -> int:
    """The per-host cap for a run with peers hosts: rate_bit, lowered to keep N x B <= budget."""
    return min(rate_bit, budget_bit // peers)


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("64M"), help="swarm file")
    parser.add_argument("--peers", type=int, default=8, help="peers in the main comparison")
    parser.add_argument("--rate", type=parse_rate, default=parse_rate("100mbit"), help="B")
    parser.add_argument("--sweep", default="2,4,8,16", help="peer counts of the sweep")
    parser.add_argument(
        "--budget", type=parse_rate, default=None,
        help="most N x B in any sweep run (default: --peers x --rate, what the main comparison "
        "moves; on one machine more hosts x B saturate its cores and memory, not the links)",
    )  # fmt: skip
    parser.add_argument("--only", action="append", choices=PARTS, help="run only these parts")
    parser.add_argument("--skip", action="append", choices=PARTS, default=[], help="skip parts")
    parser.add_argument("--full", action="store_true", help="full sizes: 2 GiB peer RSS")
    parser.add_argument(
        "--repeat", type=int, default=1, help="murderd and aria2c runs per point (the median)"
    )
    parser.add_argument("--mode", choices=("follow", "drop"), default="follow")
    parser.add_argument("--piece-size", type=parse_size, default=0)
    parser.add_argument(
        "--lt-set", action="append", default=[], metavar="[seeder.|peer.]KEY=VALUE",
        help="override a libtorrent setting in the daemons (A/B tuning runs)",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], dest="conf_set", metavar="SECTION.KEY=VALUE",
        help="set a murderd config key in the swarm runs' daemons (A/B runs of a setting)",
    )  # fmt: skip
    parser.add_argument(
        "--timeline", type=float, default=0.0, metavar="SECONDS",
        help="sample every host's traffic this often during murderd runs (diagnosis)",
    )  # fmt: skip
    parser.add_argument("--log-level", default="info", help="the daemons' log level")
    parser.add_argument("--no-http", action="store_true", help="skip T_http (the slowest)")
    parser.add_argument("--no-client", action="store_true", help="skip T_client")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--label", default="", help="a note stored with the results")
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = args.peers * args.rate
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parts = [p for p in (args.only or PARTS) if p not in args.skip]
    if os.geteuid() != 0:
        print("bench/run.py needs root (network namespaces, tc): run `make bench` as root")
        return 2
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)} (`make system-deps` installs them)")
        return 2
    # Ctrl-C, kill and a closed terminal all end the run through the same clean-up (even when
    # started with SIGINT ignored, as background jobs of a script are).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    plot_ok = ensure_matplotlib()
    lt_overrides = parse_lt_set(args.lt_set)
    conf_set = parse_conf_set(args.conf_set)
    stale = netns.remove_stale()
    if stale:
        log.info("removed %d namespaces left by an earlier run", len(stale))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="murderbench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    results = {
        "version": 1,
        "label": args.label,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "settings": {
            "size": args.size,
            "peers": args.peers,
            "rate_bit": args.rate,
            "budget_bit": args.budget,
            "mode": args.mode,
            "piece_size": args.piece_size,
            "lt_overrides": lt_overrides,
            "config": conf_set,
            "tbf_goodput": netns.TBF_GOODPUT,
            "repeat": args.repeat,
        },
    }
    try:
        if "swarm" in parts or "sweep" in parts:
            results.update(run_swarms(args, parts, work, lt_overrides, conf_set))
        if "seed" in parts:
            from bench import seedtime

            results["drop_to_seeding"] = seedtime.run(work, parse_size("1G"))
        if "tracker" in parts:
            from bench import trackerload

            results["tracker"] = trackerload.run(work)
        if "memory" in parts:
            from bench import peermem

            size = parse_size("2G") if args.full else parse_size("512M")
            results["peer_memory"] = peermem.run(work, size, lt_overrides)
    finally:
        results["seconds"] = round(time.monotonic() - began, 1)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    from bench import report

    print(report.table(results))
    if plot_ok:
        png = args.output.with_suffix(".png")
        report.plot(results, png)
        print(f"wrote {args.output} and {png}")
    else:
        print(f"wrote {args.output}")
    return 0


def _median_run(runs: list):
    good = sorted((r for r in runs if r.ok), key=lambda r: r.seconds)
    if not good:
        return runs[-1]
    chosen = good[len(good) // 2]
    chosen.detail["repeats"] = [round(r.seconds, 3) for r in good]
    failed = [r.error for r in runs if not r.ok]
    if failed:  # the median is of the good runs: say how many were not
        chosen.detail["failed_repeats"] = failed
        log.warning("%d of %d runs failed: %s", len(failed), len(runs), "; ".join(failed))
    return chosen


def run_swarms(args, parts: list, work: Path, lt_overrides: dict, conf_set: dict) -> dict:
    sweep = sorted({int(n) for n in args.sweep.split(",") if n}) if "sweep" in parts else []
    counts = sorted(set(sweep) | ({args.peers} if "swarm" in parts else set()))
    source = work / "deploy-1.0.bin"
    make_file(source, args.size)
    out: dict = {"swarm": {}, "sweep": []}
    with netns.Testbed(max(counts) + 1, args.rate) as bed:
        log.info("testbed: %d hosts in namespaces %s*", max(counts) + 1, bed.prefix)
        for peers in counts:
            rate = sweep_rate(args.rate, peers, args.budget)
            bed.set_rate(rate, peers + 1)
            log.info("%d peers at %s, %d MiB", peers, mbit(rate), args.size // MIB)
            runs = []
            for _ in range(max(1, args.repeat)):
                runs.append(
                    swarm.run_murderd(
                        bed,
                        peers,
                        source,
                        work,
                        mode=args.mode,
                        lt_overrides=lt_overrides,
                        conf_set=conf_set,
                        piece_size=args.piece_size,
                        timeline_every=args.timeline,
                        log_level=args.log_level,
                    )  # fmt: skip
                )
                log.info("  murderd: %s", _brief(runs[-1]))
            murderd = _median_run(runs)
            out["sweep"].append(murderd.record())
            if peers == args.peers and "swarm" in parts:
                out["swarm"]["murderd"] = murderd.record()
                if not args.no_client:
                    clients = []
                    for _ in range(max(1, args.repeat)):
                        clients.append(swarm.run_client(bed, peers, source, work))
                        log.info("  client: %s", _brief(clients[-1]))
                    out["swarm"]["client"] = _median_run(clients).record()
                if not args.no_http:
                    http = swarm.run_http(bed, peers, source, work)
                    log.info("  http: %s", _brief(http))
                    out["swarm"]["http"] = http.record()
    return out


def _brief(run_) -> str:
    if not run_.ok:
        return f"FAILED: {run_.error}"
    return f"{run_.seconds:.2f}s = {run_.ratio:.2f} x limit ({run_.limit:.2f}s)"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: namespaces and daemons removed", file=sys.stderr)
        sys.exit(130)

"""`make demo`: a tracker, a seeder and N peers on this machine distribute one file.

Everything runs on 127.0.0.1 in a temporary directory, as real daemons.  A generated file
is dropped into the seeder's drop dir; live progress bars follow each peer; a table at the
end shows each peer's time, where its bytes came from and whether its copy is correct.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .localfleet import LocalFleet
from .torrent import sha256_file

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([KMG]?)(i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 64M or 1G")
    return int(match.group(1)) * UNITS[match.group(2).upper()]


def make_file(path: Path, size: int) -> str:
    """Write size pseudo-random bytes (fast, incompressible) and return their sha256."""
    digest = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as out:
        written = 0
        counter = 0
        while written < size:
            chunk = hashlib.sha256(counter.to_bytes(8, "big")).digest() * 32 + block[1024:]
            chunk = chunk[: min(len(chunk), size - written)]
            out.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            counter += 1
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="murderd-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("256M"), help="e.g. 64M")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--keep", action="store_true", help="keep the demo's directory")
    args = parser.parse_args(argv)
    console = Console()
    root = Path(tempfile.mkdtemp(prefix="murderd-demo-"))
    name = "demo-app-1.0.bin"
    ok = False
    try:
        console.print(f"[bold]murderd demo[/] in {root}: {args.peers} peers, {args.size:,} bytes")
        source = root / name
        want = make_file(source, args.size)
        # Peers follow the seeder's index.json: a drop on the seeder reaches every peer.
        with LocalFleet(root / "fleet", args.peers, follow=True) as fleet:
            fleet.start()
            console.print(
                f"tracker {fleet.tracker_url}, seeder {fleet.seeder_url}; dropping {name}"
            )
            started = time.time()
            fleet.drop(source)
            results = follow_progress(console, fleet, name, started, args.timeout)
            ok = report(console, fleet, name, want, results, args.size)
    finally:
        if args.keep:
            console.print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


def follow_progress(console, fleet: LocalFleet, name: str, started: float, timeout: float):
    results: dict[int, dict] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        tasks = [
            progress.add_task(f"peer{i + 1}", total=1.0, state="waiting")
            for i in range(len(fleet.peers))
        ]
        deadline = time.monotonic() + timeout
        while len(results) < len(fleet.peers) and time.monotonic() < deadline:
            for index, task in enumerate(tasks):
                if index in results:
                    continue
                states = [s for s in fleet.peer_states(index) if s.get("name") == name]
                if not states:
                    continue
                state = states[-1]
                progress.update(task, completed=state.get("progress", 0), state=state["state"])
                if state["state"] in ("seeding", "done", "failed"):
                    finished = state.get("finished") or time.time()
                    results[index] = dict(state, seconds=finished - started)
                    progress.update(task, completed=1.0 if state["state"] != "failed" else 0)
            time.sleep(0.1)
    return results


def report(console, fleet: LocalFleet, name: str, want: str, results: dict, size: int) -> bool:
    table = Table(title=f"{name}: {size / 1e6:.1f} MB to {len(fleet.peers)} peers")
    for column in ("peer", "state", "time (s)", "from seeder (MB)", "from peers (MB)", "sha256"):
        table.add_column(column, justify="right" if "(" in column else "left")
    all_ok = True
    for index in range(len(fleet.peers)):
        result = results.get(index)
        placed = fleet.peer_destination(index) / name
        if result is None:
            table.add_row(f"peer{index + 1}", "timed out", "-", "-", "-", "[red]missing[/]")
            all_ok = False
            continue
        good = placed.exists() and sha256_file(placed) == want
        all_ok &= good and result["state"] != "failed"
        table.add_row(
            f"peer{index + 1}",
            result["state"],
            f"{result['seconds']:.2f}",
            f"{result.get('bytes_from_seeder', 0) / 1e6:.1f}",
            f"{result.get('bytes_from_peers', 0) / 1e6:.1f}",
            "[green]match[/]" if good else "[red]MISMATCH[/]",
        )
    console.print(table)
    console.print("[green]all copies verified[/]" if all_ok else "[red]demo failed[/]")
    return all_ok


if __name__ == "__main__":
    sys.exit(main())

"""murder-peer's memory while it fetches a big file (on 127.0.0.1, no rate limit).

Sampled every 50 ms from /proc: VmRSS, and its anonymous part (heap: what the process
really holds) and file-backed part (pages of the mapped deploy file, which the kernel can
drop at any time; libtorrent 2 does its disk I/O through mmap).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from murderd.localfleet import LocalFleet

from .common import make_file, override_env, proc_memory

log = logging.getLogger(__name__)


def run(work: Path, size: int, lt_overrides: dict | None = None, timeout: float = 180.0) -> dict:
    root = work / "peermem"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    source = root / "big-2.0.bin"
    make_file(source, size)
    out = {"size": size, "lt_overrides": lt_overrides or {}}
    log.info("peer memory: fetching %.2f GiB", size / (1 << 30))
    saved = dict(os.environ)
    if lt_overrides:  # the daemons LocalFleet starts inherit this environment
        os.environ.update(override_env(lt_overrides))
    try:
        with LocalFleet(root / "fleet", peers=1, follow=True) as fleet:
            fleet.start()
            pid = fleet.peers[0].proc.pid
            out["idle_rss"] = proc_memory(pid).get("VmRSS", 0)
            staged = fleet.drop_dir / f"{source.name}.part"
            os.link(source, staged)
            started = time.monotonic()
            os.replace(staged, fleet.drop_dir / source.name)
            placed = fleet.peer_destination(0) / source.name
            peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
            deadline = started + timeout
            while not placed.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not placed within {timeout}s")
                mem = proc_memory(pid)
                for key in peak:
                    peak[key] = max(peak[key], mem.get(key, 0))
                time.sleep(0.05)
            out["seconds"] = round(time.monotonic() - started, 3)
            out["peak_rss"] = peak["VmRSS"]
            out["peak_anon"] = peak["RssAnon"]
            out["peak_file"] = peak["RssFile"]
            out["hwm"] = proc_memory(pid).get("VmHWM", 0)
        log.info(
            "  peak RSS %.1f MiB (anon %.1f, file %.1f) in %.1fs",
            out["peak_rss"] / (1 << 20),
            out["peak_anon"] / (1 << 20),
            out["peak_file"] / (1 << 20),
            out["seconds"],
        )
    except Exception as exc:
        log.exception("peer memory run failed")
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        os.environ.clear()
        os.environ.update(saved)
    shutil.rmtree(root, ignore_errors=True)
    return out

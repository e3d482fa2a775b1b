"""Helpers shared by the benchmark parts: test files, processes, RSS and CPU, polling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from murderd.demo import make_file  # noqa: F401  (fast incompressible test files)
from murderd.localfleet import free_port, wait_for  # noqa: F401

MIB = 1 << 20
HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def override_env(lt_overrides: dict) -> dict:
    """Environment that makes murderd daemons apply libtorrent overrides (bench/ltoverride)."""
    if not lt_overrides:
        return {}
    # Before any PYTHONPATH of the run's own (an A/B run of another checkout's murderd).
    path = os.pathsep.join(filter(None, (str(HERE / "ltoverride"), os.environ.get("PYTHONPATH"))))
    return {"PYTHONPATH": path, "MURDERD_BENCH_LT": json.dumps(lt_overrides)}


def mbit(rate_bit: int) -> str:
    return f"{rate_bit / 1e6:g} Mbit/s"


def limit_seconds(size: int, rate_bit: int, goodput: float) -> float:
    """The physical limit: every peer must receive size bytes over a link of rate_bit."""
    return size * 8 / (rate_bit * goodput)


def proc_memory(pid: int) -> dict:
    """VmRSS, RssAnon and RssFile of a process in bytes (empty if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Processes:
    """Subprocesses a benchmark part started; close() ends every one of them, by its pid."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: Path | None = None, **kwargs) -> subprocess.Popen:
        with open(log or os.devnull, "ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **kwargs
            )
        self.procs.append(proc)
        return proc

    def close(self, timeout: float = 5.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]

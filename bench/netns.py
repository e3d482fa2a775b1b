"""Several hosts on one machine: network namespaces, veth pairs, one bridge, tbf on both ends.

Every host gets its own namespace and one veth pair to a bridge that lives in a namespace of
the benchmark's own.  The /24 exists only on that bridge: nothing is routed out of it.
``tc tbf`` on both ends of each veth caps a host's upload (host side) and download (bridge
side) at the same rate.  Namespaces are named ``<prefix><pid>-...``; close() deletes them (and
kills whatever still runs inside), and every run removes the leftovers of runs whose process
is gone (a SIGKILLed benchmark).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time

log = logging.getLogger(__name__)

PREFIX = "murderbench"
SUBNET = "10.77.0"  # a private /24 that exists only on the bridge this module creates
# tbf delivers about this share of its rate as TCP payload (Ethernet + IP + TCP headers).
TBF_GOODPUT = 0.956


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def list_namespaces() -> list[str]:
    out = run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_inside(namespace: str) -> None:
    """Kill the processes this benchmark left inside one of its own namespaces."""
    pids = run("ip", "netns", "pids", namespace, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


def delete_namespace(namespace: str) -> None:
    _kill_inside(namespace)
    run("ip", "netns", "del", namespace, check=False)


def remove_stale() -> list[str]:
    """Delete namespaces left by benchmark runs whose process no longer exists."""
    removed = []
    pattern = re.compile(rf"^{PREFIX}(\d+)-")
    for namespace in list_namespaces():
        match = pattern.match(namespace)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            delete_namespace(namespace)
            removed.append(namespace)
    return removed


def tbf_args(rate_bit: int) -> list[str]:
    """tbf for rate_bit bit/s: a burst of ~4 ms (at least 32 KiB), a 20 ms queue."""
    burst = max(32 * 1024, rate_bit // 8 // 250)
    return ["tbf", "rate", f"{rate_bit}bit", "burst", str(burst), "latency", "20ms"]


class Testbed:
    """hosts namespaces on one bridge; host i has address SUBNET.(i+1)."""

    def __init__(self, hosts: int, rate_bit: int):
        if not 1 <= hosts <= 250:
            raise ValueError("1..250 hosts")
        self.prefix = f"{PREFIX}{os.getpid()}-"
        self.bridge_ns = self.prefix + "br"
        self.namespaces = [f"{self.prefix}h{i}" for i in range(hosts)]
        self.rate_bit = 0
        self.created: list[str] = []
        try:
            self._create(rate_bit)
        except BaseException:
            self.close()
            raise

    def address(self, host: int) -> str:
        return f"{SUBNET}.{host + 1}"

    def exec_prefix(self, host: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[host]]

    def _add_namespace(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self.created.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")

    def _create(self, rate_bit: int) -> None:
        self._add_namespace(self.bridge_ns)
        run("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, namespace in enumerate(self.namespaces):
            self._add_namespace(namespace)
            # Created directly inside the namespaces: nothing appears in the root namespace.
            run(
                "ip", "-n", self.bridge_ns, "link", "add", f"v{i}", "type", "veth",
                "peer", "name", "eth0", "netns", namespace,
            )  # fmt: skip
            run("ip", "-n", self.bridge_ns, "link", "set", f"v{i}", "master", "br0", "up")
            run("ip", "-n", namespace, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            run("ip", "-n", namespace, "link", "set", "eth0", "up")
        self.set_rate(rate_bit)

    def set_rate(self, rate_bit: int, hosts: int | None = None) -> None:
        """Cap hosts 0..hosts-1 (default all) at rate_bit up and down."""
        for i in range(len(self.namespaces) if hosts is None else hosts):
            for namespace, dev in ((self.namespaces[i], "eth0"), (self.bridge_ns, f"v{i}")):
                run(
                    "tc",
                    "-n",
                    namespace,
                    "qdisc",
                    "replace",
                    "dev",
                    dev,
                    "root",
                    *tbf_args(rate_bit),
                )
        self.rate_bit = rate_bit

    def counters(self) -> list:
        """[(bytes sent, bytes received)] of every host, read in one call on the bridge side."""
        out = run("ip", "-n", self.bridge_ns, "-j", "-s", "link", "show")
        by_name = {link["ifname"]: link["stats64"] for link in json.loads(out.stdout)}
        result = []
        for i in range(len(self.namespaces)):
            stats = by_name[f"v{i}"]  # the bridge end: its rx is what host i sent
            result.append((stats["rx"]["bytes"], stats["tx"]["bytes"]))
        return result

    def close(self) -> None:
        for namespace in reversed(self.created):
            delete_namespace(namespace)
        self.created.clear()
        left = [n for n in list_namespaces() if n.startswith(self.prefix)]
        for namespace in left:
            delete_namespace(namespace)

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_port(testbed: Testbed, host: int, address: str, port: int, timeout: float = 20.0) -> None:
    """Wait until something accepts TCP connections on address:port, seen from host."""
    deadline = time.monotonic() + timeout
    probe = (
        "import socket,sys\n"
        "s=socket.socket();s.settimeout(0.5)\n"
        f"sys.exit(s.connect_ex(({address!r},{port})))\n"
    )
    while time.monotonic() < deadline:
        if subprocess.run([*testbed.exec_prefix(host), "python3", "-c", probe]).returncode == 0:
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {address}:{port} after {timeout}s")

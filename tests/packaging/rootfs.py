"""A Debian bookworm root with systemd and Debian's python3 packages of murderd's dependencies.

Built once with debootstrap (about two minutes) and cached outside the repository at
``$MURDERD_TEST_ROOTFS`` (default /var/cache/murderd-test/rootfs).  A stamp file records the
package list; a changed list rebuilds the root.  Tests never write into the cached root: they
mount an overlay on top of it (see ``Overlay``), so one root serves every run.

Run as a script to build (or check) the cache ahead of the tests:
``python3 tests/packaging/rootfs.py``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOTFS = Path(os.environ.get("MURDERD_TEST_ROOTFS", "/var/cache/murderd-test/rootfs"))
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# systemd to boot; logrotate to rotate with the shipped config; passwd (useradd) for the RPM's
# %pre; procps for /bin/kill (the units' ExecReload=; util-linux has it on EL9).  The rest are
# Debian's packages of murderd's Python dependencies (EPEL 9 has them as rb_libtorrent-python3,
# python3-sdnotify, python3-inotify, ...); python3-libtorrent is 2.0.x here, like EPEL 9's.
PACKAGES = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "passwd",
    "procps",
    "logrotate",
    "python3",
    "python3-libtorrent",
    "python3-sdnotify",
    "python3-pyinotify",
    "python3-configobj",
    "python3-aiohttp",
    "python3-prometheus-client",
    "python3-rich",
]


def mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for match in re.finditer(r"(?:URIs:|^deb)\s+(\S+/debian)/?\s", text, re.M):
            return match.group(1)
    return DEFAULT_MIRROR


def _stamp() -> str:
    return hashlib.sha256(f"{SUITE} {' '.join(PACKAGES)}".encode()).hexdigest()


def ensure_rootfs(log=print) -> Path:
    """Return the cached root, building it first if it is missing or stale."""
    ROOTFS.parent.mkdir(parents=True, exist_ok=True)
    with open(ROOTFS.parent / "rootfs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = ROOTFS / ".murderd-rootfs-stamp"
        if stamp.exists() and stamp.read_text() == _stamp():
            return ROOTFS
        building = ROOTFS.with_name(ROOTFS.name + ".new")
        shutil.rmtree(building, ignore_errors=True)
        log(f"debootstrap {SUITE} into {building} (cached for later runs)")
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(building),
                mirror(),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        # A container boots faster and quieter without units it has no use for.
        for unit in ("systemd-timesyncd.service", "apt-daily.timer", "apt-daily-upgrade.timer"):
            subprocess.run(
                ["systemctl", f"--root={building}", "mask", unit],
                check=False,
                capture_output=True,
            )
        (building / "etc/hostname").write_text("murderd-test\n")
        (building / ".murderd-rootfs-stamp").write_text(_stamp())
        shutil.rmtree(ROOTFS, ignore_errors=True)
        building.rename(ROOTFS)
        return ROOTFS


class Overlay:
    """A writable overlay mount on top of the cached root; unmounted and removed on close."""

    def __init__(self, lower: Path):
        self.base = Path(tempfile.mkdtemp(prefix="murderd-overlay-", dir="/var/tmp"))
        self.upper = self.base / "upper"
        self.work = self.base / "work"
        self.merged = self.base / "merged"
        for d in (self.upper, self.work, self.merged):
            d.mkdir()
        subprocess.run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={lower},upperdir={self.upper},workdir={self.work}",
                str(self.merged),
            ],
            check=True,
        )

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.merged)], check=False)
        shutil.rmtree(self.base, ignore_errors=True)


if __name__ == "__main__":
    print(ensure_rootfs())
    sys.exit(0)

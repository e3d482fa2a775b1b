"""Helpers for the packaging tests: tool checks, commands, the RPMs built with `make rpm`.

These tests use the real tools (rpmbuild, rpmlint, createrepo_c, dnf, debootstrap,
systemd-nspawn, systemd-analyze, logrotate) and need root.  Outside CI a missing tool skips
the test and names the Debian package to install; in CI (CI=true) it fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from murderd import localfleet

REPO = Path(__file__).resolve().parents[2]
UNITS = ("murder-tracker.service", "murder-seeder.service", "murder-peer.service")

# Debian package of each tool (what .ci/run must install).
APT_PACKAGE = {
    "rpm": "rpm",
    "rpmbuild": "rpm",
    "rpmlint": "rpmlint",
    "createrepo_c": "createrepo-c",
    "dnf": "dnf",
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "systemd-analyze": "systemd",
    "logrotate": "logrotate",
    "nsenter": "util-linux",
}


def need(*tools: str, root: bool = False) -> None:
    """Skip (fail in CI) unless every tool is on PATH (and we are root, if asked)."""
    missing = [t for t in tools if not shutil.which(t)]
    problems = []
    if missing:
        packages = sorted({APT_PACKAGE.get(t, t) for t in missing})
        problems.append(f"missing {', '.join(missing)} (apt-get install {' '.join(packages)})")
    if root and os.geteuid() != 0:
        problems.append("needs root")
    if problems:
        message = "; ".join(problems)
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def run(cmd, check: bool = True, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run with text output captured; on failure the message shows the output."""
    kwargs.setdefault("capture_output", True)
    proc = subprocess.run(cmd, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:] if proc.stdout else ''}\n"
            f"stderr:\n{proc.stderr[-4000:] if proc.stderr else ''}"
        )
    return proc


def wait_for(condition, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    """localfleet.wait_for, polling less often: each poll here may run a command."""
    return localfleet.wait_for(condition, timeout, interval, what)


def rpm_dist() -> str:
    return run(["rpm", "--eval", "%{?dist}"]).stdout.strip()


@dataclass
class Build:
    topdir: Path
    version: str
    release: str

    @property
    def rpm(self) -> Path:
        return self.topdir / "RPMS" / "noarch" / f"murderd-{self.nvr}.noarch.rpm"

    @property
    def srpm(self) -> Path:
        return self.topdir / "SRPMS" / f"murderd-{self.nvr}.src.rpm"

    @property
    def nvr(self) -> str:
        """version-release%{?dist} (.el9 on an EL9 host, nothing on Debian)."""
        return f"{self.version}-{self.release}{rpm_dist()}"

    def files(self) -> list[str]:
        return run(["rpm", "-qlp", str(self.rpm)]).stdout.split()


def make_rpm(topdir: Path, release: str, *extra: str) -> Build:
    need("rpm", "rpmbuild")
    run(
        ["make", "-C", str(REPO), "rpm", f"RPM_TOPDIR={topdir}", f"RELEASE={release}", *extra],
        timeout=600,
    )
    from murderd import __version__

    build = Build(topdir, __version__, release)
    assert build.rpm.exists(), f"make rpm did not produce {build.rpm}"
    return build


def missing_daemons(build: Build) -> list[str]:
    """Daemon modules the RPM does not contain yet (their code is not committed)."""
    files = set(build.files())
    sitelib = [f for f in files if f.endswith("/murderd/__init__.py")][0].rsplit("/", 1)[0]
    wanted = {
        "murder-tracker": f"{sitelib}/tracker/daemon.py",
        "murder-seeder": f"{sitelib}/seeder.py",
        "murder-peer": f"{sitelib}/peer.py",
    }
    return [name for name, path in wanted.items() if path not in files]


NEWER_CONFIG_LINE = "# (a line the newer release's sample config adds)\n"


def make_newer_rpm(base: Build, topdir: Path) -> Build:
    """Release base+1 of the same sources, except that its sample murderd.conf changed.

    Built from base's SRPM (its spec and tarball, release bumped, murderd.conf edited), so
    that an upgrade has to decide between the admin's edited config and a new packaged one:
    what %config(noreplace) is for.
    """
    need("rpm", "rpmbuild")
    release = str(int(base.release) + 1)
    run(["rpm", "-i", "--define", f"_topdir {topdir}", str(base.srpm)])
    tarball = topdir / "SOURCES" / f"murderd-{base.version}.tar.gz"
    unpacked = topdir / "unpacked"
    with tarfile.open(tarball) as tar:
        tar.extractall(unpacked)
    with open(unpacked / f"murderd-{base.version}" / "murderd.conf", "a") as conf:
        conf.write(NEWER_CONFIG_LINE)
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(unpacked / f"murderd-{base.version}", arcname=f"murderd-{base.version}")
    spec = topdir / "SPECS" / "murderd.spec"
    text = spec.read_text()
    assert f"%global murderd_release {base.release}\n" in text
    spec.write_text(
        text.replace(
            f"%global murderd_release {base.release}\n", f"%global murderd_release {release}\n"
        )
    )
    host = []
    if not run(["rpm", "--eval", "%{?_unitdir}"]).stdout.strip():  # as the Makefile does
        host = ["--load", str(REPO / "packaging" / "rpm" / "macros.el9"), "--nodeps"]
    rpmbuild = ["rpmbuild", "--define", f"_topdir {topdir}", *host, "--without", "check"]
    run([*rpmbuild, "-bb", str(spec)], timeout=600)
    build = Build(topdir, base.version, release)
    assert build.rpm.exists(), f"rpmbuild did not produce {build.rpm}"
    return build

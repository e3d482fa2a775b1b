"""The RPM from `make rpm`: rpmlint, its files, owners, config flags, scriptlets, Requires,
and a `dnf --installroot` install from the yum repository `make repo` builds."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from pkgtest import REPO, UNITS, need, run

import murderd

RPMLINT_CONFIG = REPO / "packaging" / "rpm" / "rpmlint.toml"

# Requires: on EL9 / EPEL 9 names (packaging/rpm/REQUIRES.md says where each comes from).
REQUIRES = {
    "python3 >= 3.9",
    "rb_libtorrent-python3 >= 2.0",
    "python3-sdnotify",
    "python3-inotify",
    "python3-configobj",
    "python3-aiohttp",
    "python3-prometheus_client",
    "python3-rich",
    "logrotate",
    "shadow-utils",
    "systemd",
}

# path -> (mode, user, group) for what the package owns outside the Python code.
OWNED = {
    "/etc/murderd": ("drwxr-xr-x", "root", "root"),
    "/etc/murderd/conf.d": ("drwxr-xr-x", "root", "root"),
    "/etc/murderd/murderd.conf": ("-rw-r--r--", "root", "root"),
    "/etc/logrotate.d/murderd": ("-rw-r--r--", "root", "root"),
    "/usr/bin/murder-tracker": ("-rwxr-xr-x", "root", "root"),
    "/usr/bin/murder-seeder": ("-rwxr-xr-x", "root", "root"),
    "/usr/bin/murder-peer": ("-rwxr-xr-x", "root", "root"),
    "/usr/bin/murderctl": ("-rwxr-xr-x", "root", "root"),
    "/usr/lib/systemd/system/murder-tracker.service": ("-rw-r--r--", "root", "root"),
    "/usr/lib/systemd/system/murder-seeder.service": ("-rw-r--r--", "root", "root"),
    "/usr/lib/systemd/system/murder-peer.service": ("-rw-r--r--", "root", "root"),
    "/usr/lib/sysusers.d/murderd.conf": ("-rw-r--r--", "root", "root"),
    "/usr/lib/tmpfiles.d/murderd.conf": ("-rw-r--r--", "root", "root"),
    "/var/lib/murderd": ("drwxr-xr-x", "root", "root"),
    "/var/lib/murderd/tracker": ("drwxr-x---", "murderd", "murderd"),
    "/var/lib/murderd/publish": ("drwxr-x---", "murderd", "murderd"),
    "/var/lib/murderd/seeder": ("drwxr-x---", "murderd", "murderd"),
    "/var/lib/murderd/peer": ("drwxr-x---", "murderd", "murderd"),
    "/srv/murderd/.murderd-staging": ("drwxr-x---", "murderd", "murderd"),
    "/var/lib/murderd/peer/state": ("drwxr-x---", "murderd", "murderd"),
    "/var/log/murderd": ("drwxr-x---", "murderd", "murderd"),
    "/var/spool/murderd": ("drwxr-xr-x", "root", "root"),
    "/var/spool/murderd/seeder": ("drwxr-xr-x", "root", "root"),
    "/var/spool/murderd/seeder/drop": ("drwxrwsr-x", "murderd", "murderd"),
    "/var/spool/murderd/peer": ("drwxr-xr-x", "root", "root"),
    "/var/spool/murderd/peer/drop": ("drwxrwsr-x", "murderd", "murderd"),
    "/srv/murderd": ("drwxr-xr-x", "murderd", "murderd"),
}


def qp(rpm: Path, *args: str) -> str:
    return run(["rpm", "-qp", *args, str(rpm)]).stdout


def file_table(rpm: Path) -> dict[str, tuple[str, str, str]]:
    out = qp(rpm, "--qf", "[%{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME} %{FILENAMES}\n]")
    table = {}
    for line in out.splitlines():
        mode, user, group, path = line.split(" ", 3)
        table[path] = (mode, user, group)
    return table


def test_version_comes_from_the_package(rpm_build):
    assert qp(rpm_build.rpm, "--qf", "%{VERSION}") == murderd.__version__
    spec = (REPO / "packaging" / "rpm" / "murderd.spec").read_text()
    assert re.search(r"^Version:\s+%\{murderd_version\}$", spec, re.M)
    assert murderd.__version__ not in spec.split("%changelog")[0]


def test_rpmlint_finds_no_errors(rpm_build, tmp_path):
    need("rpmlint", "rpm2cpio", "cpio")
    # The spec as it is in the SRPM (with the version filled in by make srpm).
    run(
        ["sh", "-c", f"rpm2cpio {rpm_build.srpm} | cpio -idm --quiet murderd.spec"],
        cwd=tmp_path,
    )
    out = run(
        [
            "rpmlint",
            "-c",
            str(RPMLINT_CONFIG),
            str(rpm_build.rpm),
            str(rpm_build.srpm),
            str(tmp_path / "murderd.spec"),
        ],
        check=False,
    )
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"\b0 errors\b", out.stdout), out.stdout
    assert not re.search(r": E: ", out.stdout), out.stdout


def test_files_owners_and_modes(rpm_build):
    table = file_table(rpm_build.rpm)
    for path, expected in OWNED.items():
        assert table.get(path) == expected, f"{path}: {table.get(path)} != {expected}"
    sitelib = [p for p in table if p.endswith("/murderd/__init__.py")]
    assert sitelib == ["/usr/lib/python3.9/site-packages/murderd/__init__.py"]
    assert "/usr/lib/python3.9/site-packages/murderd/configspec.ini" in table
    # Nothing leaks into /usr/local or the build host's python version.
    assert not [p for p in table if p.startswith("/usr/local") or "python3.11" in p]


def test_scripts_run_the_system_python(rpm_build, tmp_path):
    run(["sh", "-c", f"rpm2cpio {rpm_build.rpm} | cpio -idm --quiet './usr/bin/*'"], cwd=tmp_path)
    for script in (tmp_path / "usr" / "bin").iterdir():
        assert script.read_text().splitlines()[0] == "#!/usr/bin/python3", script


def test_config_files_are_noreplace(rpm_build):
    flags = {}
    for line in qp(rpm_build.rpm, "--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]").splitlines():
        flag, _, path = line.partition(" ")
        flags[path] = flag
    assert set(qp(rpm_build.rpm, "-c").split()) == {
        "/etc/murderd/murderd.conf",
        "/etc/logrotate.d/murderd",
    }
    for path in ("/etc/murderd/murderd.conf", "/etc/logrotate.d/murderd"):
        assert "c" in flags[path] and "n" in flags[path], f"{path}: flags {flags[path]!r}"
    for unit in UNITS:  # units are not config: edits go in drop-ins (systemctl edit)
        assert "c" not in flags[f"/usr/lib/systemd/system/{unit}"]


def test_license_ships_as_a_license_file(rpm_build):
    licenses = qp(rpm_build.rpm, "-L").split()
    assert any(path.endswith("/LICENSE") for path in licenses), licenses
    assert qp(rpm_build.rpm, "--qf", "%{LICENSE}") == "Apache-2.0"


def test_scriptlets(rpm_build):
    scripts = qp(rpm_build.rpm, "--scripts")
    sections = dict(
        re.findall(
            r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)", scripts, re.S | re.M
        )
    )
    units = " ".join(UNITS)
    assert "useradd -r -g murderd -d /var/lib/murderd" in sections["preinstall"]
    assert "groupadd -r murderd" in sections["preinstall"]
    assert "systemd-tmpfiles --create murderd.conf" in sections["postinstall"]
    assert f"install-system-units {units}" in sections["postinstall"]
    assert f"remove-system-units {units}" in sections["preuninstall"]
    assert f"mark-restart-system-units {units}" in sections["postuninstall"]


def test_pre_makes_the_user_sysusers_declares(rpm_build):
    sysusers = (REPO / "packaging" / "sysusers.d" / "murderd.conf").read_text()
    entry = [line for line in sysusers.splitlines() if line.startswith("u ")]
    assert entry == ['u murderd - "murderd deploy daemons" /var/lib/murderd -']
    pre = qp(rpm_build.rpm, "--scripts")
    assert '-c "murderd deploy daemons" murderd' in pre


def test_requires(rpm_build):
    requires = set(qp(rpm_build.rpm, "--requires").splitlines())
    for name in REQUIRES:
        assert name in requires, f"{name} missing from {sorted(requires)}"
    # No generated python3.Ydist(...) requirements: EPEL's rb_libtorrent-python3 has none.
    assert not [r for r in requires if "dist(" in r], sorted(requires)


def test_dnf_installs_murderd_from_make_repo(rpm_build, tmp_path):
    """dnf --installroot installs murderd from the yum repo that `make repo` builds.

    No EL9 repository is reachable from CI, so the EL9 base OS and EPEL 9 are stood in for
    by a provides-only stub package (packaging/rpm/el9-base-stub.spec: no files, only the
    names murderd requires) put in the same repo.  The root has no /bin/sh, so scriptlets
    are off here (tsflags=noscripts); test_systemd.py runs them for real.
    """
    need("dnf", "createrepo_c", "rpmbuild", root=True)
    repo = tmp_path / "repo"
    run(
        [
            "make",
            "-C",
            str(REPO),
            "repo",
            f"RPM_TOPDIR={tmp_path / 'rpm'}",
            f"REPO_DIR={repo}",
            f"RELEASE={rpm_build.release}",
            "RPMBUILD_OPTS=--without check",
        ],
        timeout=600,
    )
    assert (repo / "repodata" / "repomd.xml").exists()
    stub_top = tmp_path / "stub"
    run(
        [
            "rpmbuild",
            "--define",
            f"_topdir {stub_top}",
            "-bb",
            str(REPO / "packaging" / "rpm" / "el9-base-stub.spec"),
        ]
    )
    for stub in (stub_top / "RPMS" / "noarch").glob("*.rpm"):
        shutil.copy(stub, repo)
    run(["createrepo_c", "--quiet", "--update", str(repo)])

    root = tmp_path / "root"
    out = run(
        [
            "dnf",
            "-y",
            f"--installroot={root}",
            f"--repofrompath=local,file://{repo}",
            "--nogpgcheck",
            "--setopt=reposdir=/dev/null",
            "--setopt=tsflags=noscripts",
            "--setopt=install_weak_deps=False",
            "--releasever=9",
            "install",
            "murderd",
        ],
        timeout=300,
    )
    print(out.stdout)
    installed = run(["rpm", f"--root={root}", "-q", "murderd"]).stdout.strip()
    assert installed == f"murderd-{rpm_build.nvr}.noarch"
    for path in (
        "usr/bin/murder-peer",
        "usr/lib/systemd/system/murder-peer.service",
        "etc/murderd/murderd.conf",
        "etc/logrotate.d/murderd",
        "var/spool/murderd/seeder/drop",
    ):
        assert (root / path).exists(), path

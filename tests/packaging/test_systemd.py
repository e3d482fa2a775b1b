"""The RPM under a real systemd: a Debian bookworm root booted with systemd-nspawn.

The root (debootstrap, cached at /var/cache/murderd-test/rootfs, see rootfs.py) has systemd
and Debian's python3 packages of murderd's dependencies (python3-libtorrent 2.0.x, like
EPEL 9's).  Each run mounts an overlay on it, installs the RPM with `rpm --root` (its
scriptlets run for real: useradd, systemd-tmpfiles), boots it with systemd-nspawn in a
private network namespace (the daemons' default ports on the container's own loopback) and
drives it with `nsenter ... systemctl`.

One stand-in for EL9 is needed: EL9's python3 (3.9) reads /usr/lib/python3.9/site-packages,
where the RPM puts murderd; Debian's python3 does not, so a .pth file in Debian's
dist-packages adds that directory.

The tests run in file order against one booted machine.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest
import rootfs
from pkgtest import NEWER_CONFIG_LINE, UNITS, missing_daemons, need, run, wait_for

# unit -> the name of its log file (<name>.log)
DAEMONS = {unit: unit.removeprefix("murder-").removesuffix(".service") for unit in UNITS}
SITELIB_SHIM = "usr/lib/python3/dist-packages/zz-murderd-el9-sitelib.pth"
# The peer follows the seeder's index (defaults otherwise: tracker :8998, seeder :8999).
TEST_CONFIG = """\
[peer]
follow = http://127.0.0.1:8999/index.json
follow_interval = 1
"""
# A short watchdog for the test run (the units ship 30 s): a daemon that stopped pinging
# would be killed within the tests' lifetime.
WATCHDOG_DROPIN = "[Service]\nWatchdogSec=5s\n"


class Machine:
    """A booted systemd-nspawn container; commands run in it through nsenter."""

    def __init__(self, root: Path, console: Path):
        self.root = root
        self.console_path = console
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None

    def boot(self) -> None:
        self.console = open(self.console_path, "w")  # noqa: SIM115 (closed in shutdown)
        self.proc = subprocess.Popen(
            [
                "systemd-nspawn",
                "-D",
                str(self.root),
                "-b",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--console=pipe",
                "-q",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.console,
            stderr=subprocess.STDOUT,
        )

        def container_systemd():
            if self.proc.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited: {self.console_path.read_text()}")
            out = subprocess.run(
                ["pgrep", "-P", str(self.proc.pid), "-x", "systemd"],
                capture_output=True,
                text=True,
            )
            return int(out.stdout.split()[0]) if out.stdout.split() else None

        self.pid = wait_for(container_systemd, 30, what="the container's systemd")

        def bus_up():
            out = self.run("systemctl", "is-system-running", check=False)
            return "Failed to connect to bus" not in out.stderr

        wait_for(bus_up, 30, what="the container's systemd to listen")
        state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=120)
        assert state.stdout.strip() in ("running", "degraded"), state.stdout + state.stderr

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kwargs):
        env = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_COLORS=0", "LANG=C"]
        return run(["nsenter", "-t", str(self.pid), "-a", *env, *cmd], check, timeout, **kwargs)

    def systemctl(self, *args: str, check: bool = True):
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=120)

    def show(self, unit: str) -> dict[str, str]:
        out = self.systemctl("show", unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout

    def shutdown(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None and self.pid:
            self.run("systemctl", "poweroff", check=False)
        for stop in (lambda: None, self.proc.terminate, self.proc.kill):
            stop()  # SIGTERM makes systemd-nspawn power the container off
            try:
                self.proc.wait(20)
                break
            except subprocess.TimeoutExpired:
                continue
        self.console.close()


def rpm_root(root: Path, *args: str) -> subprocess.CompletedProcess:
    """rpm on the container's root from the host; /proc mounted for the scriptlets."""
    (root / "proc").mkdir(exist_ok=True)
    run(["mount", "-t", "proc", "proc", str(root / "proc")])
    try:
        return run(["rpm", f"--root={root}", "--dbpath=/var/lib/rpm", "--nodeps", *args])
    finally:
        run(["umount", str(root / "proc")])


@pytest.fixture(scope="module")
def machine(rpm_build, tmp_path_factory):
    need("debootstrap", "systemd-nspawn", "nsenter", "rpm", "pgrep", root=True)
    lower = rootfs.ensure_rootfs()
    overlay = rootfs.Overlay(lower)
    booted = None
    try:
        root = overlay.merged
        install = rpm_root(root, "-i", str(rpm_build.rpm))
        print(install.stdout, install.stderr)
        (root / SITELIB_SHIM).write_text("/usr/lib/python3.9/site-packages\n")
        (root / "etc/murderd/conf.d/50-test.conf").write_text(TEST_CONFIG)
        for unit in UNITS:
            dropin = root / "etc/systemd/system" / f"{unit}.d"
            dropin.mkdir(parents=True)
            (dropin / "50-test-watchdog.conf").write_text(WATCHDOG_DROPIN)
        booted = Machine(root, tmp_path_factory.mktemp("console") / "console.log")
        booted.boot()
        yield booted
    finally:
        if booted is not None:
            booted.shutdown()
        overlay.close()


@pytest.fixture
def daemons(machine, rpm_build):
    missing = missing_daemons(rpm_build)
    if missing:
        pytest.skip(f"not in the RPM yet (code not committed): {', '.join(missing)}")
    return machine


def passwd_entry(root: Path, name: str) -> list[str]:
    for line in (root / "etc/passwd").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":")
    raise AssertionError(f"no {name} in {root}/etc/passwd")


def log_path(machine: Machine, daemon: str, suffix: str = "") -> Path:
    return machine.root / "var/log/murderd" / f"{daemon}.log{suffix}"


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def reloads_logged(machine: Machine, daemon: str) -> int:
    text = read(log_path(machine, daemon)) + read(log_path(machine, daemon, ".1"))
    return text.count("reload done")


def reload_and_wait(machine: Machine, units=UNITS) -> None:
    """systemctl reload, then wait until each daemon logged that the reload is done."""
    before = {u: reloads_logged(machine, DAEMONS[u]) for u in units}
    machine.systemctl("reload", *units)
    for unit in units:
        wait_for(
            lambda u=unit: reloads_logged(machine, DAEMONS[u]) > before[u],
            30,
            what=f"{unit} to log 'reload done'",
        )


def test_install_scriptlets_made_user_and_directories(machine, rpm_build):
    _, _, uid, gid, gecos, home, shell = passwd_entry(machine.root, "murderd")
    assert (gecos, home, shell) == ("murderd deploy daemons", "/var/lib/murderd", "/sbin/nologin")
    assert int(uid) < 1000, "murderd must be a system user"
    for drop in ("var/spool/murderd/seeder/drop", "var/spool/murderd/peer/drop"):
        st = (machine.root / drop).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (int(uid), int(gid), 0o2775)
    query = run(["rpm", f"--root={machine.root}", "--dbpath=/var/lib/rpm", "-q", "murderd"])
    assert query.stdout.strip() == f"murderd-{rpm_build.nvr}.noarch"


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify_is_silent(machine, unit):
    out = machine.run("systemd-analyze", "verify", f"/usr/lib/systemd/system/{unit}", check=False)
    assert out.returncode == 0 and out.stderr == "" and out.stdout == "", out.stdout + out.stderr


def test_units_start_and_become_active_via_sd_notify(daemons):
    daemons.systemctl("start", *UNITS)
    for unit in UNITS:
        show = daemons.show(unit)
        assert (show["ActiveState"], show["SubState"]) == ("active", "running"), show
        assert show["Type"] == "notify"
        assert show["StatusText"], f"{unit} sent no STATUS= line"
        assert show["NRestarts"] == "0"
        user = daemons.run("ps", "-o", "user=", "-p", show["MainPID"]).stdout.strip()
        assert user == "murderd"
    # The watchdog keeps being fed (WatchdogSec=5s here): its timestamp moves, nothing restarts.
    for unit in UNITS:
        first = daemons.show(unit)["WatchdogTimestampMonotonic"]
        wait_for(
            lambda u=unit, f=first: daemons.show(u)["WatchdogTimestampMonotonic"] != f,
            10,
            what=f"a WATCHDOG=1 from {unit}",
        )
        show = daemons.show(unit)
        assert (show["ActiveState"], show["NRestarts"]) == ("active", "0"), show


def test_drop_by_a_murderd_group_member_reaches_the_peer_destination(daemons):
    daemons.run("useradd", "-m", "deployer")
    daemons.run("usermod", "-aG", "murderd", "deployer")
    drop = "/var/spool/murderd/seeder/drop"
    daemons.run(
        "runuser",
        "-u",
        "deployer",
        "--",
        "sh",
        "-c",
        f"head -c 3000000 /dev/urandom > {drop}/release-1.bin.part"
        f" && mv {drop}/release-1.bin.part {drop}/release-1.bin",
    )
    dropped = daemons.root / drop.lstrip("/") / "release-1.bin"
    placed = daemons.root / "srv/murderd/release-1.bin"
    wait_for(placed.exists, 90, what=f"{placed} (peer log: {log_path(daemons, 'peer')})")
    # Placed by a hard link from staging (the peer keeps seeding it for linger_seconds, 30 s
    # by default), not a copy: the default staging_dir is on the destination's mount.
    assert placed.stat().st_nlink == 2, "placed by copying: staging and destination differ"
    assert "cannot hard-link" not in read(log_path(daemons, "peer"))
    digest = hashlib.sha256(dropped.read_bytes()).hexdigest()
    assert hashlib.sha256(placed.read_bytes()).hexdigest() == digest


def test_reload_keeps_units_active(daemons):
    pids = {unit: daemons.show(unit)["MainPID"] for unit in UNITS}
    reload_and_wait(daemons)
    for unit in UNITS:
        show = daemons.show(unit)
        assert show["ActiveState"] == "active", show
        assert show["MainPID"] == pids[unit], f"{unit} restarted instead of reloading"


def test_logrotate_rotates_and_no_line_is_lost(daemons):
    reload_and_wait(daemons)  # something fresh in every log
    before = {d: read(log_path(daemons, d)) for d in DAEMONS.values()}
    out = daemons.run("logrotate", "-f", "/etc/logrotate.d/murderd")
    assert out.stderr == "", out.stderr
    for daemon, text in before.items():
        rotated = read(log_path(daemons, daemon, ".1"))
        assert rotated.startswith(text), f"{daemon}.log.1 lost lines"
        fresh = log_path(daemons, daemon).stat()
        assert fresh.st_mode & 0o777 == 0o640 and fresh.st_size == 0
    # The daemons follow the new file: their next lines land in <daemon>.log.
    reload_and_wait(daemons)
    for daemon, text in before.items():
        assert "reload done" in read(log_path(daemons, daemon))
        after = read(log_path(daemons, daemon, ".1")) + read(log_path(daemons, daemon))
        assert after.startswith(text), f"{daemon}: lines written before the rotation are lost"


def test_stop_ends_each_unit_cleanly(daemons):
    for unit, daemon in DAEMONS.items():
        daemons.systemctl("stop", unit)
        show = daemons.show(unit)
        # Result=success: no stop timeout (that would be SIGKILL), no crash, exit status 0.
        assert (show["ActiveState"], show["Result"]) == ("inactive", "success"), show
        journal = daemons.journal(unit)
        assert "SIGKILL" not in journal and "Killing process" not in journal, journal[-2000:]
        assert "Failed with result" not in journal, journal[-2000:]
        # The daemon handled SIGTERM itself and finished its own shutdown.
        last = read(log_path(daemons, daemon)).splitlines()[-1]
        assert last.endswith(f"murder-{daemon} stopped"), last


def test_broken_config_fails_with_78_and_the_journal_names_the_key(daemons):
    broken = daemons.root / "etc/murderd/conf.d/90-broken.conf"
    broken.write_text("[tracker]\ninterval = soon\n")
    try:
        start = daemons.systemctl("start", "murder-tracker.service", check=False)
        assert start.returncode != 0
        show = daemons.show("murder-tracker.service")
        assert (show["Result"], show["ExecMainStatus"]) == ("exit-code", "78"), show
        journal = daemons.journal("murder-tracker.service")
        assert re.search(r"90-broken\.conf: \[tracker\] interval", journal), journal[-2000:]

        # RestartPreventExitStatus=78: no restart loop (RestartSec is 5 s).
        def restarted():
            return daemons.show("murder-tracker.service")["NRestarts"] != "0"

        with pytest.raises(AssertionError, match="timed out"):
            wait_for(restarted, 8, interval=0.5, what="a restart")
        assert daemons.show("murder-tracker.service")["ActiveState"] == "failed"
    finally:
        broken.unlink()
        daemons.systemctl("reset-failed", "murder-tracker.service", check=False)
    daemons.systemctl("start", "murder-tracker.service")
    assert daemons.show("murder-tracker.service")["ActiveState"] == "active"


def test_daemon_logs_have_no_tracebacks(daemons):
    """Debian's python3-libtorrent is 2.0.x, like EPEL 9's: the daemons must run on it."""
    for daemon in DAEMONS.values():
        text = read(log_path(daemons, daemon, ".1")) + read(log_path(daemons, daemon))
        assert "Traceback" not in text, f"{daemon}.log:\n{text[-3000:]}"


def test_upgrade_keeps_the_edited_config(machine, rpm_build, rpm_upgrade):
    conf = machine.root / "etc/murderd/murderd.conf"
    edited = conf.read_text().replace('# level = "info"', 'level = "debug"', 1)
    assert 'level = "debug"' in edited
    conf.write_text(edited)
    rpm_root(machine.root, "-U", str(rpm_upgrade.rpm))
    query = run(["rpm", f"--root={machine.root}", "--dbpath=/var/lib/rpm", "-q", "murderd"])
    assert query.stdout.strip() == f"murderd-{rpm_upgrade.nvr}.noarch"
    # noreplace: the admin's file stays, the newer packaged one lands beside it.
    assert conf.read_text() == edited
    rpmnew = conf.with_name("murderd.conf.rpmnew").read_text()
    assert rpmnew.endswith(NEWER_CONFIG_LINE)
    if missing_daemons(rpm_build):
        return
    # What EL9's systemd-update-helper does after the transaction (Debian has none).
    machine.systemctl("daemon-reload")
    machine.systemctl("restart", *UNITS)
    for unit in UNITS:
        assert machine.show(unit)["ActiveState"] == "active"
    wait_for(lambda: " DEBUG " in read(log_path(machine, "peer")), 30, what="debug lines")

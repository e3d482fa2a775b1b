"""The systemd units and the logrotate file, checked on the host (no container).

`systemd-analyze verify` needs the whole OS the units refer to (sysinit.target, /bin/kill,
the daemons' binaries); it runs against the installed root in test_systemd.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pkgtest import REPO, UNITS, need, run

from murderd import config

MAX_EXPOSURE = 3.0


def unit_settings(path: Path) -> dict[str, list[str]]:
    """{key: [values in order]} of a unit file's [Service] and [Unit] sections."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def writable_paths(settings: dict[str, list[str]]) -> set[str]:
    """Every path the unit makes writable under ProtectSystem=strict."""
    paths = set()
    for value in settings.get("StateDirectory", []):
        paths.update(f"/var/lib/{d}" for d in value.split())
    for value in settings.get("LogsDirectory", []):
        paths.update(f"/var/log/{d}" for d in value.split())
    for value in settings.get("ReadWritePaths", []):
        paths.update(p.lstrip("-") for p in value.split())
    return paths


def defaults() -> config.Config:
    """The configspec's defaults, read through the sample config (every key commented out)."""
    return config.load(REPO / "murderd.conf")


def written_dirs(unit: str) -> set[str]:
    """The directories each daemon writes, per the configspec's defaults."""
    cfg = defaults()
    log_dir = cfg["log"]["dir"]
    if unit == "murder-tracker.service":
        return {cfg["tracker"]["state_dir"], log_dir}
    if unit == "murder-seeder.service":
        seeder = cfg["seeder"]
        return {seeder["publish_dir"], seeder["state_dir"], log_dir}
    peer = cfg["peer"]
    return {
        peer["drop_dir"],
        peer["staging_dir"],
        peer["state_dir"],
        peer["destination_dir"],
        log_dir,
    }


def covered(path: str, writable: set[str]) -> bool:
    return any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable)


@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure_at_most_3(unit):
    need("systemd-analyze")
    out = run(["systemd-analyze", "security", "--offline=true", unit], cwd=REPO / "systemd")
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout)
    assert match, out.stdout[-2000:]
    exposure = float(match.group(1))
    print(f"{unit}: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, out.stdout


@pytest.mark.parametrize("unit", UNITS)
def test_unit_runs_as_a_notify_service(unit):
    s = unit_settings(REPO / "systemd" / unit)
    daemon = unit.removesuffix(".service")
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == [f"/usr/bin/{daemon}"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["WatchdogSec"] and s["WatchdogSec"][0] != "0"
    assert s["Restart"] == ["on-failure"]
    assert s["RestartPreventExitStatus"] == ["78"]
    assert s["User"] == ["murderd"] and s["Group"] == ["murderd"]
    assert s["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("unit", UNITS)
def test_unit_hardening(unit):
    s = unit_settings(REPO / "systemd" / unit)
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectHome": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
    }.items():
        assert s.get(key) == [value], f"{unit}: {key}={s.get(key)}"
    assert s["SystemCallFilter"][0] == "@system-service"
    assert set(s["RestrictAddressFamilies"][0].split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
    }


@pytest.mark.parametrize("unit", UNITS)
def test_writable_paths_are_exactly_what_the_daemon_writes(unit):
    writable = writable_paths(unit_settings(REPO / "systemd" / unit))
    wanted = written_dirs(unit)
    for path in wanted:
        assert covered(path, writable), f"{unit} cannot write {path} (writable: {writable})"
    for path in writable:
        assert any(covered(w, {path}) for w in wanted), f"{unit} may write {path}, needlessly"


def test_seeder_only_reads_its_drop_dir():
    writable = writable_paths(unit_settings(REPO / "systemd" / "murder-seeder.service"))
    assert not covered(defaults()["seeder"]["drop_dir"], writable)


def test_logrotate_config():
    text = (REPO / "logrotate" / "murderd").read_text()
    body = [line.split("#")[0].strip() for line in text.splitlines()]
    body = [line for line in body if line]
    assert body[0] == f"{defaults()['log']['dir']}/*.log {{"
    assert body[-1] == "}"
    directives = body[1:-1]
    for directive in (
        "daily",
        "rotate 14",
        "compress",
        "delaycompress",
        "missingok",
        "notifempty",
        "create 0640 murderd murderd",
        "su murderd murderd",
    ):
        assert directive in directives
    assert "copytruncate" not in directives


def test_logrotate_parses(tmp_path):
    """logrotate itself reads the file (paths moved under tmp_path, users made root)."""
    need("logrotate")
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (log_dir / "peer.log").write_text("a line\n")
    text = (REPO / "logrotate" / "murderd").read_text()
    text = text.replace("/var/log/murderd", str(log_dir)).replace("murderd murderd", "root root")
    conf = tmp_path / "murderd.logrotate"
    conf.write_text(text)
    out = run(["logrotate", "-d", "-s", str(tmp_path / "state"), str(conf)])
    assert "error" not in (out.stdout + out.stderr).lower(), out.stdout + out.stderr

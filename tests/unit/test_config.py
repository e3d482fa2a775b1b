"""Config: every kind of bad value names file, section and key; conf.d order; exit 78."""

from __future__ import annotations

import subprocess

import pytest

from murderd import config
from murderd.localfleet import BIN


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def problems(tmp_path, text):
    path = write(tmp_path / "murderd.conf", text)
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    return info.value.problems, path


def test_defaults_and_sample_match_spec(tmp_path):
    cfg = config.load(write(tmp_path / "murderd.conf", ""))
    assert cfg["tracker"]["listen"] == "0.0.0.0:8998"
    assert cfg["tracker"]["interval"] == 15
    assert cfg["tracker"]["allowlist"] is True
    assert cfg["seeder"]["http_listen"] == "0.0.0.0:8999"
    assert cfg["peer"]["linger_seconds"] == 30
    assert cfg["log"]["dir"] == "/var/log/murderd"
    assert cfg["log"]["level"] == "info"
    # The shipped sample is generated from the spec: it must not drift from it.
    from pathlib import Path

    shipped = Path(__file__).parents[2] / "murderd.conf"
    assert shipped.read_text() == config.sample()
    # ...and loading the sample gives the defaults.
    assert config.load(shipped) == cfg


@pytest.mark.parametrize(
    "section,key,value,reason",
    [
        ("tracker", "interval", "abc", "wrong type"),
        ("tracker", "interval", "0", "too small"),
        ("tracker", "listen", "nohost", "host:port"),
        ("tracker", "listen", "1.2.3.4:99999", "outside"),
        ("tracker", "allowlist", "maybe", "wrong type"),
        ("tracker", "trusted_networks", "10.0.0.0/8, bogus", "not an IP network"),
        ("seeder", "trackers", "ftp://x/announce", "URL"),
        ("seeder", "torrent_format", "v3", "v3"),
        ("seeder", "piece_size", "1000", "power of two"),
        ("seeder", "listen_port", "70000", "too big"),
        ("peer", "linger_seconds", "-1", "too small"),
        ("peer", "announce_ip", "not-an-ip", "not an IP address"),
        ("peer", "destination_dir", "relative/dir", "absolute"),
        ("log", "level", "loud", "loud"),
    ],
)
def test_bad_value_names_file_section_key(tmp_path, section, key, value, reason):
    found, path = problems(tmp_path, f"[{section}]\n{key} = {value}\n")
    assert len(found) == 1, found
    line = found[0]
    assert line.startswith(f"{path}: [{section}] {key}:"), line
    assert reason in line, line


def test_unknown_key_and_section(tmp_path):
    found, path = problems(tmp_path, "[tracker]\nintervall = 5\n[trackr]\nx = 1\n")
    assert any(f"{path}: [trackr]: unknown section" == p for p in found), found
    found, path = problems(tmp_path, "[tracker]\nintervall = 5\n")
    assert found == [f"{path}: [tracker] intervall: unknown key"]


def test_not_ini_and_key_outside_section(tmp_path):
    found, path = problems(tmp_path, "[tracker\ninterval = 5\n")
    assert found[0].startswith(f"{path}: not a valid INI file")
    found, path = problems(tmp_path, "interval = 5\n")
    assert "outside any [section]" in found[0]


def test_cross_key_checks(tmp_path):
    found, _ = problems(tmp_path, "[tracker]\ninterval = 10\nmin_interval = 20\n")
    assert "[tracker] min_interval" in found[0] and "larger than interval" in found[0]
    found, _ = problems(tmp_path, "[peer]\nlinger_seconds = 60\nmax_linger_seconds = 30\n")
    assert "[peer] max_linger_seconds" in found[0] and "less than linger_seconds" in found[0]


def test_a_default_follows_the_key_it_must_not_contradict(tmp_path):
    """interval = 1 alone is fine: the default min_interval (5) comes down with it."""
    text = "[tracker]\ninterval = 1\n[peer]\nlinger_seconds = 900\n"
    path = write(tmp_path / "murderd.conf", text)
    cfg = config.load(path)
    assert (cfg["tracker"]["interval"], cfg["tracker"]["min_interval"]) == (1, 1)
    assert (cfg["peer"]["linger_seconds"], cfg["peer"]["max_linger_seconds"]) == (900, 900)


def test_confd_overrides_in_name_order_and_errors_name_the_dropin(tmp_path):
    main = write(tmp_path / "murderd.conf", "[tracker]\ninterval = 20\nnumwant_max = 100\n")
    write(tmp_path / "conf.d" / "20-late.conf", "[tracker]\ninterval = 40\n")
    write(tmp_path / "conf.d" / "10-early.conf", "[tracker]\ninterval = 30\nmin_interval = 2\n")
    write(tmp_path / "conf.d" / "ignored.txt", "[tracker]\ninterval = 99\n")
    cfg = config.load(main)
    assert cfg["tracker"]["interval"] == 40
    assert cfg["tracker"]["min_interval"] == 2
    assert cfg["tracker"]["numwant_max"] == 100
    assert cfg.source("tracker", "interval").endswith("20-late.conf")
    assert cfg.source("tracker", "numwant_max") == str(main)
    assert cfg.source("tracker", "listen") == "default"
    write(tmp_path / "conf.d" / "30-bad.conf", "[peer]\nlinger_seconds = soon\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(main)
    assert info.value.problems[0].startswith(f"{tmp_path / 'conf.d' / '30-bad.conf'}: [peer]")


def test_missing_explicit_file(tmp_path):
    with pytest.raises(config.ConfigError) as info:
        config.load(tmp_path / "nope.conf")
    assert "cannot read" in str(info.value)


@pytest.mark.parametrize("daemon", ["tracker", "seeder", "peer"])
def test_daemons_exit_78_naming_the_key(tmp_path, daemon):
    path = write(
        tmp_path / "murderd.conf", "[daemon]\nallow_root = yes\n[peer]\nkeep_deploys = x\n"
    )
    proc = subprocess.run(
        [str(BIN / f"murder-{daemon}"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 78
    assert f"{path}: [peer] keep_deploys:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_config_prints_effective_config(tmp_path):
    path = write(tmp_path / "murderd.conf", "[tracker]\ninterval = 20\n")
    proc = subprocess.run(
        [str(BIN / "murderctl"), "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"interval = 20    # {path}" in proc.stdout
    assert "linger_seconds = 30    # default" in proc.stdout
    bad = write(tmp_path / "bad.conf", "[tracker]\ninterval = x\n")
    proc = subprocess.run(
        [str(BIN / "murderctl"), "check-config", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 78
    assert f"{bad}: [tracker] interval:" in proc.stderr


def test_daemon_refuses_root_without_allow_root(tmp_path):
    import os

    if os.geteuid() != 0:
        pytest.skip("needs to run as root to see the refusal")
    path = write(tmp_path / "murderd.conf", f"[log]\ndir = {tmp_path}/log\n")
    proc = subprocess.run(
        [str(BIN / "murder-tracker"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 78
    assert "refusing to run as root" in proc.stderr and "allow_root" in proc.stderr

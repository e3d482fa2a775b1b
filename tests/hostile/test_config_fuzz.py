"""A fuzzed config never gives a traceback: it loads, or it is refused (exit 78) with one line
per problem naming the file and, for a bad value, the [section] and key."""

from __future__ import annotations

import math
import re
import subprocess
import uuid
from pathlib import Path

import pytest
from configobj import ConfigObj
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from murderd import config
from murderd.localfleet import BIN, free_port

SPEC = ConfigObj(str(config.SPEC_PATH), list_values=False, _inspec=True)
KEYS = [(section, key) for section in SPEC for key in SPEC[section]]
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PROBLEM = re.compile(
    r"^(?P<file>/\S+): (\[(?P<section>[^\]]+)\]( (?P<key>.+?))?:|not a valid INI|key )"
)

NASTY = st.one_of(
    st.sampled_from(
        [
            "",
            '""',
            "yes",
            "nan",
            "NaN",
            "inf",
            "-inf",
            "1e400",
            "-0",
            "0",
            "-1",
            "2147483648",
            "9223372036854775808",
            "99999999999999999999999999",
            "0x10",
            "1_000",
            "10.0.0.0/33",
            "::1",
            "[::]:99999",
            "0.0.0.0:-1",
            "localhost:0",
            "/",
            "relative/dir",
            "a, b, c",
            ",",
            "'''",
            '"""',
            "x = y",
            "[notasection]",
            "%(interpolate)s",
            "$HOME",
            "\\",
            "ftp://x/announce",
            "udp://127.0.0.1:1/announce",
            "é",
            "\u202e",
        ]
    ),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
        max_size=60,
    ),
    st.lists(st.sampled_from(["1", "a", "10.0.0.0/8", '"q"', "http://x/announce"]), max_size=4).map(
        ", ".join
    ),
)


@st.composite
def structured(draw) -> str:
    """Valid INI syntax; known (and a few unknown) sections and keys; nasty values."""
    lines: list[str] = []
    current = None
    for _ in range(draw(st.integers(min_value=1, max_value=8))):
        section, key = draw(st.sampled_from(KEYS))
        if draw(st.integers(0, 9)) == 0:
            key = draw(st.sampled_from(["intervall", "Listen", "x", "allow-root"]))
        if section != current:
            lines.append(f"[{section}]")
            current = section
        lines.append(f"{key} = {draw(NASTY)}")
    return "\n".join(lines) + "\n"


RAW = st.one_of(
    st.text(max_size=400).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=400),
    st.lists(
        st.sampled_from(
            [
                "[tracker]",
                "[[sub]]",
                "[peer",
                "interval = 5",
                "interval = 6",
                "= 5",
                "key",
                "key = 'unterminated",
                'key = """',
                "[tracker]\n[tracker]",
                "\ufeff[tracker]",
                "\x00",
                "include = /etc/passwd",
            ]
        ),
        max_size=10,
    ).map(lambda lines: "\n".join(lines).encode()),
)


def load(tmp_path: Path, text: str | bytes):
    path = tmp_path / f"fuzz-{uuid.uuid4().hex}.conf"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    try:
        return path, config.load(path), None
    except config.ConfigError as exc:
        return path, None, exc
    finally:
        path.unlink()


def check_loaded(cfg: config.Config) -> None:
    """What loads is usable: numbers finite and within what the daemons can pass on."""
    for section, values in cfg.items():
        for key, value in values.items():
            if isinstance(value, float):
                assert math.isfinite(value), f"[{section}] {key} = {value}"
            if isinstance(value, int) and not isinstance(value, bool):
                assert abs(value) < 2**63, f"[{section}] {key} = {value}"


@FUZZ
@given(text=structured())
def test_structured_fuzz_loads_or_names_file_section_key(tmp_path, text):
    path, cfg, error = load(tmp_path, text)
    if error is None:
        check_loaded(cfg)
        return
    assert error.problems
    for line in error.problems:
        match = PROBLEM.match(line)
        assert match and match.group("file") == str(path), line
        assert match.group("section") or "not a valid INI" in line, line


@FUZZ
@given(text=RAW)
def test_raw_fuzz_never_raises_anything_but_config_error(tmp_path, text):
    path, cfg, error = load(tmp_path, text)
    if error is None:
        check_loaded(cfg)
    else:
        assert all(line.startswith(str(path)) for line in error.problems), error.problems


EVERY_KEY_VALUES = ["nan", "inf", "-inf", "1e400", "-1", "99999999999999999999", "", "x", "é"]


@pytest.mark.parametrize("value", EVERY_KEY_VALUES)
def test_every_key_with_each_nasty_value(tmp_path, value):
    """Not left to chance: every key of the spec, each of these values."""
    for section, key in KEYS:
        path, cfg, error = load(tmp_path, f"[{section}]\n{key} = {value}\n")
        if error is None:
            check_loaded(cfg)
        else:
            assert len(error.problems) == 1, error.problems
            assert error.problems[0].startswith(f"{path}: [{section}] {key}: "), error.problems


# -- the daemons themselves --------------------------------------------------------------------

BASE = "[daemon]\nallow_root = yes\n[log]\ndir = {tmp}/log\n"
ROLE_DIRS = {
    "tracker": (
        "[tracker]\nlisten = 127.0.0.1:{port}\ntorrents_dir = {tmp}/t\nstate_dir = {tmp}/s\n"
    ),
    "seeder": (
        "[seeder]\ndrop_dir = {tmp}/d\npublish_dir = {tmp}/p\nstate_dir = {tmp}/s\n"
        "http_listen = 127.0.0.1:{port}\nlisten_interfaces = 127.0.0.1:{port2}\n"
    ),
    "peer": (
        "[peer]\ndrop_dir = {tmp}/d\nstaging_dir = {tmp}/st\ndestination_dir = {tmp}/dest\n"
        "state_dir = {tmp}/s\nlisten_interfaces = 127.0.0.1:{port2}\n"
    ),
}


def extreme(check: str, which: str) -> str | None:
    """The largest (or smallest) value the spec lets through for an integer/float key."""
    kind = check.split("(", 1)[0]
    if kind not in ("integer", "float"):
        return None
    bound = re.search(rf"\b{which}=(-?[\d.]+)", check)
    assert bound or which == "min", f"{check}: an unbounded number is a crash waiting"
    return bound.group(1) if bound else "0"


def run_daemon(role: str, path: Path) -> tuple[int, str, bool]:
    """Start a daemon; (exit status, its stderr, whether it got ready).  Stopped if ready."""
    proc = subprocess.Popen(
        [str(BIN / f"murder-{role}"), "--config", str(path), "--stderr"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready = f"murder-{role} ready"
    out = ""
    try:
        for line in proc.stderr:  # the daemon gets ready or exits within seconds
            out += line
            if ready in line:
                break
    finally:
        if proc.poll() is None:
            proc.terminate()
        code = proc.wait(30)
        out += proc.stderr.read()
    return code, out, ready in out


def role_config(tmp_path: Path, role: str, extra: str) -> Path:
    path = tmp_path / "murderd.conf"
    text = (BASE + ROLE_DIRS[role]).format(tmp=tmp_path, port=free_port(), port2=free_port())
    path.write_text(text + extra, encoding="utf-8")
    return path


@pytest.mark.parametrize("which", ["max", "min"])
@pytest.mark.parametrize("role", ["tracker", "seeder", "peer"])
def test_every_number_at_its_extreme_still_starts(tmp_path, role, which):
    """Each numeric key of the role at the edge of what the spec accepts, all at once: what
    validation lets through, the daemon can run with (libtorrent's 32-bit settings ...)."""
    values = {}
    for key, check in SPEC[role].items():
        value = extreme(check, which)
        if value is not None and not key.endswith("port"):
            values[key] = value
    if role == "tracker":  # the cross-key check wants min_interval <= interval
        values["min_interval"] = values["interval"]
    if role == "peer":
        values["max_linger_seconds"] = values["linger_seconds"]
    extra = "".join(f"{k} = {v}\n" for k, v in values.items())
    code, out, ready = run_daemon(role, role_config(tmp_path, role, extra))
    assert ready and code == 0, out[-3000:]
    assert "Traceback" not in out


@pytest.mark.parametrize(
    "role, section, key, value",
    [
        ("seeder", "seeder", "upload_rate_limit", "99999999999999999999"),
        ("peer", "peer", "download_rate_limit", "2147483648"),
        ("peer", "peer", "max_torrent_bytes", "1e400"),
        ("tracker", "daemon", "stop_timeout", "nan"),
        ("seeder", "seeder", "piece_size", "1099511627776"),
        ("peer", "peer", "listen_interfaces", "\u202e"),
    ],
)
def test_a_nasty_value_exits_78_naming_the_key(tmp_path, role, section, key, value):
    main = role_config(tmp_path, role, "")
    (tmp_path / "conf.d").mkdir()
    path = tmp_path / "conf.d" / "50-nasty.conf"
    path.write_text(f"[{section}]\n{key} = {value}\n", encoding="utf-8")
    code, out, ready = run_daemon(role, main)
    assert "Traceback" not in out, out[-3000:]
    if key == "listen_interfaces":  # free text libtorrent checks: it logs, and goes on
        assert ready and code == 0, out[-3000:]
        return
    assert code == config.EX_CONFIG and not ready, out[-3000:]
    assert f"{path}: [{section}] {key}: " in out, out[-3000:]

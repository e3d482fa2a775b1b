"""Load and validate murderd's INI configuration.

One configspec (``configspec.ini`` beside this module) declares every key.  The main file
is read first, then ``conf.d/*.conf`` beside it in name order, each overriding the keys it
sets.  Every problem is reported as one line naming the file, section, key and reason.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import sys
from pathlib import Path
from typing import Iterable

from configobj import ConfigObj, ConfigObjError, Section, flatten_errors, get_extra_values
from validate import ValidateError, Validator, VdtValueError

log = logging.getLogger(__name__)

DEFAULT_PATH = "/etc/murderd/murderd.conf"
EX_CONFIG = 78  # sysexits.h: configuration error
SPEC_PATH = Path(__file__).with_name("configspec.ini")
MAX_PIECE_SIZE = 64 * 1024 * 1024  # libtorrent refuses to make pieces much larger


class ConfigError(Exception):
    """The configuration is unusable; str() is one or more lines naming file, section, key."""

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def split_hostport(value: str) -> tuple[str, int]:
    """'0.0.0.0:8998' or '[::]:8998' -> (host, port); ValueError with a reason otherwise."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"{value!r} is not host:port")
    host, _, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"{value!r} has no host")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{value!r} has a port that is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{value!r} has a port outside 0-65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{value!r}: host must be an IP address or localhost") from None
    return host, port


def _hostport(value, *args):
    if value is None or value == "":
        # Only keys whose default is empty (an optional endpoint) may be empty.
        return ""
    if isinstance(value, list):
        raise VdtValueError(value)
    try:
        split_hostport(value)
    except ValueError as exc:
        raise ValidateError(str(exc)) from None
    return value


def _network_list(value, *args):
    if isinstance(value, str):
        value = [value] if value else []
    out = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValidateError(f"{item!r} is not an IP network (e.g. 10.0.0.0/8)") from None
    return out


def _url_list(value, *args):
    if isinstance(value, str):
        value = [value] if value else []
    for item in value:
        if not item.startswith(("http://", "https://", "udp://")):
            raise ValidateError(f"{item!r} is not an http://, https:// or udp:// URL")
    return list(value)


def _piece_size(value, *args):
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValidateError(f"{value!r} is not a number") from None
    if size != 0 and (size < 16384 or size > MAX_PIECE_SIZE or size & (size - 1)):
        raise ValidateError(f"{size} is not 0 or a power of two from 16384 to {MAX_PIECE_SIZE}")
    return size


VALIDATOR = Validator(
    {
        "hostport": _hostport,
        "network_list": _network_list,
        "url_list": _url_list,
        "piece_size": _piece_size,
    }
)


def _spec() -> ConfigObj:
    return ConfigObj(str(SPEC_PATH), list_values=False, _inspec=True, encoding="utf-8")


def _read(path: Path) -> ConfigObj:
    try:
        return ConfigObj(
            str(path), encoding="utf-8", file_error=True, interpolation=False, raise_errors=True
        )
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except (ConfigObjError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: not a valid INI file: {exc}"]) from None


def dropin_files(main: Path) -> list[Path]:
    """conf.d/*.conf beside the main file, in name order."""
    confd = main.parent / "conf.d"
    if not confd.is_dir():
        return []
    return sorted(p for p in confd.glob("*.conf") if p.is_file())


class Config(dict):
    """The effective configuration: {section: {key: value}} plus where it came from."""

    def __init__(self, values: dict, files: list[Path], origin: dict):
        super().__init__(values)
        self.files = files
        self.origin = origin  # (section, key) -> file that set it

    def source(self, section: str, key: str) -> str:
        return str(self.origin.get((section, key), "default"))

    def render(self) -> str:
        """The effective config as INI text, each key noting the file that set it."""
        lines = [f"# effective configuration from: {', '.join(map(str, self.files)) or 'defaults'}"]
        for section, values in self.items():
            lines.append(f"\n[{section}]")
            for key, value in values.items():
                if isinstance(value, list):
                    shown = ", ".join(str(v) for v in value) + ("," if len(value) == 1 else "")
                    shown = shown or '""'
                elif isinstance(value, bool):
                    shown = "yes" if value else "no"
                elif value == "":
                    shown = '""'
                else:
                    shown = str(value)
                lines.append(f"{key} = {shown}    # {self.source(section, key)}")
        return "\n".join(lines) + "\n"


def load(path: str | os.PathLike | None = None) -> Config:
    """Read, merge and validate the configuration; raise ConfigError naming every problem.

    With path None the default file is used if it exists, else the built-in defaults.
    A path given explicitly must exist.
    """
    explicit = path is not None
    main = Path(path if explicit else DEFAULT_PATH)
    files: list[Path] = []
    if main.exists() or explicit:
        files.append(main)
        files.extend(dropin_files(main))

    merged = ConfigObj(configspec=_spec(), interpolation=False, encoding="utf-8")
    origin: dict[tuple[str, str], Path] = {}
    problems: list[str] = []
    for file in files:
        data = _read(file)
        for section, values in data.items():
            if not isinstance(values, Section):
                problems.append(f"{file}: key {section!r} is outside any [section]")
                continue
            if section not in merged.configspec:
                problems.append(f"{file}: [{section}]: unknown section")
                continue
            if section not in merged:
                merged[section] = {}
            for key, value in values.items():
                if isinstance(value, Section):
                    problems.append(f"{file}: [{section}] {key}: subsections are not allowed")
                    continue
                merged[section][key] = value
                origin[(section, key)] = file
    if problems:
        raise ConfigError(problems)

    result = merged.validate(VALIDATOR, preserve_errors=True, copy=True)
    if result is not True:
        for sections, key, error in flatten_errors(merged, result):
            section = sections[0] if sections else "?"
            where = origin.get((section, key), "built-in default")
            value = merged.get(section, {}).get(key)
            if error is False:
                reason = "missing"
            else:
                reason = str(error) or "invalid value"
            problems.append(f"{where}: [{section}] {key}: {reason} (value: {value!r})")
    for sections, name in get_extra_values(merged):
        section = sections[0] if sections else "?"
        where = origin.get((section, name), files[-1] if files else "?")
        problems.append(f"{where}: [{section}] {name}: unknown key")
    if problems:
        raise ConfigError(problems)
    spec = merged.configspec
    values = {s: {k: merged[s][k] for k in spec[s]} for s in spec}
    problems.extend(_sanity(values, origin))
    if problems:
        raise ConfigError(problems)
    return Config(values, files, origin)


def load_or_report(path: str | os.PathLike | None, prog: str) -> Config | None:
    """load(); on failure print each problem as one line on stderr and return None."""
    try:
        return load(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"{prog}: config error: {line}", file=sys.stderr)
        return None


def _sanity(values: dict, origin: dict) -> list[str]:
    """Cross-key checks that one key's type cannot express.

    A default that contradicts a key the user set is adjusted here first (in values), so
    only two settings the user chose can contradict each other.
    """

    def where(section, key):
        return origin.get((section, key), "built-in default")

    problems = []
    for section, keys in values.items():
        for key, value in keys.items():
            # validate's float(min=, max=) lets "nan" through: no comparison is true for it.
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(
                    f"{where(section, key)}: [{section}] {key}: {value} is not a finite number"
                )
    # A default never contradicts what the user set: a lower interval lowers the default
    # min_interval with it, a longer linger_seconds raises the default max_linger_seconds.
    tracker = values["tracker"]
    if tracker["min_interval"] > tracker["interval"] and ("tracker", "min_interval") not in origin:
        tracker["min_interval"] = tracker["interval"]
    peer = values["peer"]
    if peer["max_linger_seconds"] < peer["linger_seconds"] and (
        ("peer", "max_linger_seconds") not in origin
    ):
        peer["max_linger_seconds"] = peer["linger_seconds"]
    if tracker["min_interval"] > tracker["interval"]:
        problems.append(
            f"{where('tracker', 'min_interval')}: [tracker] min_interval: "
            f"{tracker['min_interval']} is larger than interval ({tracker['interval']})"
        )
    if peer["max_linger_seconds"] < peer["linger_seconds"]:
        problems.append(
            f"{where('peer', 'max_linger_seconds')}: [peer] max_linger_seconds: "
            f"{peer['max_linger_seconds']} is less than linger_seconds ({peer['linger_seconds']})"
        )
    for section in ("seeder", "peer"):
        for key in ("announce_ip",):
            value = values[section][key]
            if value:
                try:
                    ipaddress.ip_address(value)
                except ValueError:
                    problems.append(
                        f"{where(section, key)}: [{section}] {key}: {value!r} is not an IP address"
                    )
    for section, keys in (
        ("seeder", ("drop_dir", "publish_dir", "state_dir")),
        ("peer", ("drop_dir", "staging_dir", "destination_dir", "state_dir")),
        ("tracker", ("torrents_dir", "state_dir")),
        ("log", ("dir",)),
    ):
        for key in keys:
            if not os.path.isabs(values[section][key]):
                problems.append(
                    f"{where(section, key)}: [{section}] {key}: "
                    f"{values[section][key]!r} is not an absolute path"
                )
    return problems


def changed_keys(old: Config, new: Config) -> list[tuple[str, str]]:
    """(section, key) pairs whose value differs between two configs."""
    return [
        (section, key)
        for section in new
        for key in new[section]
        if old.get(section, {}).get(key) != new[section][key]
    ]


def sample() -> str:
    """The shipped murderd.conf: every key of the configspec, commented out at its default."""
    out = [
        "# murderd configuration (/etc/murderd/murderd.conf).",
        "# Every key is shown at its default, commented out.  Files in conf.d/*.conf beside",
        "# this one override it, in name order.  Check with: murderctl check-config",
    ]
    for raw in SPEC_PATH.read_text(encoding="utf-8").splitlines()[3:]:
        line = raw.strip()
        if not line:
            out.append("")
        elif line.startswith("#") or line.startswith("["):
            out.append(line)
        else:
            key, _, check = line.partition("=")
            default = check.split("default=", 1)[1].rsplit(")", 1)[0] if "default=" in check else ""
            if default.startswith("list("):
                items = [i.strip().strip('"') for i in default[5:-1].split(",") if i.strip()]
                default = ", ".join(items) + ("," if len(items) == 1 else "") if items else '""'
            elif default in ("True", "False"):
                default = "yes" if default == "True" else "no"
            out.append(f"# {key.strip()} = {default}")
    return "\n".join(out).rstrip() + "\n"

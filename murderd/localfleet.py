"""A whole murderd fleet on one machine: tracker, seeder and peers as real subprocesses.

Used by ``make demo``, the benchmarks and the integration tests.  Every daemon gets its own
directories and config under one root, listens on 127.0.0.1 only, and reports readiness over
a real sd_notify socket that this module owns (as systemd would).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from itertools import count
from pathlib import Path

from . import fsutil

BIN = Path(sys.executable).parent
PEER_ADDRESS_BASE = 11  # LocalFleet(peer_addresses=True): peer i on 127.0.0.(11 + i)
_serial = count()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll condition() until it returns something truthy; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def render_ini(sections: dict) -> str:
    out = []
    for section, values in sections.items():
        out.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                value = "yes" if value else "no"
            elif isinstance(value, (list, tuple)):
                value = ", ".join(str(v) for v in value) + ("," if len(value) == 1 else "")
            out.append(f"{key} = {value}")
        out.append("")
    return "\n".join(out)


def write_config(directory: Path, sections: dict | None = None, name: str = "murderd.conf") -> Path:
    """A config under directory: root allowed (tests run as root), logs in directory/log."""
    base = {
        "daemon": {"allow_root": True, "stop_timeout": 15},
        "log": {"dir": str(directory / "log"), "level": "debug"},
    }
    for section, values in (sections or {}).items():
        base.setdefault(section, {}).update(values)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(render_ini(base))
    return path


def write_peer_config(base: Path, log: dict, listen: str, follow_url: str = "", **peer) -> Path:
    """A peer's config with its directories under base (drop, staging, dest, state)."""
    return write_config(
        base,
        {
            "log": log,
            "peer": {
                "drop_dir": str(base / "drop"),
                "staging_dir": str(base / "staging"),
                "destination_dir": str(base / "dest"),
                "state_dir": str(base / "state"),
                "listen_interfaces": listen,
                "follow": follow_url,
                "follow_interval": 1,
                **peer,
            },
        },
    )


class Daemon:
    """One murderd daemon as a subprocess, with its own sd_notify socket."""

    def __init__(
        self,
        name: str,
        config: Path,
        workdir: Path,
        env: dict | None = None,
        prefix: list[str] | None = None,
    ):
        self.name = name  # tracker, seeder or peer
        self.config = config
        self.workdir = Path(workdir)
        self.extra_env = env or {}
        # Argv put before the daemon's, e.g. ["ip", "netns", "exec", NS] (the benchmarks).
        self.prefix = list(prefix or [])
        self.proc: subprocess.Popen | None = None
        # AF_UNIX paths are short (108 bytes): keep the socket in /tmp, not in workdir.
        self.notify_path = Path(tempfile.gettempdir()) / f"mdn-{os.getpid()}-{next(_serial)}.sock"
        self.stderr_path = self.workdir / f"{name}.stderr"
        self.messages: list[str] = []
        self.sock: socket.socket | None = None
        self._log_path: Path | None = None

    @property
    def log_path(self) -> Path:
        # Read once: a test may break the config on purpose later.
        if self._log_path is None:
            from . import config

            self._log_path = Path(config.load(self.config)["log"]["dir"]) / f"{self.name}.log"
        return self._log_path

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, wait: bool = True, timeout: float = 30.0) -> Daemon:
        self.log_path  # noqa: B018  (resolve it while the config is still valid)
        if self.sock is None:
            self.notify_path.unlink(missing_ok=True)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.bind(str(self.notify_path))
            self.sock.setblocking(False)
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), PYTHONUNBUFFERED="1")
        env.update(self.extra_env)
        self.poll_messages()  # a restart: what the previous process sent is not news
        self.messages.clear()
        with open(self.stderr_path, "ab") as stderr:
            self.proc = subprocess.Popen(
                [*self.prefix, str(BIN / f"murder-{self.name}"), "--config", str(self.config)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        if wait:
            self.wait_message("READY=1", timeout)
        return self

    def poll_messages(self) -> list[str]:
        while self.sock is not None:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            self.messages.extend(data.decode().split("\n"))
        return self.messages

    def wait_message(self, text: str, timeout: float = 30.0) -> None:
        def seen():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"murder-{self.name} exited with {self.proc.returncode} before {text}:\n"
                    + self.stderr_path.read_text(errors="replace")[-3000:]
                    + self.log_text()[-3000:]
                )
            return text in self.poll_messages()

        wait_for(seen, timeout, what=f"{text} from murder-{self.name}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"murder-{self.name} did not stop within {timeout}s") from None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        if self.sock:
            self.sock.close()
            self.sock = None
        self.notify_path.unlink(missing_ok=True)


class LocalFleet:
    """Tracker + seeder + N peers under root, all on 127.0.0.1.

    With follow=True every peer follows the seeder's index.json, so a file dropped on the
    seeder reaches every peer with no further step.  With peer_addresses=True peer i
    listens on an address of its own, 127.0.0.<PEER_ADDRESS_BASE + i> (all of 127/8 is
    loopback on Linux), as on separate hosts: the seeder's address is then not theirs.
    """

    def __init__(
        self,
        root: Path,
        peers: int = 4,
        *,
        tracker: dict | None = None,
        seeder: dict | None = None,
        peer: dict | None = None,
        follow: bool = False,
        log_level: str = "info",
        peer_addresses: bool = False,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tracker_port = free_port()
        self.seeder_http_port = free_port()
        self.tracker_url = f"http://127.0.0.1:{self.tracker_port}"
        self.seeder_url = f"http://127.0.0.1:{self.seeder_http_port}"
        self.token_file = self.root / "token"
        fsutil.atomic_write(self.token_file, secrets.token_hex(16).encode(), mode=0o600)
        self.seeder_dir = self.root / "seeder"
        self.drop_dir = self.seeder_dir / "drop"
        self.publish_dir = self.seeder_dir / "publish"
        log = {"level": log_level}
        self.tracker_config = write_config(
            self.root / "tracker",
            {
                "log": log,
                "tracker": {
                    "listen": f"127.0.0.1:{self.tracker_port}",
                    "torrents_dir": str(self.publish_dir),
                    "state_dir": str(self.root / "tracker" / "state"),
                    "token_file": str(self.token_file),
                    "interval": 15,
                    "min_interval": 1,
                    **(tracker or {}),
                },
            },
        )
        self.publish_dir.mkdir(parents=True, exist_ok=True)
        self.seeder_config = write_config(
            self.seeder_dir,
            {
                "log": log,
                "seeder": {
                    "drop_dir": str(self.drop_dir),
                    "publish_dir": str(self.publish_dir),
                    "state_dir": str(self.seeder_dir / "state"),
                    "http_listen": f"127.0.0.1:{self.seeder_http_port}",
                    "trackers": [f"{self.tracker_url}/announce"],
                    "token_file": str(self.token_file),
                    "listen_interfaces": f"127.0.0.1:{free_port()}",
                    **(seeder or {}),
                },
            },
        )
        self.peer_dirs = []
        self.peer_configs = []
        self.peer_hosts = [
            f"127.0.0.{PEER_ADDRESS_BASE + index}" if peer_addresses else "127.0.0.1"
            for index in range(peers)
        ]
        for index, host in enumerate(self.peer_hosts):
            base = self.root / f"peer{index + 1}"
            self.peer_dirs.append(base)
            self.peer_configs.append(
                write_peer_config(
                    base,
                    log,
                    f"{host}:{free_port(host)}",
                    f"{self.seeder_url}/index.json" if follow else "",
                    **{"linger_seconds": 5, **(peer or {})},
                )
            )
        self.tracker = Daemon("tracker", self.tracker_config, self.root / "tracker")
        self.seeder = Daemon("seeder", self.seeder_config, self.seeder_dir)
        self.peers = [Daemon("peer", c, d) for c, d in zip(self.peer_configs, self.peer_dirs)]

    @property
    def daemons(self) -> list[Daemon]:
        return [self.tracker, self.seeder, *self.peers]

    def start(self, timeout: float = 30.0) -> LocalFleet:
        for daemon in self.daemons:
            daemon.start(wait=False)
        for daemon in self.daemons:
            daemon.wait_message("READY=1", timeout)
        return self

    def close(self) -> None:
        for daemon in self.daemons:
            try:
                daemon.stop(timeout=20)
            except AssertionError:
                pass
            daemon.close()

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def drop(self, source: Path, name: str | None = None) -> Path:
        """Place a deploy in the seeder's drop dir the safe way: copy to .part, rename."""
        name = name or source.name
        tmp = self.drop_dir / f"{name}.part"
        shutil.copyfile(source, tmp)
        target = self.drop_dir / name
        os.replace(tmp, target)
        return target

    def peer_destination(self, index: int) -> Path:
        return self.peer_dirs[index] / "dest"

    def peer_drop(self, index: int) -> Path:
        return self.peer_dirs[index] / "drop"

    def peer_states(self, index: int) -> list[dict]:
        out = []
        for path in sorted((self.peer_dirs[index] / "state").glob("*.json")):
            try:
                out.append(fsutil.read_json(path))
            except (OSError, ValueError):
                pass  # being replaced right now: read it next time
        return out

    def torrent_for(self, name: str, timeout: float = 60.0) -> Path:
        path = self.publish_dir / f"{name}.torrent"
        wait_for(path.exists, timeout, what=f"{path} to be published")
        return path

    def distribute(self, name: str, timeout: float = 60.0) -> Path:
        """Hand the published torrent of name to every peer's drop dir (as an operator would)."""
        published = self.torrent_for(name, timeout)
        for index in range(len(self.peers)):
            tmp = self.peer_drop(index) / f"{name}.torrent.part"
            shutil.copyfile(published, tmp)
            os.replace(tmp, self.peer_drop(index) / f"{name}.torrent")
        return published

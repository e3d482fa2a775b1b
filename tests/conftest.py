"""Shared test helpers: free ports, configs, daemons started as real subprocesses.

Daemons report readiness over a real sd_notify socket (NOTIFY_SOCKET) that the test owns:
the test waits for READY=1 exactly as systemd would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll condition() until it returns something truthy; fail after timeout seconds."""
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


class Daemon:
    """One murderd daemon as a subprocess, with its own sd_notify socket."""

    def __init__(self, name: str, config: Path, workdir: Path, env: dict | None = None):
        self.name = name  # tracker, seeder or peer
        self.config = config
        self.workdir = workdir
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        self.notify_path = workdir / f"notify-{name}-{os.getpid()}-{id(self)}.sock"
        self.messages: list[str] = []
        self.sock: socket.socket | None = None

    @property
    def log_path(self) -> Path:
        from murderd import config

        return Path(config.load(self.config)["log"]["dir"]) / f"{self.name}.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, wait: bool = True, timeout: float = 30.0) -> Daemon:
        if self.sock is None:
            self.notify_path.unlink(missing_ok=True)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.bind(str(self.notify_path))
            self.sock.setblocking(False)
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), PYTHONUNBUFFERED="1")
        env.update(self.extra_env)
        self.messages.clear()
        self.stderr_path = self.workdir / f"{self.name}.stderr"
        self.proc = subprocess.Popen(
            [str(BIN / f"murder-{self.name}"), "--config", str(self.config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.stderr_path, "ab"),
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


@pytest.fixture
def daemons():
    """Start daemons with daemons(name, config, workdir); all are killed at teardown."""
    started: list[Daemon] = []

    def start(name, config, workdir, wait=True, env=None):
        daemon = Daemon(name, config, workdir, env)
        started.append(daemon)
        return daemon.start(wait=wait)

    yield start
    for daemon in started:
        daemon.close()

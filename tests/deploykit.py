"""Helpers of the deploy and fault tests: files, peer states, small filesystems, watching.

Everything waits on conditions (murderd.localfleet.wait_for), never on fixed sleeps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path

from murderd import torrent
from murderd.localfleet import wait_for

MiB = 1 << 20


def random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256(path: Path) -> str:
    return torrent.sha256_file(path)


def wait_placed(fleet, peer: int, name: str, want: str, timeout: float = 60, what: str = ""):
    """Wait until peer (0-based) has placed name; assert its sha256 is want.  Its path."""
    dest = fleet.peer_destination(peer) / name
    wait_for(dest.exists, timeout, what=what or f"peer{peer + 1} to place {name}")
    assert sha256(dest) == want
    return dest


def fetch_index(fleet, query: str = "", timeout: float = 10) -> dict:
    """The seeder's index.json (query: e.g. a long poll's ?after=G&wait=S)."""
    url = f"{fleet.seeder_url}/index.json{query}"
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def seeder_metric(fleet, name: str) -> float:
    """One value of the seeder's /metrics (-1.0 when it has none)."""
    with urllib.request.urlopen(f"{fleet.seeder_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else -1.0


def wait_followers(fleet, count: int) -> None:
    wait_for(
        lambda: seeder_metric(fleet, "murderd_seeder_followers") >= count,
        30,
        what=f"{count} peers to follow the seeder",
    )


def write_tree(root: Path, sizes: dict) -> dict:
    """Files of random bytes under root: {relpath: size} -> {relpath: bytes}."""
    out = {}
    for rel, size in sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        out[rel] = os.urandom(size)
        path.write_bytes(out[rel])
    return out


def state_of(fleet, peer: int, name: str) -> dict | None:
    states = [s for s in fleet.peer_states(peer) if s["name"] == name]
    return states[-1] if states else None


def wait_state(fleet, peer: int, name: str, states, timeout: float, what: str = "") -> dict:
    """Wait until peer's deploy of name is in one of states; its state record."""
    states = (states,) if isinstance(states, str) else tuple(states)

    def reached():
        state = state_of(fleet, peer, name)
        return state if state and state["state"] in states else None

    return wait_for(reached, timeout, interval=0.1, what=what or f"peer{peer + 1} {name} {states}")


def wait_progress(fleet, peer: int, name: str, at_least: float, timeout: float) -> dict:
    def reached():
        state = state_of(fleet, peer, name)
        return state if state and state["progress"] >= at_least else None

    return wait_for(reached, timeout, interval=0.1, what=f"peer{peer + 1} {name} at {at_least}")


def give(fleet, peer: int, name: str) -> None:
    """Hand the published torrent of name to one peer's drop dir (temp name, then rename)."""
    published = fleet.torrent_for(name)
    drop = fleet.peer_drop(peer)
    tmp = drop / f"{name}.torrent.part"
    shutil.copyfile(published, tmp)
    os.replace(tmp, drop / f"{name}.torrent")


def peer_config_replace(fleet, peer: int, old: str, new: str) -> None:
    config = fleet.peer_configs[peer]
    text = config.read_text()
    assert old in text, f"{old!r} not in {config}"
    config.write_text(text.replace(old, new))


def set_peer_key(fleet, peer: int, key: str, value) -> None:
    """Change one [peer] key of one peer's config file (before start or before a SIGHUP)."""
    config = fleet.peer_configs[peer]
    lines = config.read_text().splitlines()
    out = [f"{key} = {value}" if line.split("=")[0].strip() == key else line for line in lines]
    if out == lines and not any(line.split("=")[0].strip() == key for line in lines):
        out.insert(out.index("[peer]") + 1, f"{key} = {value}")
    config.write_text("\n".join(out) + "\n")


@contextlib.contextmanager
def small_filesystem(path: Path, size_mib: int):
    """A tmpfs of size_mib at path (root only), unmounted on exit even after a failure."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(path)],
        check=True,
    )
    try:
        yield path
    finally:
        # Lazy: a daemon that outlived a failed test must not leave the mount behind.
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path, leave: int = 0) -> Path:
    """Write a ballast file until the filesystem has at most `leave` bytes free."""
    ballast = directory / "ballast"
    chunk = b"\0" * MiB
    with open(ballast, "wb") as out:
        while True:
            st = os.statvfs(directory)
            free = st.f_bavail * st.f_frsize - leave
            if free <= 0:
                break
            try:
                out.write(chunk[: min(len(chunk), free)])
                out.flush()
            except OSError:
                break
    return ballast


class DestinationWatcher:
    """Scan a destination directory in a thread; remember any file seen at a wrong size.

    Finished deploys appear only complete (hidden .murderd-* temporaries are skipped).
    """

    def __init__(self, directory: Path, sizes: dict):
        self.directory = directory
        self.sizes = sizes  # name -> expected size
        self.partial: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                entries = list(self.directory.iterdir())
            except FileNotFoundError:
                entries = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    got = entry.stat().st_size
                except FileNotFoundError:
                    continue
                if entry.name not in self.sizes or got != self.sizes[entry.name]:
                    self.partial.append((entry.name, got))
            self._stop.wait(0.01)

    def __enter__(self) -> DestinationWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

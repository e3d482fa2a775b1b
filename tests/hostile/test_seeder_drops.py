"""What lands in the seeder's drop dir is not always a finished regular file: symlinks, FIFOs,
files deleted while being hashed, files still being written.  Each gets a clear log line;
the seeder never crashes, never blocks, and never publishes a torrent of a half file."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from murderd import torrent
from murderd.localfleet import wait_for


@pytest.fixture
def seeder(fleet_factory):
    return fleet_factory(0).start()


def published(fleet) -> dict[str, torrent.Torrent]:
    out = {}
    for path in fleet.publish_dir.glob("*.torrent"):
        try:
            out[path.name] = torrent.load(path)
        except (OSError, torrent.TorrentError):
            pass  # being replaced
    return out


def log_has(fleet, text: str, timeout: float = 20) -> None:
    wait_for(lambda: text in fleet.seeder.log_text(), timeout, what=f"{text!r} in seeder.log")


def publish_a_good_one(fleet, tmp_path: Path, name: str) -> None:
    """The seeder still works: a proper file dropped after the hostile one is published."""
    (tmp_path / name).write_bytes(os.urandom(100_000))
    fleet.drop(tmp_path / name)
    fleet.torrent_for(name, timeout=20)


def test_symlinks_and_fifos_are_ignored_with_a_log_line(seeder, tmp_path):
    fleet = seeder
    secret = tmp_path / "secret"
    secret.write_text("not for the fleet\n")
    (fleet.drop_dir / "secret.bin").symlink_to(secret)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    os.replace(tmp_path / "dangling", fleet.drop_dir / "dangling.bin")  # moved in
    os.mkfifo(fleet.drop_dir / "pipe.bin")  # opening it would block the seeder forever
    log_has(fleet, "secret.bin in the drop dir: a symlink")
    log_has(fleet, "dangling.bin in the drop dir: a symlink")
    log_has(fleet, "pipe.bin in the drop dir: not a regular file")
    # Directories moved in with a symlink or a FIFO inside are refused whole.
    for kind in ("symlink", "fifo"):
        tree = tmp_path / f"tree-{kind}"
        (tree / "sub").mkdir(parents=True)
        (tree / "sub" / "ok.txt").write_text("ok")
        if kind == "symlink":
            (tree / "sub" / "passwd").symlink_to("/etc/passwd")
        else:
            os.mkfifo(tree / "sub" / "pipe")
        os.replace(tree, fleet.drop_dir / tree.name)
        log_has(fleet, f"deploy {tree.name}: cannot make a torrent")
    publish_a_good_one(fleet, tmp_path, "after.bin")
    assert sorted(published(fleet)) == ["after.bin.torrent"]
    assert fleet.seeder.proc.poll() is None
    assert "Traceback" not in fleet.seeder.log_text()


def test_a_file_deleted_while_being_hashed_is_not_published(seeder, tmp_path):
    fleet = seeder
    big = tmp_path / "huge.bin"
    with open(big, "wb") as handle:
        handle.truncate(1 << 30)  # sparse: a second or so of hashing, no disk used
    os.replace(big, fleet.drop_dir / "huge.bin")
    log_has(fleet, "deploy huge.bin: hashing")
    (fleet.drop_dir / "huge.bin").unlink()
    log_has(fleet, "deploy huge.bin: deleted or moved away while being hashed: not published")
    publish_a_good_one(fleet, tmp_path, "after.bin")
    assert "huge.bin.torrent" not in published(fleet)
    assert fleet.seeder.proc.poll() is None
    assert "Traceback" not in fleet.seeder.log_text()


class Appender(threading.Thread):
    """Appends to a file in the drop dir, keeping it open, until it reaches size."""

    def __init__(self, path: Path, size: int, chunk: int = 64 << 10):
        super().__init__(daemon=True)
        self.path, self.size, self.chunk = path, size, chunk
        self.digest = hashlib.sha256()
        self.written = 0
        self.done = threading.Event()

    def run(self) -> None:
        with open(self.path, "wb") as out:
            while self.written < self.size:
                block = os.urandom(self.chunk)
                out.write(block)
                out.flush()
                self.digest.update(block)
                self.written += len(block)
                time.sleep(0.001)  # a writer paced like a network copy, not a condition
        self.done.set()


def test_a_file_still_growing_is_published_only_complete(seeder, tmp_path):
    fleet = seeder
    path = fleet.drop_dir / "growing.bin"
    size = 64 << 20
    seen_sizes: set[int] = set()
    stop = threading.Event()

    def watch_published():
        while not stop.is_set():
            for parsed in published(fleet).values():
                seen_sizes.add(parsed.total_size)
            stop.wait(0.01)

    watcher = threading.Thread(target=watch_published, daemon=True)
    watcher.start()
    writer = Appender(path, size)
    writer.start()
    try:
        wait_for(lambda: writer.written >= 16 << 20, 30, what="the file to grow")
        open(path, "ab").close()  # another writer's close: the seeder starts hashing now
        log_has(fleet, "growing.bin: changed while being hashed")
        assert writer.done.wait(60)
        torrent_path = fleet.torrent_for("growing.bin", timeout=30)
    finally:
        stop.set()
        watcher.join(5)
    final = torrent.load(torrent_path)
    assert final.total_size == size
    assert final.files[0].sha256 == writer.digest.hexdigest()
    assert seen_sizes <= {size}, f"a torrent of a half file was published: {seen_sizes}"
    log = fleet.seeder.log_text()
    # One line per change seen, not a hash loop for as long as the writer writes.
    assert log.count("changed while being hashed") <= 3, log.count("changed while being hashed")
    assert "Traceback" not in log

"""Drop-directory watcher: reports settled entries only.

A file counts once it is closed after writing (IN_CLOSE_WRITE) or moved in (IN_MOVED_TO);
a directory counts when it is moved in.  Dotfiles and temporary suffixes are ignored, and
so is anything in subdirectories (e.g. ``rejected/``).  Entries already present at start
are reported too.  Symlinks and special files (FIFOs, sockets, devices) are reported to
``on_refused`` so the daemon can log them: they are never opened.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path
from typing import Callable

import pyinotify

log = logging.getLogger(__name__)

MASK = (
    pyinotify.IN_CLOSE_WRITE
    | pyinotify.IN_MOVED_TO
    | pyinotify.IN_MOVED_FROM
    | pyinotify.IN_DELETE
    | pyinotify.IN_CREATE
    | pyinotify.IN_Q_OVERFLOW
)


class DropWatcher:
    def __init__(
        self,
        directory: str | os.PathLike,
        on_ready: Callable[[Path], None],
        on_gone: Callable[[Path], None] | None = None,
        on_refused: Callable[[Path, str], None] | None = None,
        ignore_suffixes: tuple = (".part", ".tmp", ".swp"),
        suffixes: tuple | None = None,
    ):
        self.directory = Path(directory)
        self.on_ready = on_ready
        self.on_gone = on_gone
        self.on_refused = on_refused
        self.ignore_suffixes = tuple(ignore_suffixes)
        self.suffixes = tuple(suffixes) if suffixes else None  # only these (e.g. .torrent)
        self._wm: pyinotify.WatchManager | None = None
        self._notifier = None

    def wanted(self, name: str) -> bool:
        if name.startswith(".") or name.endswith(self.ignore_suffixes):
            return False
        return self.suffixes is None or name.endswith(self.suffixes)

    def start(self) -> None:
        """Set the watch (raises OSError if the directory is unusable), then scan."""
        if not self.directory.is_dir():
            raise FileNotFoundError(f"drop directory {self.directory} does not exist")
        self._wm = pyinotify.WatchManager()
        result = self._wm.add_watch(str(self.directory), MASK, quiet=False)
        if result.get(str(self.directory), -1) < 0:
            raise OSError(f"cannot watch {self.directory}")
        self._notifier = pyinotify.AsyncioNotifier(
            self._wm, asyncio.get_running_loop(), default_proc_fun=self._event
        )
        self.scan()

    def scan(self) -> None:
        """Report every settled entry now present (start-up, and after a queue overflow)."""
        for entry in sorted(os.listdir(self.directory)):
            self._consider(self.directory / entry, moved_in=True)

    def stop(self) -> None:
        if self._notifier is not None:
            self._notifier.stop()
            self._notifier = None

    def _consider(self, path: Path, moved_in: bool) -> None:
        if not self.wanted(path.name):
            return
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        if stat.S_ISREG(st.st_mode) or (moved_in and stat.S_ISDIR(st.st_mode)):
            self.on_ready(path)
        elif stat.S_ISDIR(st.st_mode):
            return  # a directory being filled in place: only a moved-in directory counts
        elif self.on_refused:
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            self.on_refused(path, kind)

    def _event(self, event: pyinotify.Event) -> None:
        try:
            if event.mask & pyinotify.IN_Q_OVERFLOW:
                log.warning("inotify queue overflowed on %s: rescanning", self.directory)
                self.scan()
                return
            path = Path(event.pathname)
            if path.parent != self.directory:
                return
            if event.mask & (pyinotify.IN_DELETE | pyinotify.IN_MOVED_FROM):
                if self.on_gone and self.wanted(path.name):
                    self.on_gone(path)
            elif event.mask & (pyinotify.IN_CLOSE_WRITE | pyinotify.IN_MOVED_TO):
                self._consider(path, moved_in=bool(event.mask & pyinotify.IN_MOVED_TO))
            elif event.mask & pyinotify.IN_CREATE:
                # Regular files wait for their close; symlinks, FIFOs etc. never close-write.
                try:
                    mode = path.lstat().st_mode
                except FileNotFoundError:
                    return
                if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    self._consider(path, moved_in=False)
        except Exception:
            log.exception("error handling inotify event %s", event)

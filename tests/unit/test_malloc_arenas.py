"""runtime.cap_malloc_arenas: the call reaches glibc's mallopt (what the cap is worth, the peer's
RSS fetching 2 GiB, is measured by bench/peermem.py, not here)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_arena_cap():
    # In a fresh interpreter, as a daemon starts: before any thread of its own.
    code = "from murderd import runtime; print(runtime.cap_malloc_arenas())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"

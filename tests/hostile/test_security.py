"""Security: the registration token (private file, constant-time comparison), /stats and
/metrics limited to [tracker] stats_networks, no daemon running as root unless allowed."""

from __future__ import annotations

import asyncio
import hmac
import http.client
import subprocess

import aiohttp
import pytest

from murderd import config, fsutil
from murderd.localfleet import BIN, Daemon, LocalFleet, free_port, write_config
from murderd.torrent import make_torrent
from murderd.tracker.daemon import TrackerService

TOKEN = "k" * 40


def tracker_sections(tmp_path, **tracker) -> dict:
    token = tmp_path / "token"
    fsutil.atomic_write(token, TOKEN.encode(), mode=0o600)
    values = {
        "listen": f"127.0.0.1:{free_port()}",
        "torrents_dir": str(tmp_path / "torrents"),
        "state_dir": str(tmp_path / "state"),
        "token_file": str(token),
    }
    values.update(tracker)
    return {"tracker": values}


def test_registration_token_is_compared_in_constant_time(tmp_path, monkeypatch):
    """The real tracker service, in-process, over real HTTP: every token check goes through
    hmac.compare_digest (recorded on its way through; a timing test could not tell a 40-byte
    comparison apart over HTTP)."""
    seen = []
    real = hmac.compare_digest

    def recording(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    cfg = config.load(write_config(tmp_path, tracker_sections(tmp_path)))
    (tmp_path / "app.bin").write_bytes(b"x" * 50_000)
    data = make_torrent(tmp_path / "app.bin", ["http://127.0.0.1:1/announce"]).data
    url = f"http://{cfg['tracker']['listen']}/register"

    async def scenario():
        service = TrackerService(cfg)
        await service.start()
        try:
            async with aiohttp.ClientSession() as client:
                out = []
                for auth in (None, "Bearer wrong", "Bearer " + TOKEN[:-1], "Bearer " + TOKEN):
                    headers = {"Authorization": auth} if auth else {}
                    async with client.post(url, data=data, headers=headers) as resp:
                        out.append(resp.status)
                return out
        finally:
            await service.stop()

    statuses = asyncio.run(scenario())
    assert statuses == [401, 401, 401, 200]
    given = [a for a, b in seen if b == TOKEN.encode()]
    # (no header at all: nothing to compare)
    assert given == [b"wrong", TOKEN[:-1].encode(), TOKEN.encode()]


@pytest.mark.parametrize("role", ["tracker", "seeder"])
def test_a_world_readable_token_file_is_refused_naming_it(tmp_path, role):
    fleet = LocalFleet(tmp_path / "fleet", 0)
    fleet.token_file.chmod(0o644)
    daemon = fleet.tracker if role == "tracker" else fleet.seeder
    try:
        daemon.start(wait=False)
        assert daemon.proc.wait(30) == 1
        log = daemon.log_text()
        assert f"token_file {fleet.token_file} is readable or writable by everyone" in log
        assert "chmod 600" in log and "Traceback" not in log
        # Group-readable (the murderd group) is fine.
        fleet.token_file.chmod(0o640)
        daemon.start()
    finally:
        fleet.close()


def get(host: str, port: int, path: str, headers=None) -> int:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.parametrize(
    "networks, v4, v6",
    [("127.0.0.0/8", 200, 403), ("::1/128", 403, 200), ("10.0.0.0/8", 403, 403), ("", 200, 200)],
)
def test_stats_and_metrics_only_from_stats_networks(tmp_path, networks, v4, v6):
    """A dual-stack tracker: IPv4 clients arrive as ::ffff:127.0.0.1 and still count as
    127.0.0.1; a forged X-Forwarded-For changes nothing; announces and /healthz stay open."""
    port = free_port()
    sections = tracker_sections(
        tmp_path, listen=f"[::]:{port}", stats_networks=networks + ("," if networks else "")
    )
    if not networks:
        del sections["tracker"]["stats_networks"]
    tracker = Daemon("tracker", write_config(tmp_path, sections), tmp_path).start()
    try:
        for path in ("/stats", "/metrics"):
            assert get("127.0.0.1", port, path) == v4, (path, "127.0.0.1")
            assert get("::1", port, path) == v6, (path, "::1")
            forged = {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "::1"}
            assert get("::1", port, path, forged) == v6
            assert get("127.0.0.1", port, path, forged) == v4
        for host in ("127.0.0.1", "::1"):
            assert get(host, port, "/healthz") == 200
            assert get(host, port, "/announce?info_hash=x") == 200  # a failure reason, not 403
    finally:
        tracker.close()


@pytest.mark.parametrize("role", ["tracker", "seeder", "peer"])
def test_daemons_refuse_root_unless_allowed(tmp_path, role):
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to see the refusal")
    path = tmp_path / "murderd.conf"
    path.write_text(f"[log]\ndir = {tmp_path}/log\n")
    proc = subprocess.run(
        [str(BIN / f"murder-{role}"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == config.EX_CONFIG
    assert "refusing to run as root" in proc.stderr and "allow_root" in proc.stderr
    assert not (tmp_path / "log").exists()  # refused before touching anything

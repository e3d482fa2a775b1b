"""murderctl against a real fleet on loopback: publish, fetch, wait, status, list, verify.

murderctl runs as a subprocess with its output going to a pipe, so these tests also pin the
plain-line output (no terminal: no tables drawn, no bars redrawn).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.request
from pathlib import Path

from murderd import torrent
from murderd.localfleet import BIN, free_port, wait_for

MiB = 1 << 20
MURDERCTL = str(BIN / "murderctl")


def ctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MURDERCTL, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def tracker_deploys(fleet) -> list[dict]:
    with urllib.request.urlopen(f"{fleet.tracker_url}/stats", timeout=10) as resp:
        return json.load(resp)["deploys"]


def test_publish_fetch_wait_status_list_verify(fleet_factory, tmp_path):
    fleet = fleet_factory(2).start()
    name = "app-1.0.tar.gz"
    source = tmp_path / name
    want = random_file(source, 4 * MiB)

    # publish: the file lands in the drop dir whole, and the command prints the torrent URL.
    result = ctl("publish", str(source), "--config", str(fleet.seeder_config))
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip()
    assert url == f"{fleet.seeder_url}/torrents/{name}.torrent"
    assert torrent.sha256_file(fleet.drop_dir / name) == want
    assert [p.name for p in fleet.drop_dir.iterdir()] == [name], "temporary file left behind"
    with urllib.request.urlopen(url, timeout=10) as resp:
        data = resp.read()
    parsed = torrent.parse(data)
    torrent_file = tmp_path / f"{name}.torrent"
    torrent_file.write_bytes(data)

    # publish returned once the tracker knew the deploy: status sees it, no host done yet.
    result = ctl("status", "--json", "--tracker", fleet.tracker_url)
    assert result.returncode == 0, result.stderr
    [deploy] = json.loads(result.stdout)["deploys"]
    assert deploy["name"] == name and deploy["info_hash"] == parsed.info_hash
    assert (deploy["hosts_done"], deploy["size"]) == (0, parsed.total_size)
    assert 0 <= deploy["age"] < 60

    # A pipeline's wait, running while the hosts fetch.
    waiter = subprocess.Popen(
        [MURDERCTL, "wait", name, "--hosts", "2", "--timeout", "60"]
        + ["--tracker", fleet.tracker_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # fetch by URL, with the peer's dirs from its config.
        result = ctl("fetch", url, "--config", str(fleet.peer_configs[0]))
        assert result.returncode == 0, result.stderr
        placed = fleet.peer_destination(0) / name
        assert f"placed {placed}" in result.stdout
        assert f"sha256 {want}  {name}" in result.stdout
        assert torrent.sha256_file(placed) == want
        assert f"{name}:" in result.stdout  # the plain progress lines

        wait_for(
            lambda: tracker_deploys(fleet)[0]["completed"] == 1, 30, what="first host completed"
        )
        assert waiter.poll() is None, "wait returned with 1 of 2 hosts done"

        # fetch a .torrent file, with the peer's dirs given as options.
        result = ctl(
            "fetch",
            str(torrent_file),
            "--drop-dir",
            str(fleet.peer_drop(1)),
            "--state-dir",
            str(fleet.peer_dirs[1] / "state"),
        )
        assert result.returncode == 0, result.stderr
        assert torrent.sha256_file(fleet.peer_destination(1) / name) == want

        out, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 0, err
        assert f"{name}: 2 hosts completed (2 wanted)" in out
        assert "1/2 hosts done" in out or "0/2 hosts done" in out  # it showed progress
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()

    # Fetching what is already placed returns at once.
    result = ctl("fetch", str(torrent_file), "--config", str(fleet.peer_configs[0]))
    assert result.returncode == 0, result.stderr
    assert f"placed {placed}" in result.stdout

    # status of one deploy, by name (plain lines) and by info-hash (JSON).
    result = ctl("status", name, "--tracker", fleet.tracker_url)
    assert result.returncode == 0, result.stderr
    assert "hosts: 2 done of 2" in result.stdout
    assert "seeder" in result.stdout and "HOST" in result.stdout
    result = ctl("status", parsed.info_hash, "--json", "--tracker", fleet.tracker_url)
    assert result.returncode == 0, result.stderr
    one = json.loads(result.stdout)
    assert one["hosts_done"] == 2 and one["name"] == name
    seeder_ids = [p for p in one["peers"] if bytes.fromhex(p["peer_id"]).startswith(b"-MS")]
    assert len(seeder_ids) == 1 and seeder_ids[0]["state"] == "seeding"

    # list: this host's deploys from the peer's state dir.
    result = ctl("list", "--json", "--config", str(fleet.peer_configs[0]))
    assert result.returncode == 0, result.stderr
    [mine] = json.loads(result.stdout)["deploys"]
    assert mine["info_hash"] == parsed.info_hash
    assert mine["state"] in ("seeding", "done") and mine["progress"] == 1.0
    assert mine["sha256"] == {name: want}
    result = ctl("list", "--config", str(fleet.peer_configs[1]))
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == ["DEPLOY", "STATE", "PROGRESS", "SIZE", "SHA256", "INFO-HASH"]
    assert row.split()[0] == name and want in row and parsed.info_hash in row

    # verify: the placed copy matches; a corrupted one does not.
    result = ctl("verify", str(placed), str(torrent_file))
    assert result.returncode == 0 and result.stdout.startswith("OK"), result.stdout
    corrupt = tmp_path / "corrupt" / name
    corrupt.parent.mkdir()
    blob = bytearray(placed.read_bytes())
    blob[MiB] ^= 0xFF
    corrupt.write_bytes(bytes(blob))
    result = ctl("verify", str(corrupt), str(torrent_file))
    assert result.returncode == 1 and "FAIL" in result.stdout


def test_wait_timeout_and_errors(fleet_factory, tmp_path):
    fleet = fleet_factory(1).start()
    name = "svc-2.0.bin"
    random_file(tmp_path / name, 1 * MiB)
    fleet.drop(tmp_path / name)
    wait_for(lambda: tracker_deploys(fleet), 30, what="the tracker to know the deploy")
    tracker = ["--tracker", fleet.tracker_url]

    # Nobody fetches it: the timeout exit.
    result = ctl("wait", name, "--hosts", "1", "--timeout", "1", *tracker)
    assert result.returncode == 1, result.stderr
    assert f"timed out after 1s: 0 of 1 hosts completed {name}" in result.stderr

    # Errors: exit 2 with a message.
    result = ctl("wait", "no-such-deploy", "--hosts", "1", *tracker)
    assert result.returncode == 2
    assert "unknown deploy 'no-such-deploy'" in result.stderr and name in result.stderr
    result = ctl("wait", os.urandom(20).hex(), "--hosts", "1", *tracker)
    assert result.returncode == 2 and "not known to the tracker" in result.stderr
    unreachable = f"http://127.0.0.1:{free_port()}"
    result = ctl("wait", name, "--hosts", "1", "--tracker", unreachable)
    assert result.returncode == 2 and "cannot reach" in result.stderr
    result = ctl("wait", name, "--hosts", "0", *tracker)
    assert result.returncode == 2 and "--hosts" in result.stderr
    result = ctl("status", "--tracker", unreachable)
    assert result.returncode == 2 and "cannot reach" in result.stderr

    # publish: a missing file; an unreachable seeder (nothing is dropped then).
    result = ctl("publish", str(tmp_path / "missing"), "--config", str(fleet.seeder_config))
    assert result.returncode == 2 and "no such file" in result.stderr
    other = tmp_path / "other.bin"
    random_file(other, 1000)
    result = ctl("publish", str(other), "--drop-dir", str(fleet.drop_dir), "--seeder", unreachable)
    assert result.returncode == 2 and "cannot reach" in result.stderr
    assert not (fleet.drop_dir / "other.bin").exists()

    # fetch: not a torrent (exit 2); a deploy nobody seeds (timeout, exit 1).
    (tmp_path / "junk.torrent").write_bytes(b"not bencoded")
    result = ctl("fetch", str(tmp_path / "junk.torrent"), "--config", str(fleet.peer_configs[0]))
    assert result.returncode == 2 and "not a valid torrent" in result.stderr
    orphan = tmp_path / "orphan.bin"
    random_file(orphan, 100_000)
    made = torrent.make_torrent(orphan, [f"{fleet.tracker_url}/announce"])
    (tmp_path / "orphan.torrent").write_bytes(made.data)
    result = ctl(
        "fetch",
        str(tmp_path / "orphan.torrent"),
        "--timeout",
        "2",
        "--config",
        str(fleet.peer_configs[0]),
    )
    assert result.returncode == 1, result.stderr
    assert "timed out after 2s: orphan.bin is downloading" in result.stderr

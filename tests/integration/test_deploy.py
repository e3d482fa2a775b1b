"""The Murder workflow end to end: real tracker, seeder and peers as subprocesses, loopback."""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import signal
import subprocess
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from deploykit import (
    DestinationWatcher,
    MiB,
    fetch_index,
    random_file,
    sha256,
    state_of,
    wait_placed,
)

from murderd import torrent
from murderd.localfleet import wait_for


def index(fleet) -> list[dict]:
    with urllib.request.urlopen(f"{fleet.seeder_url}/index.json", timeout=10) as resp:
        return json.load(resp)["deploys"]


def test_six_peers_feed_each_other(fleet_factory, tmp_path):
    """64 MiB to 6 peers with the seeder capped: identical copies; peers fed each other."""
    size = 64 * MiB
    fleet = fleet_factory(6, seeder={"upload_rate_limit": 12 * MiB}, follow=True).start()
    want = random_file(tmp_path / "app-1.0.bin", size)
    fleet.drop(tmp_path / "app-1.0.bin")
    for peer in range(6):
        dest = fleet.peer_destination(peer) / "app-1.0.bin"
        wait_for(dest.exists, 120, what=f"peer{peer + 1} to place the file")
    for peer in range(6):
        assert sha256(fleet.peer_destination(peer) / "app-1.0.bin") == want
        state = state_of(fleet, peer, "app-1.0.bin")
        assert state["sha256"] == {"app-1.0.bin": want}
    uploaded = index(fleet)[0]["uploaded"]
    from_peers = sum(state_of(fleet, p, "app-1.0.bin")["bytes_from_peers"] for p in range(6))
    # With its upload capped far below what the peers can take, the seeder alone would need
    # to send 6 copies; the swarm must have moved most of it between the peers.
    assert uploaded < 6 * size, f"seeder uploaded {uploaded / size:.2f} copies"
    assert from_peers > size, f"peers fed each other only {from_peers} bytes"
    # Every peer keeps seeding for linger_seconds, then stops the torrent and keeps the file.
    wait_for(
        lambda: all(state_of(fleet, p, "app-1.0.bin")["state"] == "done" for p in range(6)),
        90,
        what="peers to finish lingering",
    )
    assert all((fleet.peer_destination(p) / "app-1.0.bin").exists() for p in range(6))


def test_url_drop_replace_and_delete(fleet_factory, tmp_path):
    """.url drop; a replaced file is a new deploy; a deleted file is unpublished."""
    fleet = fleet_factory(1).start()
    first = random_file(tmp_path / "conf.bin", 3 * MiB)
    fleet.drop(tmp_path / "conf.bin")
    wait_for(lambda: index(fleet), 30, what="deploy in index.json")
    url = index(fleet)[0]["url"]
    (fleet.peer_drop(0) / "conf.url.part").write_text(url + "\n")
    os.replace(fleet.peer_drop(0) / "conf.url.part", fleet.peer_drop(0) / "conf.url")
    dest = fleet.peer_destination(0) / "conf.bin"
    wait_for(lambda: dest.exists() and sha256(dest) == first, 60, what="first version placed")
    old_hash = index(fleet)[0]["info_hash"]

    second = random_file(tmp_path / "conf.bin", 3 * MiB)
    fleet.drop(tmp_path / "conf.bin")
    wait_for(
        lambda: index(fleet) and index(fleet)[0]["info_hash"] != old_hash, 30, what="new deploy"
    )
    assert len(index(fleet)) == 1
    fleet.distribute("conf.bin")
    wait_for(lambda: sha256(dest) == second, 60, what="second version replaced the first")

    (fleet.drop_dir / "conf.bin").unlink()
    wait_for(lambda: index(fleet) == [], 30, what="deploy unpublished")
    assert not (fleet.publish_dir / "conf.bin.torrent").exists()


def test_follow_mode(fleet_factory, tmp_path):
    fleet = fleet_factory(2, follow=True).start()
    want = random_file(tmp_path / "svc-2.3.bin", 2 * MiB)
    fleet.drop(tmp_path / "svc-2.3.bin")
    for peer in range(2):
        wait_placed(fleet, peer, "svc-2.3.bin", want, what=f"peer{peer + 1} to follow the deploy")


def test_follow_long_polls_the_seeder(fleet_factory, tmp_path):
    """With follow_interval at 10 minutes, only the long poll can bring the second deploy."""
    fleet = fleet_factory(1, follow=True, peer={"follow_interval": 600}).start()
    for name in ("svc-1.0.bin", "svc-1.1.bin"):
        want = random_file(tmp_path / name, MiB)
        fleet.drop(tmp_path / name)
        wait_placed(fleet, 0, name, want, what=f"the peer to follow {name}")


def test_follow_retries_soon_after_the_seeder_was_down(fleet_factory, tmp_path):
    """A failed follow fetch is retried after 0.25, 0.5, 1 ... s, not after follow_interval."""
    fleet = fleet_factory(1, follow=True, peer={"follow_interval": 600}).start()
    assert fleet.seeder.stop(timeout=20) == 0
    wait_for(
        lambda: "WARNING murderd.follow: follow" in fleet.peers[0].log_text(),
        30,
        what="the follow fetch to fail",
    )
    fleet.seeder.start()
    want = random_file(tmp_path / "svc-2.0.bin", MiB)
    fleet.drop(tmp_path / "svc-2.0.bin")
    wait_placed(fleet, 0, "svc-2.0.bin", want, what="the peer to follow it after the restart")


def test_index_json_long_poll(fleet_factory, tmp_path):
    fleet = fleet_factory(0).start()
    first = fetch_index(fleet)
    generation = first["generation"]
    assert first["deploys"] == []
    # Unchanged: held for wait= seconds, then the same generation.
    assert fetch_index(fleet, f"?after={generation}&wait=0.2")["generation"] == generation
    # Parameters it cannot use: answered at once, like a plain file.
    for query in ("?after=other-0&wait=30", f"?after={generation}&wait=abc", "?wait=30"):
        assert fetch_index(fleet, query, timeout=10)["deploys"] == []
    # A deploy published while a request waits: answered with it and a new generation.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(fetch_index, fleet, f"?after={generation}&wait=50", 60)
        random_file(tmp_path / "lib-3.0.bin", MiB)
        fleet.drop(tmp_path / "lib-3.0.bin")
        answer = held.result(timeout=60)
    assert answer["generation"] != generation
    assert [d["name"] for d in answer["deploys"]] == ["lib-3.0.bin"]
    # A request held when the seeder stops is answered at once (503: "try again soon", not
    # an unchanged index), and the stop is not held up.
    generation = answer["generation"]
    port = int(fleet.seeder_url.rsplit(":", 1)[1])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(fetch_index, fleet, f"?after={generation}&wait=50", 60)
        wait_for(lambda: connections_to(port), 10, what="the held request's connection")
        assert fleet.seeder.stop(timeout=20) == 0
        with pytest.raises(urllib.error.HTTPError) as refused:
            held.result(timeout=30)
        assert refused.value.code == 503


def connections_to(port: int) -> int:
    """Established TCP connections to a local port (ss, from iproute2)."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return len(out.splitlines())


def _hostile_torrent(tmp_path: Path, name: bytes, files=None) -> bytes:
    """A torrent whose info dict is rewritten after libtorrent made it (libtorrent refuses
    to make hostile ones); bencoded by libtorrent."""
    from murderd.lt import bdecode, bencode

    (tmp_path / "x.bin").write_bytes(b"x" * 40000)
    made = torrent.make_torrent(tmp_path / "x.bin", ["http://127.0.0.1:1/announce"])
    top = bdecode(made.data)
    top[b"info"][b"name"] = name
    if files is not None:
        del top[b"info"][b"length"]
        del top[b"info"][b"sha256"]
        top[b"info"][b"files"] = files
    return bencode(top)


def test_hostile_torrents_rejected_daemon_alive(fleet_factory, tmp_path):
    fleet = fleet_factory(1, peer={"max_deploy_bytes": 100 * MiB}).start()
    drop = fleet.peer_drop(0)
    cases = {
        "traversal.torrent": _hostile_torrent(tmp_path, b"..", None),
        "nested.torrent": _hostile_torrent(
            tmp_path, b"ok", [{b"length": 40000, b"path": [b"..", b"..", b"etc", b"passwd"]}]
        ),
        "absolute.torrent": _hostile_torrent(
            tmp_path, b"ok", [{b"length": 40000, b"path": [b"/etc/passwd"]}]
        ),
        "control.torrent": _hostile_torrent(tmp_path, b"evil\x1b[2Jname", None),
        "garbage.torrent": b"d4:infod4:name",
        "oversized.torrent": _hostile_torrent(
            tmp_path, b"big", [{b"length": 200 * MiB, b"path": [b"big.bin"]}]
        ),
    }
    for name, data in cases.items():
        (drop / name).write_bytes(data)
    rejected = drop / "rejected"
    for name in cases:
        wait_for((rejected / f"{name}.reason").exists, 30, what=f"{name} to be rejected")
        assert (rejected / name).exists()
        assert (rejected / f"{name}.reason").read_text().strip()
    assert (
        "absolute" in (rejected / "absolute.torrent.reason").read_text()
        or "separator" in (rejected / "absolute.torrent.reason").read_text()
    )
    assert "cap" in (rejected / "oversized.torrent.reason").read_text()
    assert not any(fleet.peer_destination(0).iterdir()), "nothing may be written"
    assert not any((fleet.peer_dirs[0] / "staging").iterdir())
    # ... and the daemon still serves a good deploy.
    fleet.peers[0].wait_message("READY=1", 1)
    want = random_file(tmp_path / "good.bin", MiB)
    fleet.drop(tmp_path / "good.bin")
    fleet.distribute("good.bin")
    wait_placed(fleet, 0, "good.bin", want, what="a good deploy after hostile ones")


def test_symlink_in_destination_refused(fleet_factory, tmp_path):
    fleet = fleet_factory(1).start()
    random_file(tmp_path / "link.bin", MiB)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere" / "target", fleet.peer_destination(0) / "link.bin")
    fleet.drop(tmp_path / "link.bin")
    fleet.distribute("link.bin")
    reason = fleet.peer_drop(0) / "rejected" / "link.bin.torrent.reason"
    wait_for(reason.exists, 30, what="rejection")
    assert "symlink" in reason.read_text()
    assert not (tmp_path / "elsewhere" / "target").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_not_enough_space_refused(fleet_factory, tmp_path):
    fleet = fleet_factory(1)
    small = fleet.peer_dirs[0]
    (small / "vol").mkdir(parents=True)
    os.system(f"mount -t tmpfs -o size=8m tmpfs {small / 'vol'}")
    try:
        config = fleet.peer_configs[0]
        text = config.read_text()
        text = text.replace(str(small / "staging"), str(small / "vol" / "staging"))
        text = text.replace(str(small / "dest"), str(small / "vol" / "dest"))
        config.write_text(text)
        fleet.start()
        random_file(tmp_path / "huge.bin", 16 * MiB)
        fleet.drop(tmp_path / "huge.bin")
        fleet.distribute("huge.bin")
        reason = fleet.peer_drop(0) / "rejected" / "huge.bin.torrent.reason"
        wait_for(reason.exists, 30, what="refusal for lack of space")
        assert "not enough disk space" in reason.read_text()
        assert not any((small / "vol" / "dest").iterdir())
    finally:
        fleet.close()
        os.system(f"umount {small / 'vol'}")


def _tarball(path: Path, members: dict, evil: str | None = None) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if evil:
            info = tarfile.TarInfo(evil)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))


def test_hook_and_extract(fleet_factory, tmp_path):
    marker = tmp_path / "hook.out"
    hook = f"sh -c 'echo {{name}} {{infohash}} > {marker}; ls {{path}}'"
    fleet = fleet_factory(1, peer={"extract": True, "hook": hook}).start()
    _tarball(tmp_path / "web-1.0.tar.gz", {"web/index.html": b"<h1>hi</h1>", "web/app.js": b"1"})
    fleet.drop(tmp_path / "web-1.0.tar.gz")
    fleet.distribute("web-1.0.tar.gz")
    dest = fleet.peer_destination(0)
    wait_for((dest / "web-1.0" / "web" / "index.html").exists, 60, what="extracted tarball")
    assert (dest / "web-1.0.tar.gz").exists()
    assert (dest / "web-1.0" / "web" / "index.html").read_bytes() == b"<h1>hi</h1>"
    wait_for(marker.exists, 30, what="the hook to run")
    info_hash = index(fleet)[0]["info_hash"]
    assert marker.read_text().split() == ["web-1.0.tar.gz", info_hash]
    state = wait_for(
        lambda: (s := state_of(fleet, 0, "web-1.0.tar.gz")) and s["hook"] and s, 30, what="hook"
    )
    assert state["hook"]["exit"] == 0

    # A tarball with a member that escapes: refused, nothing written outside, deploy failed.
    _tarball(tmp_path / "bad-1.0.tar.gz", {"ok.txt": b"ok"}, evil="../../escaped.txt")
    fleet.drop(tmp_path / "bad-1.0.tar.gz")
    fleet.distribute("bad-1.0.tar.gz")
    wait_for(
        lambda: (s := state_of(fleet, 0, "bad-1.0.tar.gz")) and s["state"] == "failed",
        60,
        what="the escaping tarball to fail",
    )
    assert "escapes" in state_of(fleet, 0, "bad-1.0.tar.gz")["error"]
    assert not (dest / "bad-1.0").exists()
    assert not (dest.parent / "escaped.txt").exists()
    assert not list(dest.parent.glob("**/escaped.txt"))


def test_destination_never_partial_and_kill_resume(fleet_factory, tmp_path):
    """Watch the destination during a download; SIGKILL the peer half way; it resumes."""
    size = 48 * MiB
    fleet = fleet_factory(
        1,
        peer={"download_rate_limit": 4 * MiB, "resume_save_interval": 1},
    ).start()
    want = random_file(tmp_path / "big.bin", size)
    fleet.drop(tmp_path / "big.bin")
    fleet.distribute("big.bin")
    dest_dir = fleet.peer_destination(0)
    with DestinationWatcher(dest_dir, {"big.bin": size}) as watcher:
        wait_for(
            lambda: (s := state_of(fleet, 0, "big.bin")) and s["progress"] >= 0.4,
            60,
            what="40 % of the download",
        )
        # Let a resume-data save land after that mark, then kill without warning.  (Once
        # complete, the resume file is gone: the test then says so instead of proving nothing.)
        resume = next((fleet.peer_dirs[0] / "state").glob("*.resume"))
        mtime = resume.stat().st_mtime

        def saved_again() -> bool:
            try:
                return resume.stat().st_mtime > mtime
            except FileNotFoundError:
                raise AssertionError("the download completed before the kill") from None

        wait_for(saved_again, 10, what="a resume-data save")
        fleet.peers[0].proc.send_signal(signal.SIGKILL)
        fleet.peers[0].proc.wait(10)
        assert not (dest_dir / "big.bin").exists()
        fleet.peers[0].start()
        dest = dest_dir / "big.bin"
        wait_for(dest.exists, 60, what="the resumed download to complete")
    assert sha256(dest) == want
    assert watcher.partial == []
    state = state_of(fleet, 0, "big.bin")
    fetched_after_restart = state["bytes_from_seeder"] + state["bytes_from_peers"]
    assert fetched_after_restart < 0.7 * size, f"re-downloaded {fetched_after_restart} bytes"


def test_directory_moved_in_is_one_multi_file_deploy(fleet_factory, tmp_path):
    fleet = fleet_factory(1, follow=True).start()
    build = tmp_path / "site-4.1"
    (build / "static").mkdir(parents=True)
    sums = {}
    for rel, size in (("index.html", 1000), ("static/app.js", 300_000), ("static/x.css", 7)):
        sums[rel] = random_file(build / rel, size)
    os.rename(build, fleet.drop_dir / "site-4.1")  # a directory counts once moved in
    dest = fleet.peer_destination(0) / "site-4.1"
    wait_for(dest.is_dir, 60, what="the directory deploy to be placed")
    assert {p.relative_to(dest).as_posix(): sha256(p) for p in dest.rglob("*") if p.is_file()} == (
        sums
    )
    (deploy,) = index(fleet)
    assert deploy["name"] == "site-4.1" and deploy["size"] == 301_007


def test_seeder_restart_seeds_again_without_rehashing(fleet_factory, tmp_path):
    fleet = fleet_factory(1).start()
    random_file(tmp_path / "keep.bin", 2 * MiB)
    fleet.drop(tmp_path / "keep.bin")
    wait_for(lambda: index(fleet), 30, what="the deploy to be published")
    before = index(fleet)[0]
    assert fleet.seeder.stop() == 0
    fleet.seeder.start()
    assert index(fleet)[0]["info_hash"] == before["info_hash"]
    log = fleet.seeder.log_text()
    assert log.count("deploy keep.bin: hashing") == 1, "an unchanged file must not be rehashed"
    assert "restored without rehashing" in log
    # ...and it really seeds: a peer gets the file from the restarted seeder.
    fleet.distribute("keep.bin")
    wait_for((fleet.peer_destination(0) / "keep.bin").exists, 60, what="download after restart")


def test_retention_keeps_the_last_deploys_of_a_family(fleet_factory, tmp_path):
    fleet = fleet_factory(1, follow=True, peer={"keep_deploys": 2, "linger_seconds": 0}).start()
    dest = fleet.peer_destination(0)
    stranger = dest / "app-0.9.bin"  # not placed by murderd: never removed
    stranger.write_bytes(b"mine")
    for version in ("1.0", "1.1", "1.2"):
        random_file(tmp_path / f"app-{version}.bin", 100_000)
        fleet.drop(tmp_path / f"app-{version}.bin")
        wait_for((dest / f"app-{version}.bin").exists, 60, what=f"app-{version} placed")
    wait_for(lambda: not (dest / "app-1.0.bin").exists(), 30, what="the oldest to be removed")
    assert (dest / "app-1.1.bin").exists() and (dest / "app-1.2.bin").exists()
    assert stranger.read_bytes() == b"mine"


def test_status_line_counts_deploys(fleet_factory, tmp_path):
    fleet = fleet_factory(1, follow=True).start()
    random_file(tmp_path / "s.bin", MiB)
    fleet.drop(tmp_path / "s.bin")
    wait_for((fleet.peer_destination(0) / "s.bin").exists, 60, what="the deploy")
    wait_for(
        lambda: "STATUS=0 downloading, 1 done, 0 failed" in fleet.peers[0].poll_messages(),
        10,
        what="the STATUS line",
    )


def test_works_with_a_standard_tracker(fleet_factory, tmp_path):
    """opentracker (Debian's, whitelist-only) instead of murder-tracker: no registration."""
    import shutil
    import subprocess

    from murderd.localfleet import free_port

    if not shutil.which("opentracker"):
        if os.environ.get("CI"):
            pytest.fail("opentracker is not installed")
        pytest.skip("opentracker is not installed (apt-get install opentracker)")
    port = free_port()
    announce = f"http://127.0.0.1:{port}/announce"
    fleet = fleet_factory(2, follow=True, seeder={"trackers": [announce], "token_file": '""'})
    random_file(tmp_path / "std.bin", 4 * MiB)
    # Info-hashes are deterministic: the operator whitelists the hash before publishing.
    made = torrent.make_torrent(tmp_path / "std.bin", [announce])
    otdir = tmp_path / "ot"
    otdir.mkdir()
    (otdir / "whitelist").write_text(made.info_hash + "\n")
    os.chmod(otdir, 0o755)
    ot = subprocess.Popen(
        ["opentracker", "-i", "127.0.0.1", "-p", str(port), "-P", str(port)]
        + ["-d", str(otdir), "-w", "whitelist", "-u", "nobody"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        fleet.start()
        fleet.drop(tmp_path / "std.bin")
        for peer in range(2):
            dest = fleet.peer_destination(peer) / "std.bin"
            wait_for(dest.exists, 90, what=f"peer{peer + 1} via opentracker")
            assert sha256(dest) == made.sha256["std.bin"]
        assert index(fleet)[0]["info_hash"] == made.info_hash
    finally:
        ot.terminate()
        ot.wait(10)

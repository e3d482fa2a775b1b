"""bench/blocktrace.py counts what the source sent twice (its input written here by hand)."""

from __future__ import annotations

from bench import blocktrace


def test_counts_blocks_the_source_sent_to_a_second_peer(tmp_path):
    # Two peers, two pieces of two blocks; the source is 10.0.0.1.  Piece 0 leaves the
    # source twice (peer A, then peer B); piece 1 goes to A from the source and to B from A.
    (tmp_path / "1.blocks").write_text(
        "100.0 0 0 10.0.0.1\n100.1 0 1 10.0.0.1\n100.2 1 0 10.0.0.1\n100.3 1 1 10.0.0.1\n"
    )
    (tmp_path / "2.blocks").write_text(
        "100.5 0 0 10.0.0.1\n101.2 0 1 10.0.0.1\n101.4 1 0 10.0.0.2\n101.5 1 1 10.0.0.2\n"
    )
    rows = blocktrace.read(tmp_path)
    assert len(rows) == 8
    out = blocktrace.report(rows, window=(0, 1)).splitlines()
    assert out[0].startswith("source 10.0.0.1: 6 blocks = 1.50 x the file")
    assert out[1].endswith("1: 1, 2: 1")
    # Peer A had piece 0 whole at 100.1: both of B's blocks of it came from the source after.
    assert out[2] == "blocks of pieces another peer already had whole: 2"
    assert out[4].split() == ["0", "5", "1", "1"]  # second 0: 5 blocks, 1 to a later peer
    assert out[5].split() == ["1", "1", "1", "1"]
    assert "peer 1: 50% from the source, last block at 1.50 s" in out
    assert out[-1].endswith("[0]")  # peer 1 took piece 0 from the source in the first second


def test_sorts_source_blocks_by_the_receivers_slice(tmp_path):
    # Two peers with slices 0 and 1 of 2 (from their logs); pieces 0 and 1.  Peer 1 (pid
    # 11) takes its own piece 0, then piece 1 from the source after its own was in; peer 2
    # (pid 12) takes piece 0 from the source before its own piece 1 is in (from peer 1).
    traces, logs = tmp_path / "traces", tmp_path / "logs"
    traces.mkdir()
    logs.mkdir()
    (traces / "11.blocks").write_text("100.0 0 0 10.0.0.1\n100.5 1 0 10.0.0.1\n")
    (traces / "12.blocks").write_text("100.1 0 0 10.0.0.1\n100.9 1 0 10.0.0.2\n")
    for pid, part in ((11, 0), (12, 1)):
        (logs / f"0{pid}-peer.log").write_text(
            f"x INFO murderd.runtime: murder-peer 0.1.0 starting (pid {pid})\n"
            f"x INFO murderd.peer: deploy a: slice {part} of 2 from the seeder\n"
        )
    dealt = blocktrace.slices_by_peer(traces, logs)
    assert dealt == {0: (0, 2), 1: (1, 2)}
    out = blocktrace.report(blocktrace.read(traces), source="10.0.0.1", dealt=dealt)
    assert (
        "source blocks by the receiver's slice: another's, after its own was in: 1, "
        "another's, before its own was in: 1, own slice: 1"
    ) in out
    assert "own slice in at (s): 0.00, 0.90" in out

"""Who sent which block, and how much of the source's upload was spent twice.

Diagnosis for the swarm benchmark: run it with ``--lt-set trace_blocks=DIR`` (each peer then
writes one line per block it receives, see bench/ltoverride/sitecustomize.py), then

    python3 -m bench.blocktrace DIR [--source IP] [--pieces FROM TO] [--slices LOGDIR]

prints, for the source (by default the address that sent the most blocks): how many times
each piece left it; per second how many of its blocks went to a second or later peer
("duplicates": upload that a peer could have forwarded instead) and how many were of a piece
another peer already had whole (its receiver could have had it from that peer); and per
peer how much came from the source.  ``--pieces FROM TO`` lists which pieces each peer took
from the source in that time window (seconds from the first block).  ``--slices LOGDIR``
(the peers' logs, kept with ``bench/run.py --workdir``) sorts the source's blocks by the
slice (murderd/slices.py) of their receiver: its own, another's before its own slice was in,
another's after.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

ELSEWHERE_SLACK = 0.05  # seconds: a piece had whole this long before counts as had


def read(directory: Path) -> list[tuple[float, int, int, int, str]]:
    """(time, peer number, piece, block, sender ip) for every block every peer received."""
    rows = []
    for number, path in enumerate(sorted(directory.glob("*.blocks"))):
        for line in path.read_text().splitlines():
            t, piece, block, ip = line.split()
            rows.append((float(t), number, int(piece), int(block), ip))
    rows.sort()
    return rows


def slices_by_peer(directory: Path, logs: Path) -> dict[int, tuple[int, int]]:
    """Peer number (as read() numbers them) -> (slice, of), from the peers' logs."""
    by_pid = {}
    for log in logs.glob("*.log"):
        text = log.read_text(errors="replace")
        pid = re.search(r"starting \(pid (\d+)\)", text)
        part = re.search(r"slice (\d+) of (\d+) from the seeder", text)
        if pid and part:
            by_pid[pid.group(1)] = (int(part.group(1)), int(part.group(2)))
    paths = sorted(directory.glob("*.blocks"))
    return {n: by_pid[p.stem] for n, p in enumerate(paths) if p.stem in by_pid}


def slice_report(rows, source: str, dealt: dict[int, tuple[int, int]]) -> list[str]:
    t0 = rows[0][0]
    own_done = {}
    for peer, (index, count) in dealt.items():
        mine = [r[0] for r in rows if r[1] == peer and r[2] % count == index]
        own_done[peer] = (max(mine) - t0) if mine else 0.0
    kinds: collections.Counter = collections.Counter()
    for t, peer, piece, _block, ip in rows:
        if ip != source or peer not in dealt:
            continue
        index, count = dealt[peer]
        if piece % count == index:
            kinds["own slice"] += 1
        elif t - t0 <= own_done[peer]:
            kinds["another's, before its own was in"] += 1
        else:
            kinds["another's, after its own was in"] += 1
    return [
        "source blocks by the receiver's slice: "
        + ", ".join(f"{kind}: {n}" for kind, n in sorted(kinds.items())),
        "own slice in at (s): " + ", ".join(f"{own_done[p]:.2f}" for p in sorted(own_done)),
    ]


def report(
    rows,
    source: str | None = None,
    window: tuple[float, float] | None = None,
    dealt: dict[int, tuple[int, int]] | None = None,
) -> str:
    if not rows:
        return "no blocks traced"
    t0 = rows[0][0]
    senders = collections.Counter(r[4] for r in rows)
    source = source or senders.most_common(1)[0][0]
    peers = sorted({r[1] for r in rows})
    pieces = max(r[2] for r in rows) + 1
    blocks_per_piece = max(r[3] for r in rows) + 1
    from_source = [r for r in rows if r[4] == source]
    first_taker: dict[int, int] = {}
    takers: dict[int, set] = collections.defaultdict(set)
    sent: collections.Counter = collections.Counter()
    duplicate: collections.Counter = collections.Counter()
    for t, peer, piece, _block, _ip in from_source:
        first_taker.setdefault(piece, peer)
        takers[piece].add(peer)
        second = int(t - t0)
        sent[second] += 1
        if peer != first_taker[piece]:
            duplicate[second] += 1
    # A block of a piece some other peer already had whole: the receiver could have had it
    # from that peer, and the source's upload went to it instead of a piece nobody had.
    whole_at: dict[tuple[int, int], float] = {}
    for t, peer, piece, _block, _ip in rows:
        whole_at[(peer, piece)] = t  # rows are sorted: the last block's time
    first_whole: dict[int, float] = {}
    for (_peer, piece), t in whole_at.items():
        first_whole[piece] = min(first_whole.get(piece, t), t)
    elsewhere: collections.Counter = collections.Counter()
    for t, peer, piece, _block, _ip in from_source:
        had = first_whole[piece]
        if had < t - ELSEWHERE_SLACK and whole_at[(peer, piece)] > had:
            elsewhere[int(t - t0)] += 1
    spread = collections.Counter(len(takers[p]) for p in range(pieces))
    lines = [
        f"source {source}: {len(from_source)} blocks = "
        f"{len(from_source) / (pieces * blocks_per_piece):.2f} x the file "
        f"({pieces} pieces of {blocks_per_piece} blocks)",
        "pieces by the number of peers that took blocks of them from the source: "
        + ", ".join(f"{n}: {count}" for n, count in sorted(spread.items())),
        f"blocks of pieces another peer already had whole: {sum(elsewhere.values())}",
        "second  source blocks  to a later peer  another peer had it",
    ]
    lines += [
        f"{s:6d}  {sent[s]:13d}  {duplicate[s]:15d}  {elsewhere[s]:19d}" for s in sorted(sent)
    ]
    for peer in peers:
        mine = [r for r in rows if r[1] == peer]
        share = sum(1 for r in mine if r[4] == source) / len(mine)
        last = mine[-1][0] - t0
        lines.append(f"peer {peer}: {share:.0%} from the source, last block at {last:.2f} s")
    if dealt:
        lines += slice_report(rows, source, dealt)
    if window:
        lo, hi = window
        for peer in peers:
            taken: list[int] = []
            for t, p, piece, _b, _ip in from_source:
                if p == peer and lo <= t - t0 < hi and (not taken or taken[-1] != piece):
                    taken.append(piece)
            lines.append(f"peer {peer} took from the source in [{lo}, {hi}) s: {taken[:40]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--source", help="the source's address (default: the top sender)")
    parser.add_argument("--pieces", nargs=2, type=float, metavar=("FROM", "TO"))
    parser.add_argument("--slices", type=Path, metavar="LOGDIR", help="the peers' logs")
    args = parser.parse_args()
    dealt = slices_by_peer(args.directory, args.slices) if args.slices else None
    window = tuple(args.pieces) if args.pieces else None
    print(report(read(args.directory), args.source, window, dealt))


if __name__ == "__main__":
    main()

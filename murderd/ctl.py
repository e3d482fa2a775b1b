"""murderctl: the operator's command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__, config, torrent

EX_USAGE = 2


def cmd_check_config(args) -> int:
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        for line in exc.problems:
            print(f"murderctl: config error: {line}", file=sys.stderr)
        return config.EX_CONFIG
    sys.stdout.write(cfg.render())
    return 0


def cmd_make_torrent(args) -> int:
    source = Path(args.file)
    out = Path(args.out) if args.out else Path(f"{source.name}.torrent")
    try:
        made = torrent.make_torrent(source, args.tracker, args.piece_size, args.format)
    except (torrent.TorrentError, OSError) as exc:
        print(f"murderctl: {exc}", file=sys.stderr)
        return 1
    from .fsutil import atomic_write

    atomic_write(out.resolve(), made.data)
    print(f"{out}: {made.name}, {made.total_size} bytes, piece size {made.piece_size}")
    print(f"info-hash {made.info_hash}")
    for rel, digest in made.sha256.items():
        print(f"sha256 {digest}  {rel}")
    return 0


def cmd_verify(args) -> int:
    try:
        parsed = torrent.load(args.torrent)
    except (OSError, torrent.TorrentError) as exc:
        print(f"murderctl: {args.torrent}: {exc}", file=sys.stderr)
        return EX_USAGE
    target = Path(args.file)
    try:
        problems = torrent.verify_data(parsed, target)
    except OSError as exc:
        print(f"murderctl: {target}: {exc}", file=sys.stderr)
        return 1
    for line in problems:
        print(f"FAIL {line}")
    if problems:
        return 1
    print(f"OK {target} matches {parsed.name} ({parsed.info_hash})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="murderctl", description="operate a murderd fleet")
    parser.add_argument("--version", action="version", version=f"murderd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check-config", help="validate the config and print the effective values")
    p.add_argument("--config", "-c", default=None, help=f"default {config.DEFAULT_PATH}")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("make-torrent", help="hash a file or directory into a private torrent")
    p.add_argument("file")
    p.add_argument("--tracker", action="append", required=True, help="announce URL (repeatable)")
    p.add_argument("--piece-size", type=int, default=0, help="bytes; default: from the size")
    p.add_argument("--format", choices=torrent.FORMATS, default="v1")
    p.add_argument("--out", "-o", help="output file (default ./<name>.torrent)")
    p.set_defaults(func=cmd_make_torrent)

    p = sub.add_parser("verify", help="full hash check of a file (or directory) against a torrent")
    p.add_argument("file")
    p.add_argument("torrent")
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except KeyboardInterrupt:
        sys.exit(130)

"""murder-peer's network inputs: a torrent fetched by URL, and a seeder's index.json followed.

``fetch`` reads one HTTP(S) resource with a timeout and a size cap (.url drops, follow).
``Follower`` keeps up with a seeder's index.json: a murder-seeder's index carries a
generation, and the follower asks it to hold the answer until the generation moves on (a
deploy published or removed), so a new deploy is seen at once however long follow_interval
is.  Any other server (a plain file behind nginx, an older seeder) is polled every
follow_interval.  After an error (the seeder down or restarting) the index is tried again
after 0.25, 0.5, 1, 2 ... seconds, at most follow_interval apart (a peer started with
its seeder, as in a fresh fleet, catches the seeder's first second).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Callable
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp

from . import slices

log = logging.getLogger(__name__)

FETCH_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ValueError)
WAIT = 25.0  # how long a long poll asks the seeder to hold index.json
RETRY_FIRST = 0.25  # seconds before the first retry of a failed fetch (then doubled)
QUICK = 0.5  # an unchanged index answered faster than this: the server does not long-poll


async def fetch(client: aiohttp.ClientSession, url: str, timeout: float, cap: int) -> bytes:
    """The body at url; ValueError for another status than 200 or a body over cap bytes."""
    async with client.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        if resp.status != 200:
            raise ValueError(f"{url} answered HTTP {resp.status}")
        return await read_capped(resp, url, cap)


async def read_capped(resp: aiohttp.ClientResponse, url: str, cap: int) -> bytes:
    """resp's body; ValueError when it is over cap bytes."""
    if resp.content_length and resp.content_length > cap:
        raise ValueError(f"{url} is {resp.content_length} bytes, over the cap of {cap}")
    # content.read(n) returns what has arrived so far (up to n), not the whole body:
    # on a real network a .torrent comes in several segments.
    data = bytearray()
    while len(data) <= cap:
        chunk = await resp.content.read(cap + 1 - len(data))
        if not chunk:
            break
        data += chunk
    if len(data) > cap:
        raise ValueError(f"{url} is over the cap of {cap} bytes")
    return bytes(data)


def with_query(url: str, params: dict) -> str:
    """url with params added to its query (none: url as it is)."""
    if not params:
        return url
    parts = urlsplit(url)
    query = urlencode(params)
    return urlunsplit(parts._replace(query=f"{parts.query}&{query}".lstrip("&")))


class Follower:
    """Follows [peer] follow: every deploy new to this host is handed to accept()."""

    def __init__(
        self,
        client: Callable[[], aiohttp.ClientSession],
        settings: Callable[[], dict],
        known: Callable[[str], bool],
        accept: Callable[[bytes, str, slices.Part | None, str | None], None],
        reslice: Callable[[str, slices.Part], None] | None = None,
    ):
        self.client = client  # the daemon's HTTP client (made at start)
        self.settings = settings  # the live [peer] section (follow, follow_interval ...)
        self.known = known  # is this info-hash already one of the host's deploys?
        # (torrent bytes, its URL, its slice or None: slices.py, the URL of the seeder's
        # pieces for the slice or None: piecehttp.py)
        self.accept = accept
        self.reslice = reslice  # (info-hash, its slice now): the seeder moved pieces
        self.fetching: set[str] = set()  # info-hashes taken from the index, not yet known
        # Who this process is to the seeder (?peer=), for the slices it deals out.
        self.ident = os.urandom(8).hex()

    async def fetch(self, url: str) -> bytes:
        c = self.settings()
        return await fetch(self.client(), url, c["url_timeout"], c["max_torrent_bytes"])

    async def run(self) -> None:
        generation = None
        backoff = RETRY_FIRST
        while True:
            c = self.settings()
            delay = c["follow_interval"]
            if c["follow"]:
                started = time.monotonic()
                try:
                    seen, failed = await self.once(c["follow"], generation)
                except FETCH_ERRORS as exc:
                    log.warning("follow %s: %s", c["follow"], exc or type(exc).__name__)
                    seen, failed = None, True
                if failed:
                    delay = min(delay, backoff)
                    backoff *= 2
                else:
                    backoff = RETRY_FIRST
                # Go straight back to waiting, unless the server answered an unchanged
                # generation at once (it does not hold requests: plain polling, then).
                quick = time.monotonic() - started < QUICK
                if seen is not None and (seen != generation or not quick):
                    delay = 0
                generation = seen
            if delay:
                await asyncio.sleep(delay)

    async def once(self, url: str, generation: str | None) -> tuple[str | None, bool]:
        """Read the index (held until it changes when generation is given); start new deploys.

        Returns the index's generation (None when the server gives none, or when a torrent
        could not be fetched: the index is then read again without one) and whether a torrent
        could not be fetched.
        """
        c = self.settings()
        wait = min(WAIT, c["url_timeout"] / 2)
        params = {"peer": self.ident} if c["slices"] else {}
        if generation is not None and wait >= 1:
            params.update(after=generation, wait=f"{wait:g}")
        url = with_query(url, params)
        index = await self.fetch(url)
        try:
            parsed = json.loads(index)
            deploys = parsed["deploys"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a seeder index: {exc}") from None
        seen = parsed.get("generation")
        seen = seen if isinstance(seen, str) and len(seen) <= 100 else None
        failed = False
        for item in deploys if isinstance(deploys, list) else []:
            if not isinstance(item, dict):
                continue
            info_hash, torrent_url = item.get("info_hash"), item.get("url")
            if not isinstance(info_hash, str) or not isinstance(torrent_url, str):
                continue
            if self.known(info_hash) or info_hash in self.fetching:
                part = slices.parse_slice(item) if c["slices"] and self.reslice else None
                if part is not None:
                    self.reslice(info_hash, part)  # a no-op unless the seeder moved pieces
                continue
            self.fetching.add(info_hash)
            log.info("follow: new deploy %s (%s)", item.get("name"), info_hash)
            try:
                data = await self.fetch(torrent_url)
            except FETCH_ERRORS as exc:
                log.warning("follow: cannot fetch %s: %s", torrent_url, exc)
                self.fetching.discard(info_hash)
                seen, failed = None, True
                continue
            part = slices.parse_slice(item) if c["slices"] else None
            pieces = item.get("pieces") if part is not None and c["slices_http"] else None
            if not isinstance(pieces, str) or not pieces.startswith(("http://", "https://")):
                pieces = None
            self.accept(data, torrent_url, part, pieces)
        return seen, failed

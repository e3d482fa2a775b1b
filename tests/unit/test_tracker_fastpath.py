"""The tracker's fast path takes only plain announces; everything else goes to aiohttp."""

from __future__ import annotations

import pytest

from murderd.tracker.fastpath import plain_announce

Q = b"info_hash=%41%42&peer_id=-MB0001-x&port=1&left=0&compact=1"


def head(line: bytes = b"GET /announce?" + Q + b" HTTP/1.1", *headers: bytes) -> bytes:
    return b"\r\n".join((line, *headers)) + b"\r\n\r\n"


def test_a_plain_announce_is_taken():
    assert plain_announce(
        head(b"GET /announce?" + Q + b" HTTP/1.1", b"Host: t", b"Connection: close")
    ) == (Q.decode(), 1)
    assert plain_announce(head(b"GET /announce?" + Q + b" HTTP/1.0")) == (Q.decode(), 0)
    assert plain_announce(head(b"GET /announce?" + Q + b" HTTP/1.0", b"connection: CLOSE")) == (
        Q.decode(),
        0,
    )


@pytest.mark.parametrize(
    "request_head",
    [
        head(b"GET /announce?" + Q + b" HTTP/1.1", b"Host: t"),  # keep-alive
        head(b"GET /announce?" + Q + b" HTTP/1.1", b"Connection: close"),  # no Host: 400
        head(b"GET /announce?" + Q + b" HTTP/1.1", b"Host: t", b"Host: u", b"Connection: close"),
        head(b"GET /announce?" + Q + b" HTTP/1.0", b"Connection: keep-alive"),
        head(b"GET /announce?" + Q + b" HTTP/1.0", b"Content-Length: 0"),
        head(b"GET /announce?" + Q + b" HTTP/1.0", b"Transfer-Encoding: chunked"),
        head(b"GET /announce?" + Q + b" HTTP/1.0", b" folded"),
        head(b"GET /announce?" + Q + b" HTTP/1.0", b"Bad Name: x"),
        head(b"GET /announce?" + Q + b" HTTP/1.0", b"X: \x01"),
        head(b"GET /announce?" + Q + b"#frag HTTP/1.0"),
        head(b"GET /announce?a=\xff HTTP/1.0"),
        head(b"GET /announce HTTP/1.0"),
        head(b"GET /announce/?" + Q + b" HTTP/1.0"),
        head(b"HEAD /announce?" + Q + b" HTTP/1.0"),
        head(b"POST /announce?" + Q + b" HTTP/1.0"),
        head(b"GET /scrape?" + Q + b" HTTP/1.0"),
        head(b"GET /announce?" + Q + b" HTTP/2.0"),
        head(b"GET  /announce?" + Q + b" HTTP/1.0"),
        head(b"GET /announce?" + Q + b" HTTP/1.0") + head(b"GET /announce?" + Q + b" HTTP/1.0"),
        head(b"GET /announce?" + Q + b" HTTP/1.0", *[b"X: y"] * 40),
    ],
)
def test_anything_else_goes_to_aiohttp(request_head):
    assert plain_announce(request_head) is None

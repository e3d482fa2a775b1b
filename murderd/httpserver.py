"""Start and stop an aiohttp server on a configured host:port (seeder, peer metrics)."""

from __future__ import annotations

import logging

from aiohttp import web

from .config import split_hostport
from .runtime import StartupError

log = logging.getLogger(__name__)


async def serve(app: web.Application, listen: str, what: str) -> web.AppRunner:
    """Bind app to listen ("host:port"); StartupError with a clear reason if it can't."""
    host, port = split_hostport(listen)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"{what}: cannot listen on {listen}: {exc.strerror or exc}") from None
    log.info("%s listening on http://%s", what, listen)
    return runner

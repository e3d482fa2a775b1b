"""Shared test helpers: free ports, configs, daemons started as real subprocesses.

Daemons report readiness over a real sd_notify socket (NOTIFY_SOCKET) that the test owns:
the test waits for READY=1 exactly as systemd would.  The helpers live in
murderd.localfleet, which the demo and the benchmarks use too.
"""

from __future__ import annotations

import pytest

from murderd.localfleet import (  # noqa: F401  (re-exported for the tests)
    BIN,
    Daemon,
    LocalFleet,
    free_port,
    render_ini,
    wait_for,
    write_config,
)


@pytest.fixture
def daemons():
    """Start daemons with daemons(name, config, workdir); all are killed at teardown."""
    started: list[Daemon] = []

    def start(name, config, workdir, wait=True, env=None):
        daemon = Daemon(name, config, workdir, env)
        started.append(daemon)
        return daemon.start(wait=wait)

    yield start
    for daemon in started:
        daemon.close()


@pytest.fixture
def fleet_factory(tmp_path):
    """fleet_factory(peers=N, ...) -> a LocalFleet under tmp_path, closed at teardown."""
    fleets: list[LocalFleet] = []

    def make(peers: int = 2, **kwargs) -> LocalFleet:
        fleet = LocalFleet(tmp_path / f"fleet{len(fleets)}", peers, **kwargs)
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.close()

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


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item, so fixtures can tell that their test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def failed(request) -> bool:
    report = getattr(request.node, "report_call", None)
    return report is None or report.failed


def print_log_tails(daemons, lines: int = 25) -> None:
    """After a failure: the end of each daemon's log, for CI output to show what happened."""
    for daemon in daemons:
        try:
            text = daemon.log_text().splitlines()[-lines:]
            print(f"--- last {len(text)} lines of {daemon.log_path}")
        except Exception as exc:  # a test that broke the config on purpose
            print(f"--- no log for {daemon.name}: {exc}")
            continue
        print("\n".join(line[:300] for line in text))


@pytest.fixture
def daemons(request):
    """Start daemons with daemons(name, config, workdir); all are killed at teardown."""
    started: list[Daemon] = []

    def start(name, config, workdir, wait=True, env=None):
        daemon = Daemon(name, config, workdir, env)
        started.append(daemon)
        return daemon.start(wait=wait)

    yield start
    if failed(request):
        print_log_tails(started)
    for daemon in started:
        daemon.close()


@pytest.fixture
def fleet_factory(tmp_path, request):
    """fleet_factory(peers=N, ...) -> a LocalFleet under tmp_path, closed at teardown."""
    fleets: list[LocalFleet] = []

    def make(peers: int = 2, **kwargs) -> LocalFleet:
        fleet = LocalFleet(tmp_path / f"fleet{len(fleets)}", peers, **kwargs)
        fleets.append(fleet)
        return fleet

    yield make
    if failed(request):
        print_log_tails([d for fleet in fleets for d in fleet.daemons])
    for fleet in fleets:
        fleet.close()

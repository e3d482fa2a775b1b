"""Session fixtures of the packaging tests: the RPMs `make rpm` builds (see pkgtest.py)."""

from __future__ import annotations

import pytest
from pkgtest import Build, make_newer_rpm, make_rpm


@pytest.fixture(scope="session")
def rpm_build(tmp_path_factory) -> Build:
    """`make rpm` (release 1, %check included), built from the SRPM alone."""
    return make_rpm(tmp_path_factory.mktemp("rpm"), "1")


@pytest.fixture(scope="session")
def rpm_upgrade(rpm_build, tmp_path_factory) -> Build:
    """The next release, whose sample config changed: for upgrade tests."""
    return make_newer_rpm(rpm_build, tmp_path_factory.mktemp("rpm2"))

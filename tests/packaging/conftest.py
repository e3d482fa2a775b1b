"""Session fixtures of the packaging tests: the RPMs `make rpm` builds (see pkgtest.py)."""

from __future__ import annotations

import pytest
from pkgtest import Build, make_rpm


@pytest.fixture(scope="session")
def rpm_build(tmp_path_factory) -> Build:
    """`make rpm` (release 1, %check included), built from the SRPM alone."""
    return make_rpm(tmp_path_factory.mktemp("rpm"), "1")


@pytest.fixture(scope="session")
def rpm_upgrade(tmp_path_factory) -> Build:
    """A newer release of the same version, for upgrade tests (%check skipped)."""
    return make_rpm(tmp_path_factory.mktemp("rpm2"), "2", "RPMBUILD_OPTS=--without check")

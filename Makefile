# murderd — build, test and install.  `make demo` and `make test` set themselves up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PREFIX ?= /usr
DESTDIR ?=
SYSCONFDIR ?= /etc
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' murderd/__init__.py)
# Debian packages the tests and the demo use (real clients and tools, not mocks).
APT_PACKAGES := aria2 opentracker transmission-cli logrotate iproute2 rpm rpm2cpio cpio rpmlint createrepo-c dnf debootstrap systemd-container systemd util-linux procps python3-pip python3-setuptools python3-wheel

.PHONY: all venv system-deps test test-lt20 test-fast lint demo bench install dist clean

all: venv

$(VENV)/.stamp: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV) || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.stamp

# As root (CI, a fresh machine) install the Debian tools the tests use; otherwise say what is missing.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	fi

test: venv system-deps
	$(PY) -m pytest -q tests
	$(MAKE) test-lt20

# EL9 (EPEL) and Debian ship libtorrent 2.0.x, and EL9's python3 is 3.9: run the unit tests
# and the end-to-end deploy tests once more on the 2.0 bindings, under Python 3.9 where this
# machine has one (else the default python3), in a venv of their own.  The full-disk fault test
# too: how libtorrent reports a failed write is what the peer's retry depends on.
LT20_VENV ?= .venv-lt20
LT20_PYTHON ?= $(firstword $(wildcard /usr/bin/python3.9 $(HOME)/.pyenv/versions/3.9*/bin/python3.9) $(PYTHON))
$(LT20_VENV)/.stamp: setup.cfg pyproject.toml
	$(LT20_PYTHON) -m venv $(LT20_VENV)
	$(LT20_VENV)/bin/python -m pip install -q 'libtorrent>=2.0,<2.1'
	$(LT20_VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

test-lt20: $(LT20_VENV)/.stamp system-deps
	$(LT20_VENV)/bin/python -c 'import sys, libtorrent; print("python", sys.version.split()[0], "libtorrent", libtorrent.__version__); assert libtorrent.__version__.startswith("2.0")'
	$(LT20_VENV)/bin/python -m pytest -q tests/unit tests/integration/test_deploy.py tests/integration/test_seeder_slices.py \
	  tests/integration/test_slices_http.py \
	  tests/integration/test_runtime.py \
	  tests/faults/test_disk_faults.py

test-fast: venv
	$(PY) -m pytest -q tests/unit

lint: venv
	$(VENV)/bin/ruff check murderd tests bench
	$(VENV)/bin/ruff format --check murderd tests bench

demo: venv
	$(PY) -m murderd.demo $(DEMO_ARGS)

bench: venv system-deps
	$(PY) bench/run.py $(BENCH_ARGS)

# --- Install and packaging (install, dist, srpm, rpm, repo) ------------------------------------
# `make install DESTDIR=... PREFIX=/usr` is what the RPM's %install runs.  The Python package
# goes to PYTHON_SITELIB exactly (pip --target, then moved), whatever scheme the build
# host's python patches in (Debian's maps /usr to /usr/local); scripts get PYTHON_SHEBANG.
BINDIR ?= $(PREFIX)/bin
PYTHON_SITELIB ?= $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("purelib", vars={"base": "$(PREFIX)", "platbase": "$(PREFIX)"}))')
PYTHON_SHEBANG ?= /usr/bin/python3
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
LOGROTATEDIR ?= $(SYSCONFDIR)/logrotate.d
PIP_STAGE := build/pip-target

# RPMs.  The version lives only in murderd/__init__.py: `make srpm` writes it (and RELEASE)
# into the copy of packaging/rpm/murderd.spec that goes into the SRPM, so the SRPM rebuilds
# anywhere on its own.  On a host without EL9's rpm macros (Debian) packaging/rpm/macros.el9
# stands in for them and BuildRequires are not checked (--nodeps).
RELEASE ?= 1
RPM_TOPDIR ?= $(CURDIR)/build/rpm
REPO_DIR ?= $(CURDIR)/build/repo
RPM_ON_EL := $(shell rpm --eval '%{?_unitdir}' 2>/dev/null)
RPM_HOST_OPTS := $(if $(RPM_ON_EL),,--load=$(CURDIR)/packaging/rpm/macros.el9 --nodeps --define "murderd_check_python $(CURDIR)/$(VENV)/bin/python")
RPMBUILD_OPTS ?=
RPMBUILD := rpmbuild --define "_topdir $(RPM_TOPDIR)" $(RPM_HOST_OPTS) $(RPMBUILD_OPTS)
# %{?dist} is .el9 on an EL9 build host, empty elsewhere.
DIST := $(shell rpm --eval '%{?dist}' 2>/dev/null)
SRPM := $(RPM_TOPDIR)/SRPMS/murderd-$(VERSION)-$(RELEASE)$(DIST).src.rpm
RPM_FILE := $(RPM_TOPDIR)/RPMS/noarch/murderd-$(VERSION)-$(RELEASE)$(DIST).noarch.rpm

.PHONY: srpm rpm repo

install:
	rm -rf $(PIP_STAGE)
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation --no-index --no-compile --target $(PIP_STAGE) .
	install -d "$(DESTDIR)$(PYTHON_SITELIB)" "$(DESTDIR)$(BINDIR)"
	cp -R $(PIP_STAGE)/murderd $(PIP_STAGE)/murderd-$(VERSION).dist-info "$(DESTDIR)$(PYTHON_SITELIB)/"
	# The RECORD and direct_url.json pip wrote describe the staging directory, not this one.
	rm -f "$(DESTDIR)$(PYTHON_SITELIB)/murderd-$(VERSION).dist-info/RECORD" \
	      "$(DESTDIR)$(PYTHON_SITELIB)/murderd-$(VERSION).dist-info/direct_url.json"
	for script in $(PIP_STAGE)/bin/*; do \
	  sed '1s|^#!.*python.*$$|#!$(PYTHON_SHEBANG)|' "$$script" > "$(DESTDIR)$(BINDIR)/$${script##*/}" && \
	  chmod 0755 "$(DESTDIR)$(BINDIR)/$${script##*/}" || exit 1; \
	done
	install -D -m 0644 murderd.conf "$(DESTDIR)$(SYSCONFDIR)/murderd/murderd.conf"
	install -d -m 0755 "$(DESTDIR)$(SYSCONFDIR)/murderd/conf.d"
	install -D -m 0644 -t "$(DESTDIR)$(UNITDIR)" systemd/murder-tracker.service \
	  systemd/murder-seeder.service systemd/murder-peer.service
	install -D -m 0644 logrotate/murderd "$(DESTDIR)$(LOGROTATEDIR)/murderd"
	install -D -m 0644 packaging/sysusers.d/murderd.conf "$(DESTDIR)$(SYSUSERSDIR)/murderd.conf"
	install -D -m 0644 packaging/tmpfiles.d/murderd.conf "$(DESTDIR)$(TMPFILESDIR)/murderd.conf"
	rm -rf $(PIP_STAGE)

# The source tarball: the files git tracks, as they are in the work tree.
dist:
	mkdir -p dist
	git ls-files -z | tar --null -T - --transform 's,^,murderd-$(VERSION)/,' -czf dist/murderd-$(VERSION).tar.gz
	@echo dist/murderd-$(VERSION).tar.gz

srpm: dist
	rm -rf $(RPM_TOPDIR)/SOURCES $(RPM_TOPDIR)/SPECS
	mkdir -p $(RPM_TOPDIR)/SOURCES $(RPM_TOPDIR)/SPECS
	cp dist/murderd-$(VERSION).tar.gz $(RPM_TOPDIR)/SOURCES/
	{ echo '%global murderd_version $(VERSION)'; echo '%global murderd_release $(RELEASE)'; \
	  cat packaging/rpm/murderd.spec; } > $(RPM_TOPDIR)/SPECS/murderd.spec
	$(RPMBUILD) -bs $(RPM_TOPDIR)/SPECS/murderd.spec
	@echo $(SRPM)

# Built from the SRPM alone, as a build host or mock would; %check runs the unit tests.
rpm: srpm $(if $(RPM_ON_EL),,venv)
	$(RPMBUILD) --rebuild $(SRPM)
	@ls $(RPM_FILE)

# A yum repository a fleet can point at (baseurl=file:// or served over HTTP).
repo: rpm
	mkdir -p $(REPO_DIR)
	cp $(RPM_FILE) $(REPO_DIR)/
	createrepo_c --quiet --update $(REPO_DIR)
	@echo $(REPO_DIR)

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

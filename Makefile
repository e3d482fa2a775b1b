# murderd — build, test and install.  `make demo` and `make test` set themselves up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PREFIX ?= /usr
DESTDIR ?=
SYSCONFDIR ?= /etc
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' murderd/__init__.py)
# Debian packages the tests and the demo use (real clients and tools, not mocks).
APT_PACKAGES := aria2 opentracker transmission-cli logrotate iproute2

.PHONY: all venv system-deps test test-fast lint demo bench install dist clean

all: venv

$(VENV)/.stamp: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
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

test-fast: venv
	$(PY) -m pytest -q tests/unit

lint: venv
	$(VENV)/bin/ruff check murderd tests bench
	$(VENV)/bin/ruff format --check murderd tests bench

demo: venv
	$(PY) -m murderd.demo $(DEMO_ARGS)

bench: venv system-deps
	$(PY) bench/run.py $(BENCH_ARGS)

# Used by the RPM's %install: the package, its scripts, config, units and logrotate file.
install:
	$(PYTHON) -m pip install --no-deps --no-build-isolation --no-index --root "$(DESTDIR)/" --prefix "$(PREFIX)" .
	install -D -m 0644 murderd.conf "$(DESTDIR)$(SYSCONFDIR)/murderd/murderd.conf"
	install -d -m 0755 "$(DESTDIR)$(SYSCONFDIR)/murderd/conf.d"

dist:
	mkdir -p dist
	git ls-files -z | tar --null -T - --transform 's,^,murderd-$(VERSION)/,' -czf dist/murderd-$(VERSION).tar.gz
	@echo dist/murderd-$(VERSION).tar.gz

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

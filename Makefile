# guixsvc developer entry points.  `make run` and `make test` are the two commands of README.md.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCAL ?= $(CURDIR)/local
PORT ?= 8080
# Debian packages `make test` installs as root.  Installing avahi-daemon and dbus starts their
# services on the host; GUIXSVC_AVAHI=0 (tests/avahi) and GUIXSVC_E2E=0 (tests/e2e: debootstrap,
# systemd-nspawn) leave those groups out and skip their tests.
APT_CORE := nix-bin busybox-static libgcrypt20 guile-3.0 guile-gcrypt systemd libsystemd-dev \
            pkg-config lzip zstd gzip util-linux passwd procps iproute2 chromium \
            slirp4netns gcc libc6-dev openssh-server openssh-client
APT_AVAHI := avahi-daemon avahi-utils dbus
APT_E2E := debootstrap systemd-container
APT_PACKAGES := $(APT_CORE) $(if $(filter 0,$(GUIXSVC_AVAHI)),,$(APT_AVAHI)) \
                $(if $(filter 0,$(GUIXSVC_E2E)),,$(APT_E2E))

.PHONY: run test e2e setup setup-system lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# System packages the tests use as oracles and real parts (only when root with apt).
setup-system:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(APT_PACKAGES); do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  fi; \
	else echo "not root or no apt-get: skipping system packages ($(APT_PACKAGES))"; fi

# Python packages, pinned by constraints.txt; reinstalled only when the project's metadata changes.
STAMP := $(VENV)/.guixsvc-setup
$(STAMP): pyproject.toml constraints.txt | $(PY) setup-system
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	@if pkg-config --exists libsystemd 2>/dev/null; then \
	  $(PY) -m pip install -q -c constraints.txt -e '.[systemd]'; fi
	@touch $@

setup: $(STAMP)

# The embedded default: a daemon on a store under ./local, no root needed (`make run PORT=8181`).
# It prints the lines that put the tools on PATH and point a client at it; a taken port fails fast.
RUN_STAMP := $(VENV)/.guixsvc-run
$(RUN_STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q -c constraints.txt -e .
	@touch $@

run: $(RUN_STAMP)
	@$(PY) -m guixsvc.devserver --root $(LOCAL) --port $(PORT)

lint: setup
	$(VENV)/bin/ruff check guixsvc tests bench
	$(VENV)/bin/ruff format --check guixsvc tests bench
	$(VENV)/bin/mypy guixsvc
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_layers.py

test: setup
	$(VENV)/bin/ruff check guixsvc tests bench
	$(VENV)/bin/mypy guixsvc
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

# Only the end-to-end tests on a booted systemd (root; the first run debootstraps ~90 s).
e2e: setup
	$(VENV)/bin/python -m pytest -q -rs -p no:cacheprovider tests/e2e

bench: setup
	$(PY) bench/store_ops.py

clean:
	rm -rf $(VENV) $(LOCAL) build *.egg-info

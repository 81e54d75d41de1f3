# The two commands the README promises: `make up` (run envclone) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install node-runtime test lint up bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# As root, node processes run as per-environment accounts: they need the kernel fence (nftables)
# and a Python they can run with the webapp's libraries (this checkout's may sit under /root);
# the mariadb stack runs the system's mariadbd (mariadb-server-core: the server, no service) and
# copies it online with mariadb-backup.
NODE_PACKAGES := nftables python3-psycopg python3-redis mariadb-server-core mariadb-backup
node-runtime:
	@if [ "$$(id -u)" = 0 ] && ! dpkg -s $(NODE_PACKAGES) >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(NODE_PACKAGES) >/dev/null; fi

test: install
	$(PY) -m ruff check api workers shared tests bench migrations
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

lint: install
	$(PY) -m ruff check api workers shared tests bench migrations

# Set up and run envclone on this machine: the embedded stack, then the demo clone.
up: install node-runtime
	$(VENV)/bin/envclone up --demo

# Benchmarks: figures beside their baselines, written to bench/results/ (needs the test services).
bench: install
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) var

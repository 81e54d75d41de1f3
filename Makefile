# The two commands the README promises: `make up` (run envclone) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install test lint up bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m ruff check api workers shared tests bench migrations
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check api workers shared tests bench migrations

# Set up and run envclone on this machine: the embedded stack, then the demo clone.
up: install
	$(VENV)/bin/envclone up --demo

# Benchmarks: figures beside their baselines, written to bench/results/ (needs the test services).
bench: install
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) var

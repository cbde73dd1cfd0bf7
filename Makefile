# dworkers: `make run` starts the local demo cluster, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS_STAMP := $(VENV)/.tools
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/dworkers/v1/*.proto)
GEN_STAMP := gen/.generated

.PHONY: setup proto run test test-fast lint bench chaos zookeeper postgresql test-tools clean lock

setup: $(STAMP) zookeeper postgresql

$(TOOLS_STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { scripts/ensure-packages.sh python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet 'grpcio-tools==1.85.1'
	@touch $@

# Generated code lives in gen/ (never edited by hand, never committed):
# setup.py generates it (any build does too) and the editable install maps
# gen/dworkers/v1 as the package dworkers.v1.
proto: $(GEN_STAMP)
$(GEN_STAMP): $(PROTOS) $(TOOLS_STAMP)
	@mkdir -p gen
	@rm -f $@
	$(PY) setup.py --name > /dev/null

$(STAMP): pyproject.toml setup.py constraints.txt $(GEN_STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $@

# Pins every dependency at the versions installed now (after changing pyproject.toml's).
lock: $(STAMP)
	@{ sed -n '1,2p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^dworkers' | sort -f; } \
		> constraints.txt.new && mv constraints.txt.new constraints.txt

zookeeper:
	@scripts/ensure-zookeeper.sh

# The server binaries the PostgreSQL journal's tests and benchmark run.
postgresql:
	@scripts/ensure-postgresql.sh

run: setup
	$(VENV)/bin/dworkers demo

# Everything: unit, integration (a real ZooKeeper), end-to-end (real
# processes) and a short chaos run.
test: setup test-tools
	$(PY) -m pytest -q --durations=15 tests

# The quick loop while developing: lint, types, and the tests that start no
# service process (a ZooKeeper at most), in about half a minute.
test-fast: lint
	$(PY) -m pytest -q -m "unit or integration" tests

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: setup
	$(PY) -m tests.bench $(BENCH_ARGS)

chaos: setup
	DWORKERS_CHAOS_SECONDS=$${DWORKERS_CHAOS_SECONDS:-300} $(PY) -m pytest -q -s tests/chaos

clean:
	rm -rf $(VENV) gen .run *.egg-info

# Prometheus and promtool for the metrics test (Debian's package).
test-tools:
	@scripts/ensure-test-tools.sh

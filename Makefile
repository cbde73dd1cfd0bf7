# dworkers: `make run` starts the local demo cluster, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS_STAMP := $(VENV)/.tools
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/dworkers/v1/*.proto)
GEN_STAMP := gen/.generated

.PHONY: setup proto run test test-fast lint bench chaos zookeeper postgresql test-tools clean lock image image-test

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
	$(PY) -m pytest -q --durations=25 -m "not container" tests

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

# The container image (deploy/Dockerfile) built with podman, and the test of
# it in containers (tests/test_image.py). The base of both stages is made
# here from Debian's packages (no registry needed); BASE_IMAGE= builds on
# the Dockerfile's pinned python:3.11-slim instead.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= localhost/dworkers:$(VERSION)
BASE_IMAGE ?= localhost/dworkers-base:bookworm

image:
	@IMAGE=$(IMAGE) BASE_IMAGE=$(BASE_IMAGE) scripts/image.sh

image-test: setup
	@IMAGE=$(IMAGE) BASE_IMAGE=$(BASE_IMAGE) scripts/image.sh test

clean:
	rm -rf $(VENV) gen .run *.egg-info

# Prometheus and promtool for the metrics test (Debian's package).
test-tools:
	@scripts/ensure-test-tools.sh

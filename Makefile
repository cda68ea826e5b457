# Vigil developer entry points (GNU make). `make` or `make help` lists the targets.
#
# Server settings live in one place: scripts/stack.sh. Targets that run Python export
# its `scripts/stack.sh env` output (VIGIL_DB_*, VIGIL_AMQP_*, ...) first; override any
# of them in the environment, e.g. `VIGIL_DB_PORT=55433 make test`.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

STACK := bash scripts/stack.sh
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

# Prefix for recipes that need the stack's connection settings in their environment.
WITH_STACK_ENV = stack_env="$$($(STACK) env)" && eval "$$stack_env" &&

.PHONY: help install up down status env test demo bench drills docs lint clean

help: ## Show this help
	@echo "Vigil make targets:"
	@awk 'BEGIN { FS = ":.*## " } /^[a-zA-Z_-]+:.*## / { printf "  %-8s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)
	@echo "Extra pytest arguments: make test PYTEST_ARGS='-k name -x'"

install: ## Install rabbitmq-server/postgres if missing, create .venv, pip install -e '.[dev]'
	@bash scripts/install.sh

up: install ## Start local Postgres + RabbitMQ, create Vigil's broker users (idempotent)
	@$(STACK) up
	@$(WITH_STACK_ENV) $(VENV)/bin/vigil broker setup

down: ## Stop the local servers (data is kept)
	@$(STACK) down

status: ## One line per local server
	@$(STACK) status || true

env: ## Print the stack's connection settings as export lines
	@$(STACK) env

test: up ## Run the whole test suite (unit, integration, drills) against the local stack
	@$(WITH_STACK_ENV) $(VENV)/bin/pytest -q $(PYTEST_ARGS)

demo: up ## Run the demo (python -m bench.demo) against the local stack
	@$(WITH_STACK_ENV) $(PY) -m bench.demo

bench: up ## Run the benchmarks (python -m bench.run) against the local stack
	@$(WITH_STACK_ENV) $(PY) -m bench.run

drills: up ## Run the failure drills (tests/drills) against the local stack
	@$(WITH_STACK_ENV) $(VENV)/bin/pytest -q tests/drills -p no:cacheprovider -s $(PYTEST_ARGS)

docs: install ## Regenerate docs/configuration.md from the settings classes
	@$(VENV)/bin/vigil config docs > docs/configuration.md

lint: install ## ruff check .
	@$(VENV)/bin/ruff check .

clean: ## Stop the servers and delete all local stack data (.vigil/)
	@$(STACK) clean

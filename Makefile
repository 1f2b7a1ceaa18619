# device-rebind: every command a developer or CI needs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= --durations=15

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): requirements/dev.lock pyproject.toml
	@echo "==> creating $(VENV) from requirements/dev.lock"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements/dev.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

.PHONY: venv
venv: $(STAMP) ## the virtualenv with the locked dependencies

.PHONY: kafka
kafka: ## resolve the Apache Kafka broker jars with Maven (cached in .cache/kafka)
	bash deploy/local/kafka.sh fetch

.PHONY: tools
tools: tools-go tools-apt ## build helm and docker-compose from the Go module proxy, install promtool/prometheus (cached)

.PHONY: tools-go
tools-go: ## helm and docker-compose built from the Go module proxy into .cache/bin (once per version)
	bash scripts/install-helm.sh
	bash scripts/install-compose.sh

.PHONY: tools-apt
tools-apt: ## promtool/prometheus and shellcheck from Debian's packages, when missing
	bash scripts/install-prometheus.sh
	bash scripts/install-shellcheck.sh

.PHONY: deps
deps: venv kafka tools ## everything the tests and the demo need

.PHONY: lint
lint: venv ## ruff (lint and format check), lint-imports (the layers of service/, pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

.PHONY: typecheck
typecheck: venv ## mypy --strict on the package and the tests
	$(BIN)/mypy

.PHONY: test
test: venv ## everything CI runs: lint, types, unit, integration, fault, deploy tests; then the time of each part
	BIN="$(BIN)" PYTEST_ARGS="$(PYTEST_ARGS)" bash scripts/test.sh

.PHONY: soak
soak: venv kafka ## the fault and budget tests at full length (60 s windows, 20 s tokens), outside CI: ~41 min (measured)
	TEST_SOAK=1 $(BIN)/pytest tests/faults tests/integration/test_budget_e2e.py $(PYTEST_ARGS)

.PHONY: test-quick
test-quick: venv kafka lint typecheck ## the inner loop: skips the slow fault tests
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

.PHONY: test-kafka39
test-kafka39: deps ## the integration suite against an Apache Kafka 3.9 broker
	KAFKA_VERSION=3.9.1 $(BIN)/pytest tests/integration $(PYTEST_ARGS)

.PHONY: demo
demo: venv kafka ## start broker, simulator and service; play a story of swaps; print outcomes
	PYTHONPATH=. $(BIN)/python deploy/local/demo.py

.PHONY: bench
bench: venv kafka ## measure the real service on this machine (broker, simulator, baseline): about 20 min, plus section 12 (396 s), sections 13-14 (118 s), section 16 (the urgent lane, 343 s) and section 10's second schedule (233 s for both) measured on 2026-12-06 (sections 6-9 add 7, 11 adds 1; --skip 6,7,8,9,11,12,13,14,16; section 15, a rolling restart of ~10 min, only with --only 15)
	PYTHONPATH=. $(BIN)/python -m bench $(BENCH_ARGS)

.PHONY: image
image: ## build the Dockerfile with buildah (no Docker engine) on a local Debian base; prints the size
	bash scripts/build-image.sh

.PHONY: fmt
fmt: venv ## format and auto-fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

.PHONY: clean
clean: ## remove the virtualenv and caches (keeps downloaded jars in .cache)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

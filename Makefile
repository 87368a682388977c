# DICOM Store SCP for AWS HealthImaging: build, run and test entry points.
# `make run` and `make test` work on a fresh Debian machine: they create the virtual environment and install
# what they need (DCMTK through apt-get when `storescu` is missing).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# ---------------------------------------------------------------------------------------------------------------
# Environment

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

.PHONY: venv
venv: $(INSTALLED) ## Create the virtual environment with the daemon and the test tools

.PHONY: dcmtk
dcmtk: ## Install DCMTK (storescu, echoscu, storescp) when missing
	@command -v storescu >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dcmtk; }

# ---------------------------------------------------------------------------------------------------------------
# The daemon

# Loopback unless told otherwise: a modality on the network needs BIND_ADDRESS=0.0.0.0.
.PHONY: run
run: $(INSTALLED) ## Start the SCP on port 11112, AE STORESCP, storing to ./storage (or S3 with DICOM_BUCKET)
	BIND_ADDRESS=$${BIND_ADDRESS:-127.0.0.1} STORAGE_DIR=$${STORAGE_DIR:-./storage} $(BIN)/dicom-store-scp

# ---------------------------------------------------------------------------------------------------------------
# Tests

.PHONY: test
test: $(INSTALLED) dcmtk ## Run every test (unit, integration with DCMTK and moto_server, robustness)
	$(BIN)/pytest -q

# ---------------------------------------------------------------------------------------------------------------
# Housekeeping

.PHONY: clean
clean: ## Remove everything generated
	rm -rf $(VENV) build dist docs/_build .pytest_cache .mypy_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

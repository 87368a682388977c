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
# Lambda functions and state machine

# One zip per functions/<name>/ holding app.py, the shared functions/common/ package and the function's own
# requirements, built for the python3.12 x86_64 runtime without Docker. boto3/botocore come with the runtime.
# Fixed timestamps, modes and entry order make the zips byte-for-byte reproducible.
FUNCTIONS := $(sort $(notdir $(patsubst %/app.py,%,$(wildcard functions/*/app.py))))
FUNCTION_ZIPS := $(FUNCTIONS:%=build/functions/%.zip)
COMMON_SOURCES := $(wildcard functions/common/*.py)

.PHONY: package-functions
package-functions: $(FUNCTION_ZIPS) build/statemachines/import.asl.json ## Build build/functions/<name>.zip per Lambda and copy the ASL

build/functions/%.zip: functions/%/app.py functions/%/requirements.txt $(COMMON_SOURCES) | $(INSTALLED)
	rm -rf build/functions/$* $@ && mkdir -p build/functions/$*
	$(BIN)/pip install --quiet --no-compile --disable-pip-version-check --platform manylinux2014_x86_64 \
		--implementation cp --python-version 3.12 --only-binary=:all: \
		--target build/functions/$* -r functions/$*/requirements.txt
	rm -rf build/functions/$*/boto3* build/functions/$*/botocore* build/functions/$*/s3transfer* \
		build/functions/$*/bin
	cp functions/$*/app.py build/functions/$*/
	mkdir -p build/functions/$*/common && cp $(COMMON_SOURCES) build/functions/$*/common/
	find build/functions/$* -type d -exec chmod 755 {} + && find build/functions/$* -type f -exec chmod 644 {} +
	find build/functions/$* -exec touch -h -t 198001010000 {} +
	cd build/functions/$* && find . -type f | sed 's|^\./||' | LC_ALL=C sort | TZ=UTC zip -X -q -D ../$*.zip -@
	rm -rf build/functions/$*

build/statemachines/import.asl.json: statemachines/import.asl.json
	mkdir -p $(@D) && cp $< $@

.PHONY: lint-statemachine
lint-statemachine: $(INSTALLED) ## Check statemachines/import.asl.json with statelint
	$(BIN)/statelint statemachines/import.asl.json

# ---------------------------------------------------------------------------------------------------------------
# Housekeeping

.PHONY: clean
clean: ## Remove everything generated
	rm -rf $(VENV) build dist docs/_build .pytest_cache .mypy_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# DICOM Store SCP for AWS HealthImaging: build, run and test entry points.
# `make run` and `make test` work on a fresh Debian machine: they create the virtual environment and install
# what they need (DCMTK through apt-get when `storescu` is missing).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
RUNTIME := $(VENV)/.runtime
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The release's version lives in pyproject.toml alone; the image tag, the artifact prefix and the template's
# defaults follow it (tests/templates/test_release.py checks the template and the Dockerfile label).
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)

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

# `make run` needs only the daemon's own dependencies, not the test and lint tools.
$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

.PHONY: venv
venv: $(INSTALLED) ## Create the virtual environment with the daemon and the test tools

.PHONY: dcmtk
dcmtk: ## Install DCMTK (storescu, echoscu, storescp) and strace (the durability tests trace fsync) when missing
	@{ command -v storescu && command -v strace; } >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dcmtk strace; }

# ---------------------------------------------------------------------------------------------------------------
# The daemon

# Loopback unless told otherwise: a modality on the network needs BIND_ADDRESS=0.0.0.0.
.PHONY: run
run: $(RUNTIME) ## Start the SCP on port 11112, AE STORESCP, storing to ./storage (or S3 with DICOM_BUCKET)
	BIND_ADDRESS=$${BIND_ADDRESS:-127.0.0.1} STORAGE_DIR=$${STORAGE_DIR:-./storage} $(BIN)/dicom-store-scp

# ---------------------------------------------------------------------------------------------------------------
# Tests

# The unit, function and state-machine tests run a second time with the clock 400 days ahead: no test may depend
# on the day it runs.
.PHONY: test
test: $(INSTALLED) dcmtk ## Run every test (unit, integration with DCMTK and moto_server, robustness)
	$(BIN)/python -m pytest -q -p tests.support.clock_ahead tests/unit tests/functions tests/statemachine
	$(BIN)/pytest -q

# The end-to-end invariant under seeded faults (tests/endtoend), for an hour instead of the short runs in `make test`:
# SOAK_SECONDS (default 3600) of sending, split between the modes SOAK_FORWARDING chooses (StoreDICOM forwarding
# on, off, or both, the default), SOAK_SEED to replay a run.
.PHONY: soak
soak: $(INSTALLED) ## The end-to-end invariant under faults for an hour (SOAK_SECONDS, SOAK_FORWARDING=on|off|both, SOAK_SEED)
	SOAK_SECONDS=$${SOAK_SECONDS:-3600} $(BIN)/python -m pytest -q -o timeout=0 tests/endtoend

# ---------------------------------------------------------------------------------------------------------------
# Lambda functions and state machine

# One zip per functions/<name>/ holding app.py, the shared functions/common/ package, the batch contract
# (batch_contract/, shared with the daemon) and the function's own requirements, built for the python3.12 x86_64 runtime without Docker. boto3/botocore come with the runtime.
# Fixed timestamps, modes and entry order make the zips byte-for-byte reproducible.
FUNCTIONS := $(sort $(notdir $(patsubst %/app.py,%,$(wildcard functions/*/app.py))))
FUNCTION_ZIPS := $(FUNCTIONS:%=build/functions/%.zip)
COMMON_SOURCES := $(wildcard functions/common/*.py)
CONTRACT_SOURCES := $(wildcard batch_contract/*.py)

.PHONY: package-functions
package-functions: $(FUNCTION_ZIPS) build/statemachines/import.asl.json ## Build build/functions/<name>.zip per Lambda and copy the ASL

build/functions/%.zip: functions/%/app.py functions/%/requirements.txt $(COMMON_SOURCES) $(CONTRACT_SOURCES) | $(INSTALLED)
	rm -rf build/functions/$* $@ && mkdir -p build/functions/$*
	$(BIN)/pip install --quiet --no-compile --disable-pip-version-check --platform manylinux2014_x86_64 \
		--implementation cp --python-version 3.12 --only-binary=:all: \
		--target build/functions/$* -r functions/$*/requirements.txt
	rm -rf build/functions/$*/boto3* build/functions/$*/botocore* build/functions/$*/s3transfer* \
		build/functions/$*/bin
	cp functions/$*/app.py build/functions/$*/
	mkdir -p build/functions/$*/common && cp $(COMMON_SOURCES) build/functions/$*/common/
	mkdir -p build/functions/$*/batch_contract && cp $(CONTRACT_SOURCES) build/functions/$*/batch_contract/
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
# Checks

# checkov and taskcat pin libraries that conflict with the project's (and with each other): each gets its own
# virtual environment.
CHECKOV_VENV := .venv-checkov
TASKCAT_VENV := .venv-taskcat
AWSCLI_VENV := .venv-awscli
CHECKOV_VERSION := 3.3.30
TASKCAT_VERSION := 0.9.58
AWSCLI_VERSION := 1.46.3

$(CHECKOV_VENV)/.installed:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --upgrade pip
	$(CHECKOV_VENV)/bin/pip install --quiet 'checkov==$(CHECKOV_VERSION)'
	touch $@

$(TASKCAT_VENV)/.installed:
	$(PYTHON) -m venv $(TASKCAT_VENV)
	$(TASKCAT_VENV)/bin/pip install --quiet --upgrade pip
	$(TASKCAT_VENV)/bin/pip install --quiet 'taskcat==$(TASKCAT_VERSION)'
	touch $@

# The AWS CLI v1 pins botocore and docutils versions of its own.
$(AWSCLI_VENV)/.installed:
	$(PYTHON) -m venv $(AWSCLI_VENV)
	$(AWSCLI_VENV)/bin/pip install --quiet --upgrade pip
	$(AWSCLI_VENV)/bin/pip install --quiet 'awscli==$(AWSCLI_VERSION)'
	touch $@

# cfn-lint reads .cfnlintrc.yaml (the HealthImaging Regions); warnings fail too. checkov skips are declared in the
# template next to each resource with the reason; --skip-download keeps it offline. checkov does not expand
# Fn::ForEach, so it also scans the template as the AWS::LanguageExtensions transform expands it.
EXPANDED_TEMPLATE := build/lint/dicom-store-scp.expanded.template.json

.PHONY: lint
lint: $(INSTALLED) $(CHECKOV_VENV)/.installed $(TASKCAT_VENV)/.installed lint-statemachine ## cfn-lint, checkov, hadolint, taskcat lint, statelint, ruff, mypy
	$(BIN)/cfn-lint
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download --framework cloudformation -d templates
	mkdir -p $(dir $(EXPANDED_TEMPLATE)) && $(BIN)/python -m tests.templates.cfn > $(EXPANDED_TEMPLATE)
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download --framework cloudformation -f $(EXPANDED_TEMPLATE)
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download --framework dockerfile -f Dockerfile
	$(BIN)/hadolint Dockerfile
	$(TASKCAT_VENV)/bin/taskcat lint
	$(BIN)/ruff check scp batch_contract functions tests/templates docs/_ext docs/conf.py
	$(BIN)/mypy scp batch_contract functions docs/_ext

# ---------------------------------------------------------------------------------------------------------------
# Packaging and delivery

# build/ is laid out as the artifact bucket expects under ArtifactKeyPrefix: functions/, statemachines/, templates/.
.PHONY: package
package: package-functions ## Build the Lambda zips and stage the ASL and templates in build/
	mkdir -p build/templates
	cp templates/*.template.yaml build/templates/

# One bucket per Region (Lambda reads code only from its own Region): <ARTIFACT_BUCKET>-<region>, the Regional
# copies the template's default ArtifactBucketName reads; each release under its own versioned prefix.
ARTIFACT_BUCKET ?= man-machine-interface-dicom-store-scp
ARTIFACT_PREFIX ?= dicom-store-scp/v$(VERSION)/
PUBLISH_REGIONS ?= us-east-1 us-west-2 eu-west-1 eu-west-2 ap-southeast-2
AWS ?= $(AWSCLI_VENV)/bin/aws

.PHONY: publish
publish: package $(AWSCLI_VENV)/.installed ## Upload build/ to s3://$ARTIFACT_BUCKET-<region>/$ARTIFACT_PREFIX in every Region (needs credentials)
	for region in $(PUBLISH_REGIONS); do \
		$(AWS) s3 sync --region $$region --delete --only-show-errors --exclude 'lint/*' --exclude '.taskcat.yml' \
			--exclude 'taskcat_outputs/*' build/ s3://$(ARTIFACT_BUCKET)-$$region/$(ARTIFACT_PREFIX) || exit 1; \
	done

# The Marketplace repository's tag of this release is v<version>, the template's ContainerImage default.
IMAGE ?= dicom-store-scp:v$(VERSION)

.PHONY: image
image: ## Build the container image (IMAGE=dicom-store-scp:v<version>; needs a Docker engine)
	docker build --pull -t $(IMAGE) .

# taskcat runs from build/, so it uploads exactly the packaged artifacts (see .taskcat.yml).
.PHONY: taskcat
taskcat: package $(TASKCAT_VENV)/.installed ## Deploy and test the template in every HealthImaging Region (needs AWS)
	cp .taskcat.yml build/.taskcat.yml
	cd build && ../$(TASKCAT_VENV)/bin/taskcat test run

# ---------------------------------------------------------------------------------------------------------------
# Documentation

.PHONY: graphviz
graphviz: ## Install Graphviz (dot, for the architecture diagram) when missing
	@command -v dot >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq graphviz; }

.PHONY: docs
docs: $(INSTALLED) graphviz ## Build the HTML documentation into docs/_build/html (warnings are errors)
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

# ---------------------------------------------------------------------------------------------------------------
# Benchmarks

# Not part of `make test`: about 15-20 minutes on 2 cores. BENCH_FILES, BENCH_REPEATS, BENCH_CONCURRENCY,
# BENCH_RECEIVERS, BENCH_LARGE, BENCH_HELD, BENCH_PROFILE, BENCH_SOURCE and, for the S3 mode (moto_server behind a
# latency proxy), BENCH_S3, BENCH_S3_FILES, BENCH_S3_CONCURRENCY, BENCH_S3_LATENCY tune it; BENCH_FORWARDING and
# the BENCH_FORWARD_*, BENCH_STOW_LATENCY and BENCH_IMPORT_JOB_SECONDS settings the time to HealthImaging by both
# paths, which `make bench-forwarding` runs alone (docs/benchmark.rst).
.PHONY: bench
bench: $(INSTALLED) dcmtk ## Ingest benchmark against DCMTK storescp +B, Orthanc, pynetdicom, in S3 mode, and the time to HealthImaging; writes bench/results/
	@command -v Orthanc >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq orthanc; }
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench

.PHONY: bench-forwarding
bench-forwarding: $(INSTALLED) dcmtk ## Time to HealthImaging by StoreDICOM forwarding and by the import job, receive rate on and off
	$(BIN)/python -m bench.forwarding

# ---------------------------------------------------------------------------------------------------------------
# Housekeeping

.PHONY: clean
clean: ## Remove everything generated
	rm -rf $(VENV) build dist docs/_build .pytest_cache .mypy_cache .ruff_cache *.egg-info
	rm -rf $(CHECKOV_VENV) $(TASKCAT_VENV) $(AWSCLI_VENV) taskcat_outputs .taskcat
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# dermcompress: `make demo` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_CONFIG := config.demo.yaml

.PHONY: help install test lint unit demo report lock clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install the package with every pinned dependency (idempotent)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 'setuptools>=77' wheel
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

lint: $(STAMP)  ## ruff, snakefmt and snakemake --lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint

unit: $(STAMP)  ## the tests alone
	$(BIN)/python -m pytest

test: lint unit  ## lint, then every test (installs first if needed)

demo: $(STAMP)  ## run the workflow on the embedded synthetic data set
	$(BIN)/snakemake --profile profiles/local --configfile $(DEMO_CONFIG)
	@echo
	@echo "Demo done (synthetic data). Outputs:"
	@echo "  data:    results/data/ (manifest.parquet, quarantine.csv, splits.parquet, split_report.json)"
	@echo "  caches:  results/cache/<res>px/<variant>/ (sharded parquet + _info.json)"
	@echo "  logs:    results/logs/"

lock:  ## re-pin requirements.lock from the current environment
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^dermcompress' > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:  ## remove results and Snakemake's state (keeps .venv)
	rm -rf results .snakemake

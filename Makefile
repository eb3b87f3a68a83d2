# dermcompress: `make demo` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_CONFIG := config.demo.yaml
REPORT := results/report.html
# The demo's runs are tiny CPU jobs, mostly interpreter start-up: two at a time with one thread each beat the
# profile's one training job at a time (its `gpu` pool guards a real GPU; the demo trains on the CPU).
DEMO_TRAINING := --resources gpu=2
CONFIG ?=

.PHONY: help install test lint unit demo report lock clean test-slurm install-profiles

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

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

# Two workers (pytest-xdist), whole test modules to each (tests/conftest.py groups them): the SLURM module mostly
# waits on the cluster, and a Snakemake run's own start-up leaves the other core idle.
TEST_WORKERS ?= 2

unit: $(STAMP)  ## the tests alone, on TEST_WORKERS workers (and the slowest fifteen, to keep the suite's time in view)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --no-loadscope-reorder --durations=15

test: lint unit  ## lint, then every test, the SLURM ones included (installs first if needed)

# Under `make test` the SLURM tests must run, not skip: they stand up a one-node SLURM (root, apt) themselves.
test test-slurm: export DERMCOMPRESS_REQUIRE_SLURM := 1

test-slurm: $(STAMP)  ## only the tests against a real SLURM, stood up on this machine and torn down after
	$(BIN)/python -m pytest -v tests/test_slurm.py

# Where Snakemake looks for named profiles (`--profile NAME`): the user's config folder.
PROFILE_DIR ?= $(or $(XDG_CONFIG_HOME),$(HOME)/.config)/snakemake

install-profiles:  ## link profiles/* into ~/.config/snakemake, so `snakemake --profile slurm-h100` works anywhere
	@mkdir -p $(PROFILE_DIR)
	@for dir in profiles/*/; do name=$$(basename $$dir); link=$(PROFILE_DIR)/$$name; \
		if [ -e $$link ] && [ ! -L $$link ]; then echo "kept $$link: it exists and is not a link"; \
		else ln -sfn $(CURDIR)/profiles/$$name $$link && echo "$$link -> $(CURDIR)/profiles/$$name"; fi; \
	done

demo: $(STAMP)  ## the whole study (runs, tables, figures, report) on the embedded synthetic data set
	OMP_NUM_THREADS=1 $(BIN)/snakemake --profile profiles/local --configfile $(DEMO_CONFIG) $(DEMO_TRAINING)
	$(BIN)/snakemake --profile profiles/local --configfile $(DEMO_CONFIG) --report $(REPORT)
	@echo
	@echo "Demo done (SYNTHETIC data, tiny models: it shows the pipeline, not what models do on ISIC 2019)."
	@echo "  report:  $(REPORT)  (open it in a browser)"
	@echo "  tables:  results/tables/<experiment>.{csv,md,tex,html}  (CSV column 'runs': the run folders of each row)"
	@echo "  figures: results/figures/<experiment>_<kind>.png"
	@echo "  runs:    results/runs/index.csv, one folder per run under results/runs/"
	@echo "  data:    results/data/summary.md, manifest.parquet, splits.parquet; logs under results/logs/"

report: $(STAMP)  ## results/report.html from what the workflow built (CONFIG=config.demo.yaml for the demo's)
	$(BIN)/snakemake --profile profiles/local $(if $(CONFIG),--configfile $(CONFIG)) --report $(REPORT)
	@echo "Report: $(REPORT)"

lock:  ## re-pin requirements.lock from the current environment
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^dermcompress' > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:  ## remove results and Snakemake's state (keeps .venv)
	rm -rf results .snakemake

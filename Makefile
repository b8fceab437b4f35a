# The two commands: `make demo` and `make test`. Each sets itself up in .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= data
DEMO_ARGS ?=
SERVE_ARGS ?=

export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export NO_MKDOCS_2_WARNING := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 60
export PREFECT_LOGGING_LEVEL ?= WARNING

.PHONY: demo test lint docs docs-build setup serve bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first: the pinned CPU wheel on disk; anything else pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mirflow demo --data-dir $(DATA_DIR) $(DEMO_ARGS)

# The service: Prefect server + worker, MLflow server, Dask cluster, deployments (Ctrl-C stops it all).
serve: $(STAMP)
	$(VENV)/bin/mirflow up --data-dir $(DATA_DIR) $(SERVE_ARGS)

# Lint (ruff), the floors (import-linter), the docs site (a broken link fails), then the tests: two pytest-xdist
# workers, one test module per unit (tests/conftest.py says which go first).
# TEST_WORKERS=0 runs them in this process (e.g. with PYTEST_ARGS=--pdb).
TEST_WORKERS ?= 2
test: lint docs-build
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# No --quiet: it drops the warnings that --strict counts, and a broken link would pass.
docs-build: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir $(VENV)/site

# The docs site on 127.0.0.1 (DOCS_PORT, default 8001), rebuilt as pages change.
DOCS_PORT ?= 8001
docs: $(STAMP)
	$(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:$(DOCS_PORT)

bench: $(STAMP)
	$(PY) benchmarks/bench_log_mel.py

clean:
	rm -rf $(DATA_DIR)

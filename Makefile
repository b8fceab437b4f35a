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
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 60
export PREFECT_LOGGING_LEVEL ?= WARNING

.PHONY: demo test setup serve bench clean

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

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_log_mel.py

clean:
	rm -rf $(DATA_DIR)

# fer-pipeline: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME ?= $(CURDIR)/dagster_home
export GX_ANALYTICS_ENABLED := false
export DAGSTER_DISABLE_TELEMETRY := 1
UI_HOST ?= 127.0.0.1
UI_PORT ?= 3000

.PHONY: setup demo data test test-fast ui ui-stop clean-data docs benchmark-table

# Virtual environment + editable install; redone only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps facenet-pytorch==2.6.0
	$(BIN)/pip install --quiet --no-deps label-studio-sdk==2.1.2
	touch $@

setup: $(VENV)/.installed dagster_home/dagster.yaml

dagster_home/dagster.yaml:
	mkdir -p dagster_home
	test -f $@ || cp fer_pipeline/instance/dagster.yaml $@

# Set up, then materialize every asset on the embedded (synthetic) default data: the `main` job,
# one run per cross-validation fold (3 here) and held-out source, then the reports; partitions
# already trained on the same data with the same recipe are not retrained (docs/models.md, "Training work
# as partitions").
demo: setup
	$(BIN)/fer-pipeline run --settings configs/demo.yaml
	@$(BIN)/fer-pipeline outputs

# Only the data half (what `dagster asset materialize --select '+splits'` gives, plus plots).
data: setup
	$(BIN)/dagster job execute -m fer_pipeline.definitions -j data_pipeline

# Set up, then run the whole test suite (CI runs exactly this via .ci/run).
test: setup
	bash scripts/install_browser.sh
	bash scripts/install_postgres.sh
	bash scripts/install_label_studio.sh
	$(BIN)/python -m pytest -q

# For development: everything but the browser test and the slow (training / full-graph) tests.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not browser and not slow"

# The documentation site (docs/, mkdocs.yml) into build/docs/; warnings (a broken link) fail it.
docs: setup
	$(BIN)/mkdocs build --strict --site-dir build/docs

# The benchmark tables in README.md and docs/benchmarks.md, regenerated from benchmarks/results/*.json
# (run a benchmark first: each writes its results file); the test suite checks they are in sync.
benchmark-table:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) scripts/benchmark_table.py

ui: setup
	bash scripts/ui.sh start

ui-stop:
	bash scripts/ui.sh stop

clean-data:
	cd data && git clean -fdX .

.PHONY: demo test lint bench serve clean

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WHEELS := $(wildcard /opt/wheels)
# PIP_EXTRA: more pip options, e.g. PyTorch's CPU index on a machine without a GPU (see README).
PIP_EXTRA ?=
PIP_FLAGS := -c constraints.txt $(if $(WHEELS),--find-links $(WHEELS),) $(PIP_EXTRA)

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_FLAGS) -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/orchestrator demo

# Test processes (pytest-xdist). Most tests wait on servers, subprocesses and sleeps: two halve the
# suite on a 2-core machine; four were slower there than two. The slowest tests are listed at the
# end, so a CI log shows where the suite's minutes went.
TEST_WORKERS ?= 2

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=25

lint: $(BIN)/.installed
	$(BIN)/ruff check orchestrator tiers policies migrations tests bench
	$(BIN)/mypy

bench: $(BIN)/.installed
	$(BIN)/python bench/drafts.py --server-process
	$(BIN)/python bench/history.py

serve: $(BIN)/.installed
	$(BIN)/orchestrator serve $(SERVE_ARGS)

clean:
	rm -rf $(VENV) .orchestrator .pytest_cache .mypy_cache .ruff_cache

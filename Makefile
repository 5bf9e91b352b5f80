# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each bootstraps .venv (idempotently); torch is pinned through constraints.txt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_WORKERS ?= auto

.PHONY: demo test lint bench venv clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/higanbana demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --durations=10

bench: $(STAMP)
	$(BIN)/python benchmarks/layers.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache

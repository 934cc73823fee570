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

# uv installs the same pinned set as pip (reading pip's index config: .ci/uv_pip.py), several times
# faster; pip does it if uv cannot be installed. torch==2.13.0 is the CPU build (a local wheel
# here, 2.13.0+cpu); a plain `torch` from PyPI would be a multi-GB CUDA build.
# --compile-bytecode writes the .pyc files at install (pip does so by default): where
# PYTHONDONTWRITEBYTECODE is set, as on CI, Python never writes them itself and every new process
# would recompile torch, diffusers and transformers from source (~8 s of each CLI call here).
$(STAMP): pyproject.toml constraints.txt .ci/uv_pip.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	if $(BIN)/python -m pip install -q -c constraints.txt uv; then \
	  $(BIN)/python .ci/uv_pip.py $(BIN)/uv install -q --compile-bytecode --python $(BIN)/python \
	    -c constraints.txt torch==2.13.0 -e ".[pipeline,dev]"; \
	else \
	  echo "uv could not be installed: installing with pip"; \
	  $(BIN)/python -m pip install -q -U pip && \
	  $(BIN)/python -m pip install -q torch==2.13.0 && \
	  $(BIN)/python -m pip install -q -c constraints.txt -e ".[pipeline,dev]"; \
	fi
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

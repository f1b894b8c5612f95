# Two set-up-free entry points: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo demo-posttrain install clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15 tests

# Unit tests only (markers `slow` and `multiprocess` excluded): a few minutes on 2 cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow and not multiprocess" --durations=10 tests

demo: $(STAMP)
	$(BIN)/m3jax demo --config=configs/demo.py --workdir=demo_workdir

# SFT + DPO of the demo's model (after `make demo`; m3jax/demo/posttrain.py).
demo-posttrain: demo
	$(BIN)/m3jax demo-posttrain --config=configs/demo.py --workdir=demo_workdir

clean-venv:
	rm -rf $(VENV)

# Two entry points that work on a fresh machine (Python 3.11, gcc, a local CPU wheel of torch):
#   make demo   -- create .venv, install, round-trip every built-in model through megatron, then
#                  verify them (HF vs megatron forwards) over a small parallel matrix
#   make test   -- create .venv, install, run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?= -n 2

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned, from wherever pip finds it first (a local CPU wheel where pip's find-links
	# offers one; PyPI's CUDA build otherwise): README "Set-up" says how to get the CPU build elsewhere
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mcore-bridge demo
	$(BIN)/mcore-bridge verify --report reports/latest

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

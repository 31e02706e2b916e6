# Two entry points that work on a fresh machine: `make demo` and `make test`.
# TORCH picks the torch requirement; the default is the CPU build that lies on disk here.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
ARGS   ?=
BIN    := $(VENV)/bin

.PHONY: demo test lint typecheck unit install install-dev clean

demo: $(VENV)/.installed
	$(BIN)/aifab demo $(ARGS)

test: $(VENV)/.installed-dev lint typecheck unit

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests $(wildcard benchmarks)
	$(BIN)/ruff format --check src tests $(wildcard benchmarks)

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy src/aifab

unit: $(VENV)/.installed-dev
	$(BIN)/pytest $(ARGS)

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "aifab needs Python >= 3.11 (PYTHON=$(PYTHON))"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Stamps make a second `make demo` skip the install; they are redone when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)" -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[dev]"
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) .aifab .pytest_cache .mypy_cache .ruff_cache

# One place for the commands the README names. Each target installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: dev test bench lint install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test,speed]"

dev: install
	$(BIN)/python -m service serve --dev

test: install
	bash scripts/test.sh

bench: install
	$(BIN)/python bench/run.py

lint: install
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/ruff check service validators
	$(BIN)/mypy service validators tests

# kdx — `make train` and `make test` work on a fresh clone with nothing but Python 3 and make.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install train test lint format bench table clean

help:
	@echo "make train   # MNIST-1D: auto-trained CNN teacher (cached) -> MLP student with KD"
	@echo "make test    # the test suite (CPU, no network)"
	@echo "make lint    # ruff"
	@echo "make bench   # kdx-bench: kdx training step vs a plain PyTorch loop"
	@echo "make clean   # remove logs, caches and build files (keeps .venv)"

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/kdx-train $(ARGS)

test: $(STAMP)
	$(BIN)/pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests

format: $(STAMP)
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

bench: $(STAMP)
	$(BIN)/kdx-bench $(ARGS)

clean:
	rm -rf logs .cache build dist src/*.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# kdx — `make train` and `make test` work on a fresh clone with nothing but Python 3 and make.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install train test lint format package-check bench table clean

# what `make lint` / `make format` cover
LINT_PATHS := src tests scripts docs/examples

help:
	@echo "make train   # MNIST-1D: auto-trained CNN teacher (cached) -> MLP student with KD"
	@echo "make test    # the test suite (CPU, no network)"
	@echo "make lint    # ruff check + ruff format --check (CI runs it before the tests)"
	@echo "make format  # ruff format + ruff check --fix"
	@echo "make package-check  # build a wheel, install it in a fresh venv, run kdx-train from /tmp"
	@echo "make bench   # kdx-bench: kdx training step vs a plain PyTorch loop"
	@echo "make clean   # remove logs, caches and build files (keeps .venv)"

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@echo "Installing kdx and its dependencies into $(VENV)/ (pip install -e \".[dev]\"). The first time this"
	@echo "downloads PyTorch with its CUDA libraries: about 6 GB on disk, several minutes (7 on a"
	@echo "fresh clone here); later calls only reinstall kdx when pyproject.toml changed."
	$(BIN)/pip install --disable-pip-version-check --progress-bar on -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/kdx-train $(ARGS)

test: $(STAMP)
	$(BIN)/pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: $(STAMP)
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

package-check: $(STAMP)
	scripts/check_wheel.sh

bench: $(STAMP)
	$(BIN)/kdx-bench $(ARGS)

clean:
	rm -rf logs .cache build dist src/*.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

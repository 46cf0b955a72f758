# One command to check everything: `make test`. `.ci/run` calls the same target.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PHOTOS ?= photos
INDEX ?= data/index
CONFIG ?= config.toml

.PHONY: test test-slow lint typecheck run index bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest -m "not slow"

test-slow: $(STAMP)
	$(BIN)/pytest -m slow

index: $(STAMP)
	$(BIN)/python -m indexer build $(PHOTOS) --index $(INDEX)

# Sets everything up, indexes $(PHOTOS) and starts the bot (TELEGRAM_BOT_TOKEN in the environment).
run: index
	test -f $(CONFIG) || cp config.example.toml $(CONFIG)
	$(BIN)/python -m bot --config $(CONFIG)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

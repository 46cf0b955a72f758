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

# Sets everything up and starts the bot (TELEGRAM_BOT_TOKEN in the environment). A photo folder
# $(PHOTOS) is indexed first (files it cannot use are listed, exit status 3, and the bot still
# starts); without one the bot starts on an empty collection.
run: $(STAMP)
	@if [ -d "$(PHOTOS)" ]; then \
		$(BIN)/python -m indexer build "$(PHOTOS)" --index "$(INDEX)"; \
		status=$$?; [ $$status -eq 0 ] || [ $$status -eq 3 ] || exit $$status; \
	else \
		echo "No photo folder '$(PHOTOS)': the bot starts with an empty collection."; \
		echo "Add photos with /add in a chat, or index a folder: make run PHOTOS=path/to/photos"; \
	fi
	@test -f $(CONFIG) || cp config.example.toml $(CONFIG)
	$(BIN)/python -m bot --config $(CONFIG)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

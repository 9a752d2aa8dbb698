# Two entry points (see README): `make serve` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup serve demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Serve the bundled default model on http://127.0.0.1:8000 (playground at /, API docs at /docs).
HOST ?= 127.0.0.1
PORT ?= 8000
serve: $(STAMP)
	$(BIN)/lmserve serve --model checkpoints/default --host $(HOST) --port $(PORT)

# Generate once from the bundled model on the command line.
demo: $(STAMP)
	$(BIN)/python -m model.generate --checkpoint checkpoints/default --prompt "def fibonacci(n):" --max-new-tokens 48

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check model service tests bench

clean:
	rm -rf $(VENV) .runs .pytest_cache

# Benchmarks (report, don't assert): engine vs transformers vs hardware bounds; HTTP vs in-process engine.
bench: $(STAMP)
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/serve.py

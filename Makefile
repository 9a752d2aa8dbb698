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

# Until the HTTP service lands: make a tiny random checkpoint and generate from it.
demo: $(STAMP)
	test -f .runs/demo/config.json || $(BIN)/python -m model.init --preset tiny-llama --out .runs/demo
	$(BIN)/python -m model.generate --checkpoint .runs/demo --prompt "def hello(" --max-new-tokens 32

serve: demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check model service tests bench

clean:
	rm -rf $(VENV) .runs .pytest_cache

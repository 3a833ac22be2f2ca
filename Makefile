# The two commands in the README: `make demo` and `make test`. Both set up everything they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pipefail: a failed pip install must fail the target even though its output goes through a filter.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# This machine's pip config lists an index directory that may be absent; pip warns once per package.
QUIET_PIP := sed '/^WARNING: Location/d'

.PHONY: setup demo lint test test-fast

setup: $(STAMP)

# torch/torchvision come from this machine's local wheel store (pip on Python 3.11);
# Fashion-MNIST, the demo's dataset, is a Debian package.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q -e '.[test]' 2>&1 | $(QUIET_PIP)
	$(PY) -c "import tltrain, torch, ray, timm, mlflow, moto"  # fail here, not later, if the install broke
	test -d /usr/share/datasets/fashion-mnist || apt-get install -y -q dataset-fashion-mnist \
	  || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)
	touch $(STAMP)

demo: setup
	$(VENV)/bin/tltrain demo

# Style and types first (seconds): a failure there needs no 30-minute suite to show.
lint: setup
	$(VENV)/bin/ruff format --check tltrain tests
	$(VENV)/bin/ruff check tltrain tests
	$(VENV)/bin/mypy

test: setup lint
	HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled $(PY) -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled $(PY) -m pytest -q -m "not integration"

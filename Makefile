PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
MCORE_VERSION ?= 0.16.1

.PHONY: install test clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q megatron-core==$(MCORE_VERSION)
	$(PY) -m pip install -q -e ".[test,megatron]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

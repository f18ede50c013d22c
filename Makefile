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

# Not in CI: rerun the Megatron tests against older megatron-core releases, one venv each.
COMPAT_VERSIONS ?= 0.13.1 0.14.0 0.15.0
.PHONY: test-compat
test-compat:
	@for version in $(COMPAT_VERSIONS); do \
		venv=.venv-mcore-$$version; \
		test -x $$venv/bin/python || $(PYTHON) -m venv $$venv || exit 1; \
		$$venv/bin/python -m pip install -q torch==$(TORCH_VERSION) megatron-core==$$version einops -e ".[test]" || exit 1; \
		echo "== megatron-core $$version =="; \
		$$venv/bin/python -m pytest -q tests/test_megatron.py tests/test_megatron_args.py || exit 1; \
	done

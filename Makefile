PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
MCORE_VERSION ?= 0.16.1

.PHONY: install test demo clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q megatron-core==$(MCORE_VERSION)
	$(PY) -m pip install -q -e ".[test,megatron,demo]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q --durations=30 tests

# The same small GPT trained twice, same seed and data: no SP on 1 rank, then USP u=2 x r=2 (zigzag) on 4 ranks.
DEMO_DIR ?= runs/demo
DEMO_ITERS ?= 200
DEMO_ARGS := --num-layers 4 --hidden-size 128 --num-attention-heads 8 --group-query-attention \
	--num-query-groups 4 --seq-length 256 --micro-batch-size 8 --global-batch-size 8 --train-iters $(DEMO_ITERS) \
	--lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 20 --lr-warmup-init 1.5e-4 --log-interval 20 --seed 1234
TORCHRUN := $(VENV)/bin/torchrun --standalone

demo: install
	@mkdir -p $(DEMO_DIR)
	@start=$$(date +%s) && \
	echo "== baseline: no sequence parallelism, 1 rank ==" && \
	$(TORCHRUN) --nproc-per-node 1 -m megatron_usp.train $(DEMO_ARGS) \
		--loss-csv $(DEMO_DIR)/loss_baseline.csv && \
	echo "== USP: ulysses 2 x ring 2 (zigzag), 4 ranks ==" && \
	$(TORCHRUN) --nproc-per-node 4 -m megatron_usp.train $(DEMO_ARGS) \
		--ulysses-degree 2 --ring-degree 2 --usp-ring-impl zigzag --loss-csv $(DEMO_DIR)/loss_usp.csv && \
	$(PY) tools/loss_parity.py $(DEMO_DIR)/loss_baseline.csv $(DEMO_DIR)/loss_usp.csv --out $(DEMO_DIR) \
		--max-diff 1e-3 && \
	echo "demo wall time (training + comparison): $$(( $$(date +%s) - start )) s"

clean:
	rm -rf $(VENV) $(VENV_LATEST) *.egg-info .pytest_cache

# One unattended run on one H100/H200 (<= 8 min): kernel parity (dense + varlen), simulate-rank efficiency, packed
# rows, peak memory per rank; ends with a summary table. Smoke test on CPU: $(PY) tools/gpu_check.py --device cpu --tiny
.PHONY: gpu-check
gpu-check: install
	$(PY) tools/gpu_check.py

# The newest megatron-core line (0.17+ need Python >= 3.12; torch 2.13.0 for 3.12 is the registry's CUDA build, which
# runs on CPU with gloo): every Megatron-facing test (tests/megatron: adapter, Megatron-LM glue, masks, RoPE,
# trainer, patches) on it. .ci/run runs it after `make test`.
# a pyenv 3.12 first (pyenv's python3.12 shim refuses to run unless 3.12 is the selected version), else python3.12
PYTHON_LATEST ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
MCORE_LATEST ?= 0.19.2
VENV_LATEST := .venv-latest
# torch and megatron-core (a 4.7 GB download): .ci/run builds this while the main tests run
$(VENV_LATEST)/.dependencies:
	$(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(VENV_LATEST)/bin/python -m pip install -q megatron-core==$(MCORE_LATEST)
	touch $@
$(VENV_LATEST)/.installed: setup.py $(VENV_LATEST)/.dependencies
	$(VENV_LATEST)/bin/python -m pip install -q -e ".[test,megatron,demo]"
	touch $@

.PHONY: test-latest
test-latest: $(VENV_LATEST)/.installed
	$(VENV_LATEST)/bin/python -m pytest -q --durations=20 tests/megatron

# Not in CI: rerun the Megatron tests against other megatron-core releases, one venv each (0.17+ on Python 3.12).
COMPAT_VERSIONS ?= 0.13.1 0.14.0 0.15.0 0.17.1 0.18.2
.PHONY: test-compat
test-compat:
	@for version in $(COMPAT_VERSIONS); do \
		venv=.venv-mcore-$$version; \
		case $$version in 0.1[3-6].*) python=$(PYTHON);; *) python=$(PYTHON_LATEST);; esac; \
		test -x $$venv/bin/python || $$python -m venv $$venv || exit 1; \
		$$venv/bin/python -m pip install -q torch==$(TORCH_VERSION) megatron-core==$$version einops -e ".[test]" || exit 1; \
		echo "== megatron-core $$version =="; \
		$$venv/bin/python -m pytest -q tests/megatron/test_megatron.py tests/megatron/test_megatron_args.py tests/megatron/test_megatron_masks.py \
			tests/megatron/test_megatron_lm.py || exit 1; \
	done

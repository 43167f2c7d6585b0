# The two commands: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

# README command 1: the sample data, then 2 CPU ranks through the deepspeed launcher (gloo, ZeRO-2,
# experts split over the ranks). Starts afresh each time (runs/demo is replaced).
demo: install
	$(VENV)/bin/msgfm prepare-sample data/sample
	rm -rf runs/demo
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/deepspeed --num_gpus 2 launchers/pretrain.py \
		--deepspeed_config ds_configs/cpu.json --config demo_cpu \
		--data-root data/sample --output-dir runs/demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs data/sample

# The two commands: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo lint test clean gpu-wheels gpu-check

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install -e '.[train,data,dev]'
	touch $(STAMP)

# README command 1: the sample data, then 2 CPU ranks through the deepspeed launcher (gloo, ZeRO-2,
# experts split over the ranks). Starts afresh each time (runs/demo is replaced).
demo: install
	$(VENV)/bin/msgfm prepare-sample data/sample
	rm -rf runs/demo
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/deepspeed --num_gpus 2 launchers/pretrain.py \
		--deepspeed_config ds_configs/cpu.json --config demo_cpu \
		--data-root data/sample --output-dir runs/demo

# ruff (style, import order, docstring layout; pyproject.toml) and mypy (types of the package).
lint: install
	$(VENV)/bin/ruff check msgfm tests launchers
	$(VENV)/bin/mypy

# README command 2: lint and type check, then the suite.
test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# What the GPU machine lacks (no network there; docs/gpu.md), for its CPython 3.12 on x86-64:
# DeepSpeed built without ops (a pure-Python wheel) and those of its dependencies the machine's
# image does not have. Versions are the ones installed in .venv, so the device runs what the tests ran.
GPU_WHEELS := .gpu-wheels
GPU_WHEEL_DEPS := hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions
GPU_PLATFORMS := $(foreach n,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(n))
GPU_CHECK_MODE ?= full

gpu-wheels: install
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	DS_BUILD_OPS=0 $(PY) -m pip wheel --no-deps -w $(GPU_WHEELS) \
		"deepspeed==$$($(PY) -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d $(GPU_WHEELS) $$($(PY) -c 'import importlib.metadata as m, sys; \
		print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(GPU_WHEEL_DEPS))
	@ls -1 $(GPU_WHEELS) && du -sh $(GPU_WHEELS)

# On the GPU machine: bash tools/gpu_check.sh (what this runs; the image's python3). On a CPU:
# make gpu-check GPU_CHECK_MODE=smoke (tiny shapes, CUDA parts skipped). Reports go to $$OUT.
gpu-check: $(if $(filter smoke,$(GPU_CHECK_MODE)),install)
	PYTHON=$(if $(filter smoke,$(GPU_CHECK_MODE)),$(abspath $(PY)),python3) bash tools/gpu_check.sh \
		--mode $(GPU_CHECK_MODE)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs data/sample $(GPU_WHEELS)
